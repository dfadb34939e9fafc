"""Ranked positions of a query's correct gallery items, without sorting the gallery.

Ranking a row of scores descending, with the lower gallery index first among equal
scores (the order of a stable descending argsort), correct item j lands at 0-based

    position(j) = #{g : s_g > s_j} + #{g < j : s_g == s_j}

so the metrics need a count per correct item, not an order of the whole row. For a
chunk of c rows (``chunk_positions``) the scores from each row's lowest correct item
``lo`` to its maximum ``hi`` are mapped by a monotone affine map onto ~G/4 uniform bins
(lower scores onto a few bins below lo's, column by column, so that no single counter
takes them all); one ``bincount`` of the chunk's bins and a cumsum per row count the
items in strictly higher bins than each correct item, and only the few items that share
a bin with a correct item are compared exactly, tie rule included.

Why exact: every step of the map (subtract, multiply by a positive scale, maximum,
add the row's bin offset, truncate) is a correctly rounded monotone operation, so the
bin never decreases as the score grows within a row; a higher bin means a strictly
higher score, and equal bins are settled by comparing the scores themselves. Equal
scores (``-0.0`` and ``+0.0`` too) get equal bins, and the correct items' bins are read
back from the same array, so nothing depends on how the arithmetic was vectorised.

Per matrix element that is eight streaming passes over buffers that stay in the CPU's
cache (row maximum, subtract, multiply, maximum, add-and-convert to int32, bincount, the
candidate flag lookup, its nonzero), a few ns on one core, against the O(log G)
data-dependent compares and scattered index traffic per element of a full sort. Rows
whose lo..hi span is zero (all correct items at the row maximum) or not finite take
exact per-row fallbacks.
"""

from __future__ import annotations

import numpy as np
import torch

LOW_BINS = 8  # bins per row for the items below every correct item, one after another by column
ITEMS_PER_BIN = 4  # B = G / this bins over [lo, hi]: few items share a correct item's bin
FLOAT32_BIN_LIMIT = 2**23  # more bins per chunk than this: bin coordinates in float64


class Scratch:
    """Flat numpy buffers reused from chunk to chunk (fresh multi-megabyte arrays per
    chunk cost page faults comparable to the arithmetic), grown on demand."""

    def __init__(self):
        self._store: dict[str, np.ndarray] = {}

    def get(self, name: str, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape))
        buf = self._store.get(name)
        if buf is None or buf.dtype != np.dtype(dtype) or buf.size < n:
            buf = self._store[name] = np.empty(max(n, 1), dtype=dtype)
        return buf[:n].reshape(shape)

    def zeros_bool(self, n: int) -> np.ndarray:
        """A (n,) bool buffer that is all False; callers set entries and clear them again."""
        buf = self._store.get("flag")
        if buf is None or buf.size < n:
            buf = self._store["flag"] = np.zeros(n, dtype=bool)
        return buf[:n]


def chunk_positions(x: np.ndarray, hi: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    scratch: Scratch | None = None) -> np.ndarray:
    """0-based ranked positions of the correct items of a chunk of queries.

    x (c, G) C-contiguous float32 or float64 scores without NaN; hi (c,) the row maxima;
    rows, cols (p,) the chunk row (ascending, every row present) and gallery column of
    each correct item. Returns (p,) int64 positions in the stable descending order.
    """
    scratch = scratch or Scratch()
    c, g = x.shape
    vals = x[rows, cols]  # (p,) the correct items' scores
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    lo = np.minimum.reduceat(vals, starts)  # (c,) lowest correct score per row
    n_bins = max(16, g // ITEMS_PER_BIN)
    with np.errstate(all="ignore"):
        span = hi.astype(np.float64) - lo
        # The scale must be finite in the arithmetic's own type (float32 for float32 scores).
        binnable = np.isfinite(span) & (span > 0) & np.isfinite((n_bins / span).astype(x.dtype))
    if binnable.all():
        return _binned_positions(x, hi, lo, rows, cols, vals, scratch)
    out = np.empty(len(rows), dtype=np.int64)
    ok = binnable[rows]
    if binnable.any():
        keep = np.flatnonzero(binnable)
        remap = np.cumsum(binnable) - 1  # chunk row -> row among the binnable ones
        out[ok] = _binned_positions(np.ascontiguousarray(x[keep]), hi[keep], lo[keep], remap[rows[ok]],
                                    cols[ok], vals[ok], scratch)
    for r in np.flatnonzero(~binnable):
        sel = rows == r
        out[sel] = exact_row_positions(x[r], cols[sel], tied_top=bool(lo[r] == hi[r]))
    return out


def exact_row_positions(row: np.ndarray, cols: np.ndarray, *, tied_top: bool = False) -> np.ndarray:
    """Positions of the items ``cols`` in one row: for rows the bins cannot take.

    tied_top: every item of ``cols`` scores the row maximum, so nothing ranks above it and
    a position is the number of maxima at lower columns (one pass). Otherwise a stable
    argsort of the row (infinite scores, spans too small for a finite bin scale).
    """
    if tied_top:
        return np.cumsum(row == row[cols[0]])[cols] - 1
    order = np.argsort(-row, kind="stable")  # -0.0 and +0.0 compare equal, like the scores
    rank = np.empty(len(row), dtype=np.int64)
    rank[order] = np.arange(len(row))
    return rank[cols]


def _bins(x, hi, lo, scratch: Scratch):
    """(c, G) int32 bin numbers of a chunk, with the row stride ``width`` of the bins."""
    c, g = x.shape
    n_bins = max(16, g // ITEMS_PER_BIN)
    width = LOW_BINS + n_bins + 2  # L bins below lo, B + 1 over [lo, hi], one for rounding
    # Bin numbers r * width + b must stay exactly representable apart: float32 below 2**23.
    work = np.float64 if (x.dtype == np.float64 or c * width >= FLOAT32_BIN_LIMIT) else np.float32
    lo_w = lo.astype(work)[:, None]  # (c, 1); exact: lo is one of the row's scores
    scale = (n_bins / (hi.astype(np.float64) - lo)).astype(work)[:, None]  # (x - lo) * scale <= ~B
    base = (np.arange(c) * width + LOW_BINS).astype(work)[:, None]  # lo's bin number
    floor = -1.0 - (np.arange(g) % LOW_BINS).astype(work)  # (G,): lower scores spread over L bins
    coords = scratch.get("coords", (c, g), work)
    np.subtract(x, lo_w, out=coords)
    np.multiply(coords, scale, out=coords)
    np.maximum(coords, floor, out=coords)
    bins = scratch.get("bins", (c, g), np.int32)
    np.add(coords, base, out=bins, casting="unsafe")  # >= 0: truncation is floor
    return bins, width


def _binned_positions(x, hi, lo, rows, cols, vals, scratch: Scratch) -> np.ndarray:
    """``chunk_positions`` for rows whose span lo..hi is finite and positive."""
    c, g = x.shape
    bins, width = _bins(x, hi, lo, scratch)
    flat_bins = bins.reshape(-1)
    bins_t = torch.from_numpy(flat_bins)  # torch counts and gathers int32 indices without widening them
    hist = torch.bincount(bins_t, minlength=c * width).numpy()  # (c * width,) int64
    at_most = hist.reshape(c, width).cumsum(axis=1)  # (c, width): items in local bins <= b
    pos_bins = bins[rows, cols]  # (p,) global bin numbers of the correct items
    positions = at_most[rows, -1] - at_most.reshape(-1)[pos_bins]  # items in strictly higher bins

    # The items that share a bin with a correct item of their row (the correct ones too).
    flag = scratch.zeros_bool(c * width)
    flag[pos_bins] = True
    is_cand = scratch.get("cand", (c * g,), bool)
    torch.index_select(torch.from_numpy(flag), 0, bins_t, out=torch.from_numpy(is_cand))
    flag[pos_bins] = False
    cand = np.flatnonzero(is_cand)  # (n,) flat ids r * G + col
    return positions + _same_bin_before(cand, flat_bins[cand], x.reshape(-1)[cand], g, pos_bins, vals, cols)


def _same_bin_before(cand, cand_bins, cand_vals, g, pos_bins, vals, cols) -> np.ndarray:
    """(p,) for each correct item, the candidates in its bin that rank before it:
    a higher score, or an equal one at a lower column."""
    order = np.argsort(pos_bins, kind="stable")
    sorted_bins = pos_bins[order]
    left = np.searchsorted(sorted_bins, cand_bins, side="left")
    mult = np.searchsorted(sorted_bins, cand_bins, side="right") - left  # >= 1 correct items per bin
    if bool((mult == 1).all()):
        pair_pos = order[left]  # (n,) the correct item each candidate is compared with
        pair_cand = np.arange(len(cand))
    else:  # several correct items in one bin: every (candidate, correct item) pair
        pair_cand = np.repeat(np.arange(len(cand)), mult)
        offset = np.arange(len(pair_cand)) - np.repeat(np.cumsum(mult) - mult, mult)
        pair_pos = order[np.repeat(left, mult) + offset]
    v, t = cand_vals[pair_cand], vals[pair_pos]
    before = (v > t) | ((v == t) & (cand[pair_cand] % g < cols[pair_pos]))
    return np.bincount(pair_pos[before], minlength=len(pos_bins))
