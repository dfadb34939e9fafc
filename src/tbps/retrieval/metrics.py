"""Retrieval metrics for text-based person search: R@k, mAP and mINP (as IRRA's ``rank``).

For every query the whole gallery is ranked by similarity, descending; among equal
scores the lower gallery index comes first (the order of a stable descending sort,
``np.argsort(-sim, axis=1, kind="stable")`` or
``torch.argsort(sim, dim=1, descending=True, stable=True)``). With 0-based positions
``p_1 < ... < p_R`` of the R correct gallery items of a query:

- R@k  = 100 * mean over queries of [p_1 < k]
- AP   = (1/R) * sum_n n / (p_n + 1),   mAP = 100 * mean AP
- INP  = R / (p_R + 1),                 mINP = 100 * mean INP

``retrieval_metrics`` computes these without sorting the gallery: only the positions of
the correct items are needed, and ``tbps.retrieval.positions`` counts them per chunk of
queries with one histogram of the chunk's scores (a few cache-resident passes over
each matrix element, exact, ties included). ``docs/performance.md`` (section 1) has the
measurements against a numpy full sort.

Per query, AP and INP are formed from the integer positions in the same float64
operations a numpy full-sort implementation uses (AP summed term by term in rank order
by ``np.bincount``), and the means are ``np.mean``'s, so the figures are bit-identical
to a numpy full sort (``bench/eval_metrics.py`` checks that) and to
``naive_retrieval_metrics``, the torch full-argsort reference the tests check against.

Queries whose id has no item in the gallery have no defined AP: by default they raise
``MetricsError``; with ``skip_missing=True`` they are left out of every average and
counted under the extra key ``"num_skipped"``.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from tbps.retrieval.positions import Scratch, chunk_positions
from tbps.threads import torch_threads

# Bytes of working memory per (query, gallery) element of one chunk: float32 bin
# coordinates, int32 bins, a bool candidate flag, the int64 histogram and its cumsum
# (G / 4 bins a row), and a float32 copy when the rows must be converted or are strided.
# Turns a memory budget into a chunk size. The default (~31 queries at ICFG size, a few
# MB that stay in the L3 cache) was the fastest of 8, 16, 32 and 64 queries a chunk on
# this project's 2-core machine: smaller chunks pay per-chunk Python overhead, larger
# ones leave the cache.
_BYTES_PER_ELEMENT = 17
DEFAULT_MEMORY_BUDGET = 10 * 2**20  # bytes of chunk working set when chunk_size is None


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
    """(similarity, query ids, gallery ids) as torch tensors, shapes and types checked, not copied."""
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
    return sim, qids.to(torch.int64), gids.to(torch.int64)


def _exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float type scores are ranked in: float64 as is, integers (exact up to 2**53) and
    bool as float64, every other float (float16, bfloat16) through exact float32."""
    if dtype == torch.float64 or dtype == torch.bool or not dtype.is_floating_point:
        return torch.float64
    return torch.float32


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise MetricsError(f"ks must be positive integers, got {ks}")
    return ks


def _missing_error(query_ids, missing) -> MetricsError:
    rows = np.flatnonzero(np.asarray(missing))
    shown = ", ".join(f"row {int(r)} (id {int(query_ids[r])})" for r in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return MetricsError(
        f"{len(rows)} of {len(query_ids)} queries have no correct item in the gallery: "
        f"{shown}{more}; pass skip_missing=True to leave them out"
    )


def _summarise(first, ap, inp, n_queries, ks, skip_missing) -> dict:
    """The percent dict from (N,) numpy arrays of p_1, AP and INP over the N queries kept.

    Means are ``np.mean``'s (a pairwise float64 sum over the queries, divided by N),
    so equal per-query values give bit-identical figures, whoever computed them.
    """
    n = len(first)
    if n == 0:
        raise MetricsError(f"none of the {n_queries} queries has a correct item in the gallery")
    out = {f"R{k}": 100.0 * float(np.mean(first < k)) for k in ks}
    out["mAP"] = 100.0 * float(np.mean(ap))
    out["mINP"] = 100.0 * float(np.mean(inp))
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
    sim = sim.to(_exact_dtype(sim.dtype))
    qids, gids = qids.to(sim.device), gids.to(sim.device)
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
    return _summarise(first.cpu().numpy(), ap.cpu().numpy(), inp.cpu().numpy(), len(qids), ks, skip_missing)

# ---------------------------------------------------------------------- fast path


def default_chunk_size(gallery_size: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Queries per chunk so that one chunk's working set stays near ``memory_budget`` bytes."""
    return max(1, int(memory_budget) // (_BYTES_PER_ELEMENT * max(1, int(gallery_size))))


def _chunk_rows(sim: torch.Tensor, a: int, b: int, scratch: Scratch) -> np.ndarray:
    """Rows a..b of the matrix as a C-contiguous float32/float64 numpy array: a view when
    they already are one, else one copy into a reused buffer (strided rows of a transposed
    matrix, other dtypes, other devices)."""
    rows = sim[a:b]
    dtype = _exact_dtype(rows.dtype)
    if rows.device.type == "cpu" and rows.dtype == dtype and rows.is_contiguous():
        return rows.numpy()
    buf = scratch.get("rows", tuple(rows.shape), np.float64 if dtype == torch.float64 else np.float32)
    torch.from_numpy(buf).copy_(rows)
    return buf


def _correct_items(qids: np.ndarray, gids: np.ndarray):
    """Every query's correct gallery columns, flat in query order, without touching the matrix.

    Returns (n_rel (Q,), ptr (Q+1,), cols (P,)): query q's correct columns, ascending, are
    ``cols[ptr[q] : ptr[q + 1]]``.
    """
    gorder = np.argsort(gids, kind="stable")  # gallery columns grouped by id, ascending within one
    sorted_gids = gids[gorder]
    start = np.searchsorted(sorted_gids, qids, side="left")
    n_rel = np.searchsorted(sorted_gids, qids, side="right") - start
    ptr = np.zeros(len(qids) + 1, dtype=np.int64)
    np.cumsum(n_rel, out=ptr[1:])
    cols = gorder[np.repeat(start - ptr[:-1], n_rel) + np.arange(ptr[-1])]
    return n_rel, ptr, cols


def retrieval_metrics(
    similarity,
    query_ids,
    gallery_ids,
    *,
    chunk_size: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
    skip_missing: bool = False,
    threads: int | None = None,
) -> dict:
    """R@k, mAP and mINP in percent for a (Q, G) similarity matrix, in bounded memory.

    similarity: (Q, G) torch tensor (any device) or numpy array, higher = more similar
        (any real dtype; float16/bfloat16/float32 are ranked through exact float32,
        float64 as is, integers as float64). NaN raises ``MetricsError``.
    query_ids: (Q,) ints; gallery_ids: (G,) ints. A gallery item is correct for a
        query when the ids are equal.
    chunk_size: queries processed at once; None picks it from ``DEFAULT_MEMORY_BUDGET``
        (a few MB of working memory, whatever G is).
    ks: the k of R@k; the result has keys ``f"R{k}"``.
    skip_missing: queries with no correct item raise ``MetricsError`` unless this is
        True; then they are left out of all averages and counted in ``"num_skipped"``.
    threads: chunks processed at once, each on its own thread (default: torch's thread
        count); the figures do not depend on it.

    Returns ``{"R1", "R5", "R10", "mAP", "mINP"}`` (floats, percent) and, with
    skip_missing, ``"num_skipped"`` (int). Ties rank as a stable descending sort
    (lower gallery index first); equals ``naive_retrieval_metrics`` without sorting.
    """
    ks = _check_ks(ks)
    sim, qids, gids = _check_inputs(similarity, query_ids, gallery_ids)
    qids, gids = qids.cpu().numpy(), gids.cpu().numpy()
    n_q, n_g = sim.shape
    chunk_size = default_chunk_size(n_g) if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise MetricsError(f"chunk_size must be >= 1, got {chunk_size}")
    n_rel, ptr, cols = _correct_items(qids, gids)
    missing = n_rel == 0
    if missing.any() and not skip_missing:
        raise _missing_error(qids, missing)

    positions = np.empty(len(cols), dtype=np.int64)  # (P,) of every correct item, flat like cols
    local = threading.local()  # one set of scratch buffers per thread

    def chunk(a: int) -> None:
        b = min(a + chunk_size, n_q)
        kept = np.flatnonzero(~missing[a:b])  # chunk rows with a correct item
        if len(kept) == 0:
            return
        scratch = local.__dict__.setdefault("scratch", Scratch())
        x = _chunk_rows(sim, a, b, scratch)  # (c, G)
        if len(kept) < b - a:
            x = np.ascontiguousarray(x[kept])
        hi = x.max(axis=1)  # (c,) row maxima; max propagates NaN: one cheap check
        if np.isnan(hi).any():
            row = a + int(kept[np.flatnonzero(np.isnan(x).any(axis=1))[0]])
            raise MetricsError(f"similarity contains NaN (first in query row {row})")
        rows = np.repeat(np.arange(len(kept)), n_rel[a:b][kept])
        positions[ptr[a] : ptr[b]] = chunk_positions(x, hi, rows, cols[ptr[a] : ptr[b]], scratch)

    _run_chunks(chunk, range(0, n_q, chunk_size), torch.get_num_threads() if threads is None else int(threads))
    return _summarise(*_per_query(positions, n_rel, ptr, n_g), n_q, ks, skip_missing)


def _run_chunks(job, starts, threads: int) -> None:
    """job(a) for every chunk start, in order on this thread, or spread over ``threads``
    threads (numpy and torch release the GIL inside their loops). Each torch op then runs
    on one thread, so that the chunks, not the ops, share the cores."""
    if threads <= 1 or len(starts) <= 1:
        for a in starts:
            job(a)
        return
    with torch_threads(1), ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(job, starts):  # in order: the first failing chunk raises
            pass


def _per_query(positions, n_rel, ptr, n_g):
    """(p_1, AP, INP), each (N,), of the N queries with a correct item, from the positions
    of every correct item (flat, grouped by query, unordered within a query).

    AP sums n / (p_n + 1) in ascending n, one term after the other (``np.bincount`` with
    weights), like a full-sort implementation does: the same float64 value.
    """
    query = np.repeat(np.arange(len(n_rel)), n_rel)  # (P,)
    ranked = np.sort(query * (n_g + 1) + positions) - query * (n_g + 1)  # ascending within each query
    n = np.arange(1, len(ranked) + 1) - np.repeat(ptr[:-1], n_rel)  # 1-based rank among the correct
    ap = np.bincount(query, weights=n / (ranked + 1.0), minlength=len(n_rel))
    kept = n_rel > 0
    first, last = ranked[ptr[:-1][kept]], ranked[ptr[1:][kept] - 1]
    return first, ap[kept] / n_rel[kept], n_rel[kept] / (last + 1.0)


def evaluate_both(sim_t2i, text_ids, image_ids, **kwargs) -> dict:
    """Text-to-image and image-to-text metrics from one (texts, images) similarity matrix.

    Image-to-text ranks the captions for each image: the transposed matrix, ids swapped
    (its strided rows are copied chunk by chunk, never the whole matrix).
    ``kwargs`` go to ``retrieval_metrics``. Returns ``{"t2i": {...}, "i2t": {...}}``.
    """
    sim = _as_tensor(sim_t2i, "sim_t2i")
    if sim.dim() != 2:
        raise MetricsError(f"sim_t2i must be 2-D (texts, images), got shape {tuple(sim.shape)}")
    return {
        "t2i": retrieval_metrics(sim, text_ids, image_ids, **kwargs),
        "i2t": retrieval_metrics(sim.T, image_ids, text_ids, **kwargs),
    }
