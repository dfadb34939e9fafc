"""Retrieval metrics for text-based person search: R@k, mAP and mINP (as IRRA's ``rank``).

For every query the whole gallery is ranked by similarity, descending; among equal
scores the lower gallery index comes first (the order of
``torch.argsort(sim, dim=1, descending=True, stable=True)``). With 0-based positions
``p_1 < ... < p_R`` of the R correct gallery items of a query:

- R@k  = 100 * mean over queries of [p_1 < k]
- AP   = (1/R) * sum_n n / (p_n + 1),   mAP = 100 * mean AP
- INP  = R / (p_R + 1),                 mINP = 100 * mean INP

``retrieval_metrics`` computes these without sorting: the position of a correct item
is the number of gallery items that rank before it, counted per chunk of queries
(see ``_positive_positions``). ``naive_retrieval_metrics`` is the reference that
does the full argsort; tests and ``bench/eval_metrics.py`` check one against the other.

Queries whose id has no item in the gallery have no defined AP: by default they raise
``MetricsError``; with ``skip_missing=True`` they are left out of every average and
counted under the extra key ``"num_skipped"``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Working memory per (query, gallery) element of one chunk: a float32 copy (converted
# or contiguous input), the float bin values, the int64 bin numbers and two bool masks,
# with slack. Used to turn a memory budget into a chunk size (the bench measures less).
_BYTES_PER_ELEMENT = 24
DEFAULT_MEMORY_BUDGET = 128 * 2**20  # bytes of chunk working set when chunk_size is None
_FLOAT32_BIN_LIMIT = 2**23  # more bins per chunk than this: compute bin numbers in float64
_COMPACT_FRACTION = 0.25  # bin only the items above the lowest correct score when at most this share


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


def _summarise(first, ap, inp, n_queries, n_skipped, ks, skip_missing) -> dict:
    """Turn per-query sums into the percent dict. ``first`` is a (N,) tensor of p_1."""
    n = n_queries - n_skipped
    if n == 0:
        raise MetricsError(f"none of the {n_queries} queries has a correct item in the gallery")
    out = {f"R{k}": 100.0 * float((first < k).sum()) / n for k in ks}
    out["mAP"] = 100.0 * ap / n
    out["mINP"] = 100.0 * inp / n
    if skip_missing:
        out["num_skipped"] = int(n_skipped)
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
    return _summarise(first, float(ap.sum()), float(inp.sum()), len(qids), int(missing.sum()), ks, skip_missing)


# ---------------------------------------------------------------------- fast path


def _exact_positions(chunk: torch.Tensor, col_tab: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Positions by direct comparison, O(G * r_max) per row: for rows the bins can't serve."""
    g = chunk.shape[1]
    arange_g = torch.arange(g, device=chunk.device)
    out = torch.zeros(col_tab.shape, dtype=torch.int64, device=chunk.device)
    for i in range(chunk.shape[0]):
        s, j = chunk[i], col_tab[i][valid[i]]  # (G,), (R,)
        u = s[j][:, None]  # (R, 1)
        before = (s[None, :] > u) | ((s[None, :] == u) & (arange_g[None, :] < j[:, None]))
        out[i, : len(j)] = before.sum(1)
    return out


def _positive_positions(chunk: torch.Tensor, col_tab: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """0-based ranked positions of the correct items of each query in a chunk.

    chunk (c, G) float32/float64 scores, no NaN; col_tab (c, R) gallery columns of the
    correct items, valid (c, R) which entries are real (each row has at least one).
    Returns (c, R) int64 positions; entries that are not valid are meaningless.

    The position of correct item j is #{g : s_g > s_j} + #{g < j : s_g == s_j} (the
    stable descending argsort order). Instead of sorting, each row's scores go into B
    uniform bins over [lowest correct score, row max] (lower scores go to bin 0).
    The bin is a monotone function of the score, so an item in a higher bin than s_j
    ranks before j and one in a lower bin after it: suffix sums of a per-row histogram
    count those. Only the few items sharing a bin with a correct item are compared
    exactly, with the tie rule. A handful of passes over the chunk, no sort; when
    most items score below every correct item (a good model), only the rest are binned.
    """
    c, g = chunk.shape
    dev = chunk.device
    n_bins = max(16, g // 4)  # ~4 items per bin on average: few exact comparisons
    width = n_bins + 3  # local bins 0 (below lo), 1..B+1, plus B+2 that stays empty
    val_tab = chunk.gather(1, col_tab)  # (c, R) scores of the correct items
    lo = val_tab.masked_fill(~valid, float("inf")).amin(1, keepdim=True)  # (c, 1)
    hi = chunk.amax(1, keepdim=True)  # (c, 1)
    span = hi - lo
    ok = (torch.isfinite(span) & (span > 0)).squeeze(1)  # (c,)
    if not bool(ok.all()):
        # Constant rows or infinite scores: no usable bins; compare those rows directly.
        out = torch.zeros(col_tab.shape, dtype=torch.int64, device=dev)
        bad = (~ok).nonzero().flatten()
        out[bad] = _exact_positions(chunk[bad], col_tab[bad], valid[bad])
        if bool(ok.any()):
            good = ok.nonzero().flatten()
            out[good] = _positive_positions(chunk[good], col_tab[good], valid[good])
        return out

    # Global bin = row * width + local bin, so one histogram serves every row.
    # Bin numbers must be exact integers in the float type: float32 only below 2**24.
    work = torch.float64 if c * width >= _FLOAT32_BIN_LIMIT else chunk.dtype
    scale = (n_bins / span).to(work)  # (c, 1)
    row_base = (torch.arange(c, device=dev, dtype=work) * width)[:, None]  # (c, 1)
    offset = row_base + 1 - lo.to(work) * scale  # (c, 1)

    # Items scoring below every correct item rank after all of them and count for
    # nothing; with a decent model they are most of the row (positions are small),
    # so when few remain, bin only those (a flat list) instead of the whole chunk.
    keep = chunk >= lo  # (c, G)
    n_keep = int(torch.count_nonzero(keep))  # (a bool .sum() would copy to int64 first)
    if n_keep <= _COMPACT_FRACTION * c * g:
        flat = keep.view(-1).nonzero().squeeze(1)  # (n,) flat ids r * G + g, ascending
        del keep
        item_r = flat // g
        item_g = flat - item_r * g
        values = chunk.view(-1).take(flat)  # (n,)
        per_item = [t.view(-1).index_select(0, item_r) for t in (offset, scale, row_base)]  # (n,) each
        bins = _bin_numbers(values, *per_item, n_bins)
        # Every correct item is kept (score >= lo); find it in the sorted flat ids.
        where = torch.searchsorted(flat, torch.arange(c, device=dev)[:, None] * g + col_tab)
        bin_tab = bins.take(where.clamp_(max=len(flat) - 1))  # (c, R)
        # Invalid slots may have landed in another row: put them at their row's bin 0.
        bin_tab = torch.where(valid, bin_tab, (torch.arange(c, device=dev) * width)[:, None])
    else:
        del keep
        item_r = item_g = values = None
        bins = _bin_numbers(chunk, offset, scale, row_base, n_bins)  # (c, G)
        bin_tab = bins.gather(1, col_tab)  # (c, R) global bins of the correct items

    hist = _bincount(bins.view(-1), c * width)
    at_most = hist.view(c, width).cumsum(1)  # (c, width): #{kept g : local bin <= b}
    local = bin_tab - (torch.arange(c, device=dev) * width)[:, None]
    positions = at_most[:, -1:] - at_most.gather(1, local)  # items in strictly higher bins

    # Items sharing a bin with a correct item of their row: compare exactly.
    flag = torch.zeros(c * width, dtype=torch.bool, device=dev)
    flag[bin_tab.masked_select(valid)] = True
    # (take / index_select rather than advanced indexing: the latter crawls when
    # several threads compete for few cores)
    idx = _take(flag, bins).view(-1).nonzero().squeeze(1)  # (n,) candidates
    if values is None:  # (c, G) layout: idx are flat ids r * G + g
        cand_r = idx // g
        cand_g = idx - cand_r * g
        cand_b, cand_v = bins.view(-1).take(idx), chunk.view(-1).take(idx)
    else:  # flat layout: idx index the kept items
        cand_r, cand_g, cand_b, cand_v = (t.take(idx) for t in (item_r, item_g, bins, values))
    del bins
    r_max = col_tab.shape[1]
    step = max(1, (c * g) // r_max)  # bound the (n, r_max) comparison table to c*G
    for a in range(0, len(cand_r), step):
        r, gg, b = cand_r[a : a + step], cand_g[a : a + step], cand_b[a : a + step]
        v = cand_v[a : a + step][:, None]  # (n, 1)
        u, j = val_tab.index_select(0, r), col_tab.index_select(0, r)  # (n, R)
        before = (v > u) | ((v == u) & (gg[:, None] < j))
        before &= bin_tab.index_select(0, r) == b[:, None]
        positions.index_add_(0, r, before.to(torch.int64))
    return positions


def _bin_numbers(x: torch.Tensor, offset, scale, row_base, n_bins: int) -> torch.Tensor:
    """floor(offset + x * scale) clamped to [row_base, row_base + B + 1], as int64.

    Monotone in x within a row (each rounding step is), and the clamp keeps every row
    inside its own bin range whatever the rounding did. x (c, G) with (c, 1)
    parameters, or (n,) with (n,) parameters.
    """
    d = torch.addcmul(offset, x.to(offset.dtype), scale)
    d.clamp_(min=row_base, max=row_base + n_bins + 1)
    if d.device.type == "cpu":  # numpy's cast is several times faster than torch's on CPU
        return torch.from_numpy(d.numpy().astype(np.int64))  # truncation == floor: d >= 0
    return d.to(torch.int64)


# CPU versions through numpy (same results, a few times faster on this workload).
def _bincount(x: torch.Tensor, minlength: int) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.from_numpy(np.bincount(x.numpy(), minlength=minlength).astype(np.int64, copy=False))
    return torch.bincount(x, minlength=minlength)


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if table.device.type == "cpu":
        return torch.from_numpy(table.numpy()[index.numpy()])
    return table.take(index)


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
        (about 128 MB of working memory, whatever G is).
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
    n_skipped = int(missing.sum())

    firsts, ap_sum, inp_sum = [], 0.0, 0.0
    for a in range(0, n_q, chunk_size):
        keep = ~missing[a : a + chunk_size]
        if not bool(keep.any()):
            continue
        chunk = sim[a : a + chunk_size]  # (c, G) view
        if not bool(keep.all()):
            chunk = chunk[keep]
        if chunk.dtype != torch.float64:
            chunk = chunk.to(torch.float32)  # exact for float16/bfloat16; CPU half math is slow
        chunk = chunk.contiguous()  # rows of a transposed matrix (i2t) are strided
        if torch.isnan(chunk.amax(1)).any():  # amax propagates NaN: one cheap pass
            row = a + int(keep.nonzero().flatten()[torch.isnan(chunk).any(1)][0])
            raise MetricsError(f"similarity contains NaN (first in query row {row})")
        n_rel = n_rel_all[a : a + chunk_size][keep]  # (c,)
        r_max = int(n_rel.max())
        slots = torch.arange(r_max, device=sim.device)
        valid = slots[None, :] < n_rel[:, None]  # (c, R)
        idx = (start[a : a + chunk_size][keep][:, None] + slots).clamp_(max=n_g - 1)
        col_tab = gorder.take(idx)  # (c, R); invalid slots point at some real column

        positions = _positive_positions(chunk, col_tab, valid)
        positions = positions.masked_fill(~valid, n_g).sort(1).values  # ascending, padding last
        rank_n = (slots + 1).to(torch.float64)  # n for the n-th correct item
        pos1 = (positions + 1).to(torch.float64)
        n_rel_f = n_rel.to(torch.float64)
        ap_sum += float(((rank_n / pos1) * valid).sum(1).div(n_rel_f).sum())
        last = positions.gather(1, (n_rel - 1)[:, None]).squeeze(1)
        inp_sum += float((n_rel_f / (last + 1).to(torch.float64)).sum())
        firsts.append(positions[:, 0].cpu())
    first = torch.cat(firsts) if firsts else torch.zeros(0, dtype=torch.int64)
    return _summarise(first, ap_sum, inp_sum, n_q, n_skipped, ks, skip_missing)


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
