"""Approximate nearest-neighbour structures (faiss, imported only here and only when used).

The ANN structure is a *candidate generator*; the store rescores the candidates exactly
against the memory-mapped features, so the scores a user sees are always exact inner
products. Labels: IVF stores the stable item ids; HNSW labels are feature rows (it is
built in row order and only ever appended to, and ``IndexIDMap`` would add an OpenMP
region per search that costs milliseconds on a busy machine), see ``LABELS``.

Mode by gallery size (``mode="auto"``): exact search below ``EXACT_MAX`` items (a matrix
product over at most ~100 MB is fast and exact), IVF beyond (8-bit codes; supports
add/remove; retrained when the gallery has grown 4x since training). HNSW only when asked
for: in ``bench/search_latency.py`` at 100k items it was no faster than IVF at a lower
recall (0.993 vs 1.000) and took 7x longer to build, and it cannot delete (rebuilt after
removals). IVF-PQ (``ivfpq``) only when asked for: product-quantised codes of ``d/8`` bytes
per item (64 B at 512-d, against 512 B for IVF's 8-bit codes and 2 KB for the float32
features), for galleries whose codes must fit in RAM (10^7 items: ~0.7 GB). Its candidates
are re-scored exactly against the float32 features, which stay memory-mapped on disk.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tbps.index.errors import IndexInputError

MODES = ("auto", "exact", "ivf", "ivfpq", "hnsw")
EXACT_MAX = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 128
IVF_NPROBE_FRACTION = 1 / 64  # of nlist, at least IVF_MIN_NPROBE
IVF_MIN_NPROBE = 32
IVF_TRAIN_PER_LIST = 40
IVF_KMEANS_ITERS = 10  # faiss default is 25; 10 gives the same recall here at 40% of the time
PQ_DIMS_PER_CODE = 8  # IVF-PQ: one byte per 8 dimensions (m = d/8 sub-quantizers of 256 centroids)
PQ_MIN_NPROBE = 16
PQ_TRAIN_MIN = 65_536  # PQ codebooks want ~256 * 39 points at least; more costs little
PQ_RESCORE = 128  # candidates re-scored exactly per query (at least 8k): PQ distances are coarse


LABELS = {"ivf": "id", "ivfpq": "id", "hnsw": "row"}  # what faiss labels mean, per mode


def choose_mode(n: int, requested: str = "auto") -> str:
    """The search structure for a gallery of ``n`` items ("exact", "ivf" or "hnsw")."""
    if requested not in MODES:
        raise IndexInputError(f"unknown search mode {requested!r}; choose one of {', '.join(MODES)}")
    if requested != "auto":
        return requested
    return "exact" if n < EXACT_MAX else "ivf"


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise IndexInputError(
            "approximate search needs faiss: pip install faiss-cpu (or tbps[serve])"
        ) from e
    return faiss


def default_params(mode: str, n: int) -> dict[str, Any]:
    """Build/search parameters for ``mode`` at gallery size ``n``."""
    if mode == "ivf":
        # ~2*sqrt(n) lists, each with >= 39 training points (faiss' own minimum).
        nlist = max(1, min(int(2 * math.sqrt(max(n, 1))), max(1, n // 39)))
        nprobe = min(nlist, max(IVF_MIN_NPROBE, int(round(nlist * IVF_NPROBE_FRACTION))))
        return {"nlist": nlist, "nprobe": nprobe, "trained_on": n}
    if mode == "ivfpq":
        return _ivfpq_params(n)
    if mode == "hnsw":
        return {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
    return {}


def _ivfpq_params(n: int) -> dict[str, Any]:
    """~sqrt(n) lists (a coarser split than IVF's: assigning 10^7 items to the lists is the
    build's main cost), nprobe ~ nlist/64 (at least 16); PQ with 8-bit codes unless the
    gallery is too small to train 256 centroids."""
    nlist = max(1, min(int(math.sqrt(max(n, 1))), max(1, n // 39)))
    nprobe = min(nlist, max(PQ_MIN_NPROBE, int(round(nlist / 64))))
    nbits = max(1, min(8, int(math.log2(max(n, 2)))))
    return {"nlist": nlist, "nprobe": nprobe, "nbits": nbits, "rescore": PQ_RESCORE, "trained_on": n}


def pq_subquantizers(d: int) -> int:
    """m for IVF-PQ: ``d / PQ_DIMS_PER_CODE`` rounded down to a divisor of d (64 at 512-d)."""
    m = max(1, d // PQ_DIMS_PER_CODE)
    while d % m:
        m -= 1
    return m


def candidates(mode: str, depth: int, params: dict[str, Any]) -> int:
    """How many candidates the structure proposes for the exact re-scoring of a top-``depth``:
    3x (at least 50) for the near-exact 8-bit IVF codes and HNSW, more for the coarse PQ codes."""
    if mode == "ivfpq":
        return max(8 * depth, int(params.get("rescore", PQ_RESCORE)))
    return max(3 * depth, 50)


def build(mode: str, feats: np.ndarray, ids: np.ndarray, params: dict[str, Any], chunk: int = 65536):
    """Build a faiss index over ``feats`` (N, D) float32 labelled by ``ids`` (N,) int64."""
    faiss = _faiss()
    n, d = feats.shape
    if mode == "ivf":
        # IVF lists of 8-bit scalar-quantised codes: a quarter of the bytes of the features
        # to scan per list; the store's exact rescoring of the candidates undoes the rounding.
        index = faiss.index_factory(d, f"IVF{int(params['nlist'])},SQ8", faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.niter = IVF_KMEANS_ITERS
        # Train on an evenly spaced sample (k-means needs ~40 points per list).
        n_train = min(n, IVF_TRAIN_PER_LIST * int(params["nlist"]))
        sample = np.ascontiguousarray(feats[np.linspace(0, n - 1, n_train).astype(np.int64)], dtype=np.float32)
        index.train(sample)
    elif mode == "ivfpq":
        index = _train_ivfpq(faiss, feats, params)
    elif mode == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["ef_construction"])
    else:
        raise ValueError(f"no ANN structure for mode {mode!r}")
    add(index, feats, ids, chunk=chunk)
    return index


def _train_ivfpq(faiss, feats: np.ndarray, params: dict[str, Any]):
    """An empty, trained ``IVF{nlist},PQ{m}x{nbits}`` (inner product, codes of residuals; no
    polysemous training, which took 15x the rest of the training and serves Hamming filtering, unused here)."""
    n, d = feats.shape
    nlist, nbits = int(params["nlist"]), int(params["nbits"])
    index = faiss.index_factory(d, f"IVF{nlist},PQ{pq_subquantizers(d)}x{nbits}np", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.niter = IVF_KMEANS_ITERS
    ivf.pq.cp.niter = IVF_KMEANS_ITERS
    ivf.pq.cp.min_points_per_centroid = 1  # small galleries: fewer points than faiss' advice is fine
    n_train = min(n, max(IVF_TRAIN_PER_LIST * nlist, PQ_TRAIN_MIN))
    # An evenly spaced sample of the (memory-mapped) features.
    rows = np.linspace(0, n - 1, n_train).astype(np.int64)
    index.train(np.ascontiguousarray(feats[rows], dtype=np.float32))
    return index


def add(index, feats: np.ndarray, ids: np.ndarray, chunk: int = 65536) -> None:
    """Add rows ``feats`` (N, D) with item ids ``ids`` (N,), streaming from a memmap in chunks.

    HNSW labels rows by insertion order: the caller appends the rows that follow the last one."""
    for s in range(0, len(ids), chunk):
        block = np.ascontiguousarray(feats[s : s + chunk], dtype=np.float32)
        if hasattr(index, "hnsw"):
            index.add(block)
        else:
            index.add_with_ids(block, np.ascontiguousarray(ids[s : s + chunk], dtype=np.int64))


def remove(index, ids: np.ndarray) -> None:
    """Remove labels ``ids`` from an IVF index (HNSW cannot delete: rebuild it instead)."""
    faiss = _faiss()
    if len(ids):
        index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))


def write(index, path) -> None:
    _faiss().write_index(index, str(path))


def read(path):
    """Load a faiss structure into memory. (faiss can memory-map IVF lists, but searching
    them that way measured 3-5x slower; the structure is a fraction of the features' size.)"""
    return _faiss().read_index(str(path))


def search(index, mode: str, queries: np.ndarray, n_cand: int, params: dict[str, Any],
           allowed: np.ndarray | None = None) -> np.ndarray:
    """Candidate labels (Q, n_cand) int64 for ``queries`` (Q, D); -1 pads missing candidates.

    Labels are item ids or rows (``LABELS[mode]``); ``allowed`` (sorted int64, same kind)
    restricts the search to those items (a filter).
    """
    faiss = _faiss()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    sel = None
    if allowed is not None:
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    if mode in ("ivf", "ivfpq"):
        sp = faiss.SearchParametersIVF(nprobe=int(params["nprobe"]))
        if sel is not None:
            sp.sel = sel
    elif mode == "hnsw":
        sp = faiss.SearchParametersHNSW(efSearch=max(int(params["ef_search"]), n_cand))
        if sel is not None:
            sp.sel = sel
    else:
        raise ValueError(f"no ANN structure for mode {mode!r}")
    if len(q) > 4:
        _, labels = index.search(q, n_cand, params=sp)
        return labels
    # A few queries: one thread. faiss' OpenMP regions cost more than they save here, and
    # on a busy machine waiting for the second thread costs milliseconds. (Per-thread
    # setting in OpenMP, so concurrent server threads do not affect each other.)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        _, labels = index.search(q, n_cand, params=sp)
    finally:
        faiss.omp_set_num_threads(before)
    return labels
