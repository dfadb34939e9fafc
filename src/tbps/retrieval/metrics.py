"""Retrieval metrics for text-based person search: R@k, mAP and mINP (as IRRA's ``rank``).

For every query the whole gallery is ranked by similarity, descending; among equal
scores the lower gallery index comes first (the order of
``torch.argsort(sim, dim=1, descending=True, stable=True)``). With 0-based positions
``p_1 < ... < p_R`` of the R correct gallery items of a query:

- R@k  = 100 * mean over queries of [p_1 < k]
- AP   = (1/R) * sum_n n / (p_n + 1),   mAP = 100 * mean AP
- INP  = R / (p_R + 1),                 mINP = 100 * mean INP

``retrieval_metrics`` computes these without sorting. The position of correct item j
is #{g : s_g > s_j} + #{g < j : s_g == s_j}, so only a count is needed, per query, of
the gallery items above each correct one. Per chunk of queries (``_binned_positions``):
each row's scores from its lowest correct item to its maximum are mapped by a
monotone affine map to ~G/4 uniform bins (scores lower still to a few bins below);
one histogram of all the chunk's bins, with per-row suffix sums, counts the items in
higher bins than each correct item, and only the handful of items that share a bin
with a correct item are compared exactly, tie rule included. That is a few passes
over the chunk in float32 and int32 (subtract, scale, clamp, offset, truncate,
histogram, flag lookup), about 1-2 ns per matrix element on one CPU core; buffers are
reused from chunk to chunk. When most items score below every correct item (a good
model) only the others are binned. Rows whose scores span nothing or infinity take
exact fallbacks. ``docs/metrics.md`` has the measurements.

Per query, AP and INP are formed from the integer positions in the same float64
operations a full-sort implementation uses (AP summed term by term in rank order), and
the means are ``np.mean``'s, so the figures are bit-identical to a numpy full sort
(``bench/eval_metrics.py`` checks that) and to ``naive_retrieval_metrics``, the
reference that does the full argsort, which the tests check against.

Queries whose id has no item in the gallery have no defined AP: by default they raise
``MetricsError``; with ``skip_missing=True`` they are left out of every average and
counted under the extra key ``"num_skipped"``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Working memory per (query, gallery) element of one chunk: a float32 copy (converted
# or strided input), the float32 bin coordinates, the int32 bins, two bool masks and
# the int64 histogram with its cumsum (G / 4 bins a row). Turns a memory budget into a
# chunk size. The default budget keeps one chunk (~64 queries at ICFG size) within the
# L3 cache: larger chunks are slower, smaller ones pay Python overhead.
_BYTES_PER_ELEMENT = 18
DEFAULT_MEMORY_BUDGET = 24 * 2**20  # bytes of chunk working set when chunk_size is None
_FLOAT32_BIN_LIMIT = 2**23  # more bins per chunk than this: compute bin numbers in float64
_COMPACT_FRACTION = 0.25  # bin only the items above the lowest correct score when at most this share
_ITEMS_PER_BIN = 4  # B = G / this: few items share a correct item's bin, the histogram stays small
_LOW_BINS = 8  # bins per row for the items below every correct item


class MetricsError(ValueError):
    """Bad input to the metrics (shapes, NaN scores, queries without a correct item)."""

    user_error = True


# ----------------------------------------------------------------------------- inputs


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)  # zero copy
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as e:  # pragma: no cover - message only
        raise MetricsError(f"{name}: cannot convert {type(x).__name__} to an array ({e})") from e


def _check_inputs(similarity, query_ids, gallery_ids):
    sim = _as_tensor(similarity, "similarity")
    qids = _as_tensor(query_ids, "query_ids")
    gids = _as_tensor(gallery_ids, "gallery_ids")
    if sim.dim() != 2:
        raise MetricsError(f"similarity must be 2-D (queries, gallery), got shape {tuple(sim.shape)}")
    for name, ids in (("query_ids", qids), ("gallery_ids", gids)):
        if ids.dim() != 1:
            raise MetricsError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise MetricsError(f"{name} must hold integers, got dtype {ids.dtype}")
    if sim.shape[0] != qids.shape[0] or sim.shape[1] != gids.shape[0]:
        raise MetricsError(
            f"shape mismatch: similarity is {tuple(sim.shape)} but there are "
            f"{qids.shape[0]} query ids and {gids.shape[0]} gallery ids"
        )
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise MetricsError(f"similarity is empty: shape {tuple(sim.shape)}")
    if sim.dtype.is_complex:
        raise MetricsError(f"similarity must be real, got dtype {sim.dtype}")
    if sim.dtype == torch.bool or not sim.dtype.is_floating_point:
        sim = sim.to(torch.float64)  # integer scores: float64 is exact up to 2**53
    dev = sim.device
    return sim, qids.to(dev, torch.int64), gids.to(dev, torch.int64)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise MetricsError(f"ks must be positive integers, got {ks}")
    return ks


def _missing_error(query_ids: torch.Tensor, missing: torch.Tensor) -> MetricsError:
    rows = missing.nonzero().flatten()
    shown = ", ".join(f"row {int(r)} (id {int(query_ids[r])})" for r in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return MetricsError(
        f"{len(rows)} of {len(query_ids)} queries have no correct item in the gallery: "
        f"{shown}{more}; pass skip_missing=True to leave them out"
    )


def _summarise(first, ap, inp, n_queries, ks, skip_missing) -> dict:
    """The percent dict from (N,) tensors of p_1, AP and INP over the N queries kept.

    Means are ``np.mean``'s (a pairwise float64 sum over the queries, divided by N),
    so equal per-query values give bit-identical figures, whoever computed them.
    """
    n = len(first)
    if n == 0:
        raise MetricsError(f"none of the {n_queries} queries has a correct item in the gallery")
    out = {f"R{k}": 100.0 * float(np.mean((first < k).numpy())) for k in ks}
    out["mAP"] = 100.0 * float(np.mean(ap.to(torch.float64).numpy()))
    out["mINP"] = 100.0 * float(np.mean(inp.to(torch.float64).numpy()))
    if skip_missing:
        out["num_skipped"] = int(n_queries - n)
    return out


# ----------------------------------------------------------------------- reference


def naive_retrieval_metrics(
    similarity, query_ids, gallery_ids, *, ks: Sequence[int] = (1, 5, 10), skip_missing: bool = False
) -> dict:
    """REFERENCE implementation: full stable argsort of the (Q, G) matrix, as IRRA's ``rank``.

    Needs several times Q*G*8 bytes (the int64 sort indices alone are 3 GB at ICFG
    size). Use ``retrieval_metrics``; this exists to check it. Same arguments and
    result as ``retrieval_metrics``.
    """
    ks = _check_ks(ks)
    sim, qids, gids = _check_inputs(similarity, query_ids, gallery_ids)
    if torch.isnan(sim).any():
        raise MetricsError("similarity contains NaN")
    order = torch.argsort(sim, dim=1, descending=True, stable=True)  # (Q, G) int64
    matches = gids[order] == qids[:, None]  # (Q, G) bool, in rank order
    del order
    num_rel = matches.sum(1)  # (Q,)
    missing = num_rel == 0
    if missing.any() and not skip_missing:
        raise _missing_error(qids, missing)
    matches = matches[~missing]
    num_rel = num_rel[~missing].to(torch.float64)
    cmc = matches.cumsum(1, dtype=torch.int32)  # (N, G): correct items within the top p+1
    rows, pos = matches.nonzero(as_tuple=True)  # every correct item: query row, 0-based position
    prec = cmc[rows, pos].to(torch.float64) / (pos + 1).to(torch.float64)
    ap = torch.zeros(len(num_rel), dtype=torch.float64).index_add_(0, rows, prec) / num_rel
    last = torch.zeros(len(num_rel), dtype=torch.int64).scatter_reduce_(0, rows, pos, "amax")
    inp = num_rel / (last + 1).to(torch.float64)
    first = matches.to(torch.uint8).argmax(1)  # first True
    return _summarise(first.cpu(), ap.cpu(), inp.cpu(), len(qids), ks, skip_missing)


# ---------------------------------------------------------------------- fast path


class _Buffers:
    """Flat scratch tensors reused from chunk to chunk, grown on demand.

    A fresh multi-megabyte tensor per step of every chunk costs page faults that,
    at ICFG size, took longer than the arithmetic itself.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._store: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._store.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = self._store[name] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n]


def _flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """(n,) int64 flat indices of the True entries of a contiguous bool tensor."""
    if mask.device.type == "cpu":  # numpy's is several times faster than torch.nonzero on CPU
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.view(-1).nonzero().squeeze(1)


def _exact_positions(chunk: torch.Tensor, col_tab: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Positions by direct comparison, O(G * R) per row: for rows with infinite score spans."""
    g = chunk.shape[1]
    arange_g = torch.arange(g, device=chunk.device)
    out = torch.zeros(col_tab.shape, dtype=torch.int64, device=chunk.device)
    for i in range(chunk.shape[0]):
        s, j = chunk[i], col_tab[i][valid[i]]  # (G,), (R,)
        u = s[j][:, None]  # (R, 1)
        before = (s[None, :] > u) | ((s[None, :] == u) & (arange_g[None, :] < j[:, None]))
        out[i, : len(j)] = before.sum(1)
    return out


def _tied_top_positions(chunk: torch.Tensor, col_tab: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Rows whose correct items all score the row maximum ``hi`` (c, 1): nothing scores
    higher, so a correct item's position is the number of maxima at lower indices."""
    at_or_before = (chunk == hi).cumsum(1)  # (c, G) int64: maxima at index <= g
    return at_or_before.gather(1, col_tab) - 1


def _positive_positions(
    chunk: torch.Tensor, col_tab: torch.Tensor, valid: torch.Tensor, hi: torch.Tensor, bufs: _Buffers | None = None
) -> torch.Tensor:
    """0-based ranked positions of the correct items of each query in a chunk.

    chunk (c, G) contiguous float32/float64 scores, no NaN; col_tab (c, R) gallery
    columns of the correct items, valid (c, R) which entries are real (each row has at
    least one); hi (c, 1) the row maxima. Returns (c, R) int64 positions; entries that
    are not valid are meaningless. Rows are binned (``_binned_positions``) unless their
    scores between the lowest correct item and the maximum span nothing or infinity.
    """
    bufs = bufs or _Buffers(chunk.device)
    val_tab = chunk.gather(1, col_tab)  # (c, R) scores of the correct items
    lo = val_tab.masked_fill(~valid, float("inf")).amin(1, keepdim=True)  # (c, 1)
    span = hi - lo  # (c, 1), >= 0 (NaN for inf - inf)
    scale = max(16, chunk.shape[1] // _ITEMS_PER_BIN) / span  # the bins' scale, inf for too small a span
    binnable = (torch.isfinite(span) & (span > 0) & torch.isfinite(scale)).squeeze(1)  # (c,)
    if bool(binnable.all()):
        return _binned_positions(chunk, col_tab, valid, val_tab, lo, hi, bufs)
    out = torch.zeros(col_tab.shape, dtype=torch.int64, device=chunk.device)
    tied = (hi == lo).squeeze(1)  # constant rows, or every correct item at the maximum
    rest = ~binnable & ~tied  # infinite spans
    for rows, how in ((binnable, "bins"), (tied, "ties"), (rest, "exact")):
        if not bool(rows.any()):
            continue
        r = rows.nonzero().flatten()
        if how == "bins":
            out[r] = _binned_positions(chunk[r], col_tab[r], valid[r], val_tab[r], lo[r], hi[r], bufs)
        elif how == "ties":
            out[r] = _tied_top_positions(chunk[r], col_tab[r], hi[r])
        else:
            out[r] = _exact_positions(chunk[r], col_tab[r], valid[r])
    return out


def _bin_coords(x, lo, scale, base, floor=None, out=None) -> torch.Tensor:
    """Bin coordinates ``base + max((x - lo) * scale, floor)``; their floor() is the bin.

    For x >= lo each step is one correctly rounded monotone operation, so the coordinate
    never decreases as x grows within a row, and the same score gives the same
    coordinate whatever the layout (a (c, G) chunk with (c, 1) parameters, a (c, R)
    table with (c, 1) ones, or a flat (n,) list with (n,) ones). Scores below lo land
    in [base + floor, base): ``floor`` (1, G) holds -1 .. -L by column, which spreads
    them over L bins, since counting one bin again and again is several times slower.
    """
    d = torch.sub(x, lo) if out is None else torch.sub(x, lo, out=out)
    d.mul_(scale)
    if floor is None:  # every x >= lo: the clamp only guards the layout
        d.clamp_(min=-1.0)
    else:
        torch.maximum(d, floor, out=d)
    return d.add_(base)


def _binned_positions(chunk, col_tab, valid, val_tab, lo, hi, bufs: _Buffers) -> torch.Tensor:
    """Positions by one histogram per row (same arguments as ``_positive_positions``,
    plus val_tab (c, R) the correct items' scores and lo (c, 1) the lowest of them).

    The position of correct item j is #{g : s_g > s_j} + #{g < j : s_g == s_j} (the
    stable descending argsort order). Each row's scores [lo, hi] are mapped to B uniform
    bins (lower scores to one bin below them), the bin being a monotone function of the
    score: an item in a higher bin than s_j ranks before j, one in a lower bin after it,
    and the suffix sums of a per-row histogram count those. Only the few items sharing
    a bin with a correct item are compared exactly, with the tie rule. All rows share
    one histogram: row r's bins are r * width + (0 .. B + 2).
    """
    c, g = chunk.shape
    dev = chunk.device
    n_bins = max(16, g // _ITEMS_PER_BIN)
    width = _LOW_BINS + n_bins + 2  # L bins below lo, then B + 1 over [lo, hi], one for rounding
    # Coordinates must stay exact integers apart in the float type: float32 below 2**23.
    work = torch.float64 if c * width >= _FLOAT32_BIN_LIMIT else chunk.dtype
    lo = lo.to(work)
    scale = n_bins / (hi.to(work) - lo)  # (c, 1); (x - lo) * scale <= B (1 + 2 eps)
    row_base = torch.arange(c, device=dev)[:, None] * width  # (c, 1) int64
    base = (row_base + _LOW_BINS).to(work)  # lo's coordinate

    # Items below every correct item rank after all of them and count for nothing;
    # with a good model they are most of the row, and then only the others are binned
    # (a flat list). Decided on a sample of columns: it changes the speed, not the result.
    sample = chunk[:, :: max(1, g // 512)]
    compact = int(torch.count_nonzero(sample >= lo)) <= _COMPACT_FRACTION * sample.numel()
    if compact:
        keep = torch.ge(chunk, lo, out=bufs.get("keep", c * g, torch.bool).view(c, g))
        flat = _flatnonzero(keep)  # (n,) ids r * G + g, ascending
        item_r = flat // g
        values = chunk.view(-1).take(flat)  # (n,)
        coords = _bin_coords(values, *(t.view(-1).index_select(0, item_r) for t in (lo, scale, base)))
    else:
        flat = values = None
        floor = -1.0 - torch.arange(g, device=dev, dtype=work).remainder_(_LOW_BINS)  # (G,): -1 .. -L
        coords = _bin_coords(chunk, lo, scale, base, floor, out=bufs.get("coords", c * g, work).view(c, g))
        coords = coords.view(-1)
    bins = bufs.get("bins", len(coords), torch.int32).copy_(coords)  # truncation == floor: coords >= 0
    bin_tab = _bin_coords(val_tab, lo, scale, base).to(torch.int64)  # (c, R) same arithmetic, same bins

    hist = torch.bincount(bins, minlength=c * width)  # (c * width,) int64
    at_most = hist.view(c, width).cumsum(1)  # (c, width): #{binned g : local bin <= b}
    positions = at_most[:, -1:] - at_most.gather(1, bin_tab - row_base)  # items in strictly higher bins

    # Items sharing a bin with a correct item of their row: compare exactly.
    flag = torch.zeros(c * width, dtype=torch.bool, device=dev)
    flag[bin_tab.masked_select(valid)] = True
    is_cand = torch.index_select(flag, 0, bins, out=bufs.get("cand", len(bins), torch.bool))
    idx = _flatnonzero(is_cand)  # (n,) into the binned items
    ids = idx if flat is None else flat.take(idx)  # flat ids r * G + g
    cand_r = ids // g
    cand_g = ids - cand_r * g
    cand_b = bins.take(idx).to(torch.int64)
    cand_v = chunk.view(-1).take(ids)
    r_max = col_tab.shape[1]
    step = max(1, (c * g) // r_max)  # bound the (n, R) comparison table to c * G
    for a in range(0, len(cand_r), step):
        r, gg, b = cand_r[a : a + step], cand_g[a : a + step], cand_b[a : a + step]
        v = cand_v[a : a + step][:, None]  # (n, 1)
        u, j = val_tab.index_select(0, r), col_tab.index_select(0, r)  # (n, R)
        before = (v > u) | ((v == u) & (gg[:, None] < j))
        before &= bin_tab.index_select(0, r) == b[:, None]
        positions.index_add_(0, r, before.to(torch.int64))
    return positions


def default_chunk_size(gallery_size: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Queries per chunk so that one chunk's working set stays near ``memory_budget`` bytes."""
    return max(1, int(memory_budget) // (_BYTES_PER_ELEMENT * max(1, int(gallery_size))))


def retrieval_metrics(
    similarity,
    query_ids,
    gallery_ids,
    *,
    chunk_size: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
    skip_missing: bool = False,
) -> dict:
    """R@k, mAP and mINP in percent for a (Q, G) similarity matrix, in bounded memory.

    similarity: (Q, G) torch tensor or numpy array, higher = more similar (any float
        dtype; float16/bfloat16/float32 are ranked through exact float32, float64 as is,
        integers as float64). NaN raises ``MetricsError``.
    query_ids: (Q,) ints; gallery_ids: (G,) ints. A gallery item is correct for a
        query when the ids are equal.
    chunk_size: queries processed at once; None picks it from ``DEFAULT_MEMORY_BUDGET``
        (about 24 MB of working memory, whatever G is).
    ks: the k of R@k; the result has keys ``f"R{k}"``.
    skip_missing: queries with no correct item raise ``MetricsError`` unless this is
        True; then they are left out of all averages and counted in ``"num_skipped"``.

    Returns ``{"R1", "R5", "R10", "mAP", "mINP"}`` (floats, percent) and, with
    skip_missing, ``"num_skipped"`` (int). Ties rank as a stable descending argsort
    (lower gallery index first); equals ``naive_retrieval_metrics`` without sorting.
    """
    ks = _check_ks(ks)
    sim, qids, gids = _check_inputs(similarity, query_ids, gallery_ids)
    n_q, n_g = sim.shape
    if chunk_size is None:
        chunk_size = default_chunk_size(n_g)
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise MetricsError(f"chunk_size must be >= 1, got {chunk_size}")

    # Correct gallery columns of every query without touching the matrix: gallery
    # indices grouped by id; query q's correct items are gorder[start[q] : start[q] + n_rel[q]].
    gorder = torch.argsort(gids, stable=True)
    sorted_gids = gids[gorder]
    start = torch.searchsorted(sorted_gids, qids)
    n_rel_all = torch.searchsorted(sorted_gids, qids, right=True) - start  # (Q,)
    missing = n_rel_all == 0
    if bool(missing.any()) and not skip_missing:
        raise _missing_error(qids, missing)

    bufs = _Buffers(sim.device)
    per_query = ([], [], [])  # per chunk: p_1, AP, INP of its queries
    for a in range(0, n_q, chunk_size):
        keep = ~missing[a : a + chunk_size]
        if not bool(keep.any()):
            continue
        chunk = sim[a : a + chunk_size]  # (c, G) view
        if not bool(keep.all()):
            chunk = chunk[keep]
        # float16/bfloat16 rank exactly in float32 (and CPU half math is slow); rows of
        # a transposed matrix (i2t) are strided: both are copied into a reused buffer.
        dtype = torch.float64 if chunk.dtype == torch.float64 else torch.float32
        if chunk.dtype != dtype or not chunk.is_contiguous():
            chunk = bufs.get("scores", chunk.numel(), dtype).view(chunk.shape).copy_(chunk)
        hi = chunk.amax(1, keepdim=True)  # (c, 1); amax propagates NaN: one cheap check
        if torch.isnan(hi).any():
            row = a + int(keep.nonzero().flatten()[torch.isnan(chunk).any(1)][0])
            raise MetricsError(f"similarity contains NaN (first in query row {row})")
        n_rel = n_rel_all[a : a + chunk_size][keep]  # (c,)
        r_max = int(n_rel.max())
        slots = torch.arange(r_max, device=sim.device)
        valid = slots[None, :] < n_rel[:, None]  # (c, R)
        idx = (start[a : a + chunk_size][keep][:, None] + slots).clamp_(max=n_g - 1)
        col_tab = gorder.take(idx)  # (c, R); invalid slots point at some real column

        positions = _positive_positions(chunk, col_tab, valid, hi, bufs)
        for acc, t in zip(per_query, _per_query(positions, n_rel, valid, n_g)):
            acc.append(t.cpu())
    first, ap, inp = (torch.cat(acc) if acc else torch.zeros(0) for acc in per_query)
    return _summarise(first, ap, inp, n_q, ks, skip_missing)


def _per_query(positions, n_rel, valid, n_g):
    """(p_1, AP, INP) per query, each (c,), from the (c, R) unordered positions.

    AP sums n / (p_n + 1) in ascending n, one term after the other (a cumsum), like a
    per-query loop or ``np.bincount(rows, weights)`` would: the same float64 value.
    """
    positions = positions.masked_fill(~valid, n_g).sort(1).values  # ascending, padding last
    rank_n = torch.arange(1, positions.shape[1] + 1, device=positions.device, dtype=torch.float64)
    terms = (rank_n / (positions + 1).to(torch.float64)) * valid  # (c, R); padding adds +0.0
    n_rel_f = n_rel.to(torch.float64)
    ap = terms.cumsum(1)[:, -1] / n_rel_f
    last = positions.gather(1, (n_rel - 1)[:, None]).squeeze(1)
    inp = n_rel_f / (last + 1).to(torch.float64)
    return positions[:, 0], ap, inp


def evaluate_both(sim_t2i, text_ids, image_ids, **kwargs) -> dict:
    """Text-to-image and image-to-text metrics from one (texts, images) similarity matrix.

    Image-to-text ranks the captions for each image: the transposed matrix, ids swapped.
    ``kwargs`` go to ``retrieval_metrics``. Returns ``{"t2i": {...}, "i2t": {...}}``.
    """
    sim = _as_tensor(sim_t2i, "sim_t2i")
    if sim.dim() != 2:
        raise MetricsError(f"sim_t2i must be 2-D (texts, images), got shape {tuple(sim.shape)}")
    return {
        "t2i": retrieval_metrics(sim, text_ids, image_ids, **kwargs),
        "i2t": retrieval_metrics(sim.T, image_ids, text_ids, **kwargs),
    }
