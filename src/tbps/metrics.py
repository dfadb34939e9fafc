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

# Working memory per (query, gallery) element of one chunk in the fast path: an int64
# key, the int64 searchsorted result, a float32 copy and the bool positive mask, with
# slack for temporaries. Used to turn a memory budget into a chunk size.
_BYTES_PER_ELEMENT = 40
DEFAULT_MEMORY_BUDGET = 128 * 2**20  # bytes of chunk working set when chunk_size is None


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


def _order_keys(chunk: torch.Tensor) -> torch.Tensor:
    """(c, G) float32 scores -> (c, G) int64 keys, all distinct within a row, whose
    descending order is the stable descending argsort order: score first, then lower
    gallery index first."""
    g = chunk.shape[1]
    chunk = (chunk + 0.0).contiguous()  # -0.0 + 0.0 == +0.0, so both zeros get one key
    bits = chunk.view(torch.int32)
    # IEEE floats order like sign-magnitude integers: flip the magnitude bits of
    # negatives to get an order-preserving two's-complement int32.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    tiebreak = torch.arange(g - 1, -1, -1, device=chunk.device, dtype=torch.int64)  # (G,)
    # |bits| < 2**31 and G < 2**31, so bits * G + tiebreak fits in int64.
    return bits.to(torch.int64).mul_(g).add_(tiebreak)


def _count_greater(values: torch.Tensor, thresholds: torch.Tensor, *, or_equal: bool = False) -> torch.Tensor:
    """#{g : values[i, g] > thresholds[i, t]} (>= with or_equal) for every t, in O(G log T) per row.

    values (c, G); thresholds (c, T) sorted ascending per row; returns (c, T) int64.
    """
    c, t = thresholds.shape
    # m[i, g] = #{t : thresholds[i, t] < values[i, g]} (<= with or_equal); then
    # values[i, g] > thresholds[i, t] exactly when m[i, g] > t, even with repeated thresholds.
    m = torch.searchsorted(thresholds, values, right=or_equal)  # (c, G) int64
    m += (torch.arange(c, device=m.device) * (t + 1))[:, None]  # one histogram per row
    hist = torch.bincount(m.view(-1), minlength=c * (t + 1)).view(c, t + 1)
    del m
    at_least = hist.flip(1).cumsum(1).flip(1)  # (c, T+1): #{g : m >= t}
    return at_least[:, 1:]


def _positive_positions(chunk: torch.Tensor, pos_mask: torch.Tensor, r_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranked positions of the correct items of each query in the chunk.

    chunk (c, G) scores; pos_mask (c, G) bool. Returns (positions (c, r_max) int64
    sorted ascending, valid (c, r_max) bool); padding sorts last.
    """
    c, g = chunk.shape
    dev = chunk.device
    # Gather the correct items of each row into a padded (c, r_max) table.
    rows, cols = pos_mask.nonzero(as_tuple=True)  # row-major, so rows are grouped
    counts = pos_mask.sum(1)  # (c,)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(len(rows), device=dev) - starts[rows]  # index within its row
    valid = torch.zeros(c, r_max, dtype=torch.bool, device=dev)
    valid[rows, slot] = True
    col_tab = torch.zeros(c, r_max, dtype=torch.int64, device=dev)
    col_tab[rows, slot] = cols

    exact_keys = chunk.dtype != torch.float64
    if exact_keys:
        # float16/bfloat16/float32 fit in float32 exactly: distinct int64 keys encode
        # the tie order, so "ranks before" is just "has a greater key".
        scores = _order_keys(chunk.to(torch.float32))
        pad = torch.iinfo(torch.int64).min  # below every real key
    else:
        scores = chunk
        pad = float("-inf")
    thr = torch.full((c, r_max), pad, dtype=scores.dtype, device=dev)
    thr[rows, slot] = scores[rows, cols]
    thr, order = thr.sort(1)  # ascending, as searchsorted needs
    valid = valid.gather(1, order)
    col_tab = col_tab.gather(1, order)
    positions = _count_greater(scores, thr)  # (c, r_max): items with a strictly higher score/key

    if not exact_keys:
        # float64: equal scores are possible; items tied with a correct item rank before
        # it when their gallery index is lower. Count those only where a tie exists.
        at_least = _count_greater(scores, thr, or_equal=True)
        tied = valid & (at_least - positions > 1)
        ti, tt = tied.nonzero(as_tuple=True)
        arange_g = torch.arange(g, device=dev)
        for a in range(0, len(ti), max(c, 1)):  # bounded: at most (c, G) at a time
            i, t = ti[a : a + c], tt[a : a + c]
            before = (scores[i] == thr[i, t][:, None]) & (arange_g[None, :] < col_tab[i, t][:, None])
            positions[i, t] += before.sum(1)

    positions = positions.masked_fill(~valid, g)  # padding after every real position
    positions, order = positions.sort(1)
    return positions, valid.gather(1, order)


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

    firsts, ap_sum, inp_sum, n_skipped = [], 0.0, 0.0, 0
    for a in range(0, n_q, chunk_size):
        chunk = sim[a : a + chunk_size]  # (c, G) view
        if torch.isnan(chunk).any():
            row = a + int(torch.isnan(chunk).any(1).nonzero()[0])
            raise MetricsError(f"similarity contains NaN (first in query row {row})")
        q = qids[a : a + chunk_size]
        pos_mask = q[:, None] == gids[None, :]  # (c, G) bool
        n_rel = pos_mask.sum(1)  # (c,)
        missing = n_rel == 0
        if missing.any():
            if not skip_missing:
                full_missing = torch.zeros(n_q, dtype=torch.bool, device=sim.device)
                for b in range(a, n_q, chunk_size):  # report every missing query, not one chunk's
                    full_missing[b : b + chunk_size] = ~(qids[b : b + chunk_size, None] == gids[None, :]).any(1)
                raise _missing_error(qids, full_missing)
            n_skipped += int(missing.sum())
            keep = ~missing
            chunk, pos_mask, n_rel = chunk[keep], pos_mask[keep], n_rel[keep]
            if len(n_rel) == 0:
                continue
        positions, valid = _positive_positions(chunk, pos_mask, int(n_rel.max()))
        rank_n = valid.cumsum(1).to(torch.float64)  # n for the n-th correct item
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
