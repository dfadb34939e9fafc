"""Re-ranking of text-to-image scores, at evaluation and search time.

Two methods, both vectorised (no Python loop over query x gallery pairs) and exact:

``jaccard``: TextReID's re-rank as its code does it (called k-reciprocal there, but with
no reciprocity check)::

    score(q, g) = cos(q, g) + alpha * |N_k(q) & N_k(g)| / |N_k(q) | N_k(g)|,

N_k(q) the top-k images of text q, N_k(g) the top-k images of image g by image-image
similarity (g itself included), k = 5, alpha = 0.05.

``kreciprocal``: a true cross-modal k-reciprocal re-rank (after Zhong et al., CVPR'17) on
the bipartite text-image graph plus the gallery's image-image graph. With d = (1 - cos) / 2:

1. Gallery images: R(g, k) = images g' in g's top-(k+1) image neighbours (self included)
   whose own top-(k+1) holds g. Texts: R*(q) = images g in q's top-k1 whose top-k1 texts
   (over all queries) hold q, plus q's top-1 image (the role of the probe itself in Zhong's).
2. Expansion: for every g in R*(x), add R(g, k1/2) when more than 2/3 of it is in R*(x).
3. Each text or image x becomes a distribution over gallery images,
   V_x[j] = exp(-d(x, j)) on its expanded set, normalised to sum 1; local query expansion
   averages V over x's k2 nearest images (a text: itself and its top k2-1 images).
4. Jaccard distance J(q, g) = 1 - sum_j min(V_q, V_g) / sum_j max(V_q, V_g), computed on the
   non-zeros only (an inverted index over images, like the reference implementation).
5. final distance = (1 - lambda) J + lambda d(q, g); the returned score is its negative.

The reciprocity of a text needs the other texts: at evaluation they are all test queries;
through :func:`index_reranker` they are the queries of one ``search`` call (one query:
every candidate is reciprocal and only the expansion and Jaccard steps act).

Memory: both methods hold (G, G) image-image matrices; re-ranking with the search index
works on each query batch's candidate set instead of the whole gallery.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

METHODS = ("none", "jaccard", "kreciprocal")


class RerankError(ValueError):
    """A re-rank cannot be applied as asked (unknown method, bad shapes or parameters)."""

    user_error = True


def _check(sim_qg: torch.Tensor, sim_gg: torch.Tensor) -> None:
    if sim_qg.ndim != 2 or sim_gg.ndim != 2 or sim_gg.shape != (sim_qg.shape[1], sim_qg.shape[1]):
        raise RerankError(f"expected sim_qg (Q, G) and sim_gg (G, G), got {tuple(sim_qg.shape)} and "
                          f"{tuple(sim_gg.shape)}")


def _topk_mask(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (N, k) indices of each row's top k and the (N, M) bool membership matrix."""
    idx = sim.topk(k, dim=1).indices
    mask = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, idx, True)
    return idx, mask


# ------------------------------------------------------------------------------ jaccard
def jaccard_rerank(sim_qg: torch.Tensor, sim_gg: torch.Tensor, k: int = 5, alpha: float = 0.05,
                   chunk: int = 512) -> torch.Tensor:
    """TextReID's re-rank: (Q, G) text-image and (G, G) image-image cosine -> (Q, G) scores."""
    _check(sim_qg, sim_gg)
    sim_qg, sim_gg = sim_qg.float(), sim_gg.float()
    g = sim_qg.shape[1]
    k = min(int(k), g)
    if k < 1:
        raise RerankError(f"jaccard re-rank needs k >= 1, got {k}")
    nn_q = sim_qg.topk(k, dim=1).indices  # (Q, k)
    _, member_g = _topk_mask(sim_gg, k)  # (G, G): member_g[g, j] = j in N_k(g)
    member_t = member_g.t().contiguous()  # (G_j, G_g)
    out = torch.empty_like(sim_qg)
    for s in range(0, sim_qg.shape[0], chunk):
        # |N_k(q) & N_k(g)| = number of q's k images that are among g's k neighbours.
        inter = member_t[nn_q[s : s + chunk]].sum(dim=1, dtype=torch.float32)  # (Qc, G)
        out[s : s + chunk] = sim_qg[s : s + chunk] + alpha * inter / (2 * k - inter)
    return out


# -------------------------------------------------------------------------- k-reciprocal
def _expand(cands: torch.Tensor, valid: torch.Tensor, half_idx: torch.Tensor, half_valid: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhong's expansion on index lists.

    cands (N, C) image indices of each row's reciprocal set with validity (N, C);
    half_idx (G, H) each image's R(g, k1/2) with validity (G, H).
    Returns the expanded sets as (N, C + C*H) indices and validity (duplicates allowed).
    """
    n, c = cands.shape
    h = half_idx.shape[1]
    sub = half_idx[cands]  # (N, C, H): R(g, k1/2) of every candidate g
    sub_valid = half_valid[cands] & valid[..., None]
    # How many of R(g, k1/2) already lie in the row's set: compare against its C members.
    inside = (sub[..., None] == cands[:, None, None, :]) & valid[:, None, None, :]  # (N, C, H, C)
    overlap = (inside.any(-1) & sub_valid).sum(-1)  # (N, C)
    size = sub_valid.sum(-1)  # (N, C)
    accept = valid & (overlap.float() > 2.0 / 3.0 * size.float())  # (N, C)
    add_valid = sub_valid & accept[..., None]
    return (torch.cat([cands, sub.reshape(n, c * h)], 1),
            torch.cat([valid, add_valid.reshape(n, c * h)], 1))


def _distribution(dist: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(N, G) rows exp(-dist) on each row's set (idx, valid), zero elsewhere, summing to 1."""
    w = torch.exp(-dist.gather(1, idx)) * valid  # (N, S)
    v = torch.zeros_like(dist)
    # An index may repeat, valid in one slot (its weight) and not in another (0): keep the max.
    v.scatter_reduce_(1, idx, w, reduce="amax")
    return v / v.sum(1, keepdim=True).clamp_min(1e-12)


def _min_overlap(vq: torch.Tensor, vg_csc: tuple, g: int) -> torch.Tensor:
    """sum_j min(vq[q, j], vg[x, j]) for all (q, x): (Qc, G) from sparse non-zeros."""
    col_ptr, rows_sorted, vals_sorted = vg_csc
    qi, j = vq.nonzero(as_tuple=True)  # non-zeros of the query rows
    a = vq[qi, j]
    counts = col_ptr[j + 1] - col_ptr[j]  # images with a non-zero in column j
    seg = torch.repeat_interleave(torch.arange(len(j)), counts)  # which query non-zero
    starts = torch.repeat_interleave(col_ptr[j], counts)
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    entry = starts + within
    out = torch.zeros(vq.shape[0], g)
    out.index_put_((qi[seg], rows_sorted[entry]), torch.minimum(a[seg], vals_sorted[entry]), accumulate=True)
    return out


def _csc(v: torch.Tensor) -> tuple:
    """Column-compressed non-zeros of (G, G) ``v``: (col_ptr (G+1,), rows, values)."""
    r, c = v.nonzero(as_tuple=True)
    order = torch.argsort(c, stable=True)
    r, c = r[order], c[order]
    col_ptr = torch.zeros(v.shape[1] + 1, dtype=torch.long)
    col_ptr[1:] = torch.bincount(c, minlength=v.shape[1]).cumsum(0)
    return col_ptr, r, v[r, c]


def kreciprocal_rerank(sim_qg: torch.Tensor, sim_gg: torch.Tensor, k1: int = 20, k2: int = 6,
                       lambda_value: float = 0.3, chunk: int = 256) -> torch.Tensor:
    """Cross-modal k-reciprocal re-rank (module docstring): (Q, G), (G, G) cosine -> (Q, G) scores."""
    _check(sim_qg, sim_gg)
    sim_qg, sim_gg = sim_qg.float(), sim_gg.float()
    nq, g = sim_qg.shape
    if k1 < 1 or k2 < 1:
        raise RerankError(f"k-reciprocal re-rank needs k1, k2 >= 1, got {k1}, {k2}")
    k1g = min(int(k1), g - 1) if g > 1 else 0
    kh = min(round(k1 / 2), g - 1) if g > 1 else 0
    d_qg, d_gg = (1.0 - sim_qg) / 2.0, (1.0 - sim_gg) / 2.0

    # Gallery: reciprocal sets R(g, k) from top-(k+1) lists (self included).
    def reciprocal_gallery(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, member = _topk_mask(sim_gg, k + 1)  # (G, k+1), (G, G)
        valid = member.t().gather(1, idx)  # g in the top-(k+1) of each neighbour
        return idx, valid

    full_idx, full_valid = reciprocal_gallery(k1g)
    half_idx, half_valid = reciprocal_gallery(kh)
    exp_idx, exp_valid = _expand(full_idx, full_valid, half_idx, half_valid)
    v_g = _distribution(d_gg, exp_idx, exp_valid)  # (G, G)

    # Texts: forward top-k1 images; reciprocal when the text is in the image's top-k1 texts.
    kf = min(int(k1), g)
    kt = min(int(k1), nq)
    fwd = sim_qg.topk(kf, dim=1).indices  # (Q, kf)
    _, text_member = _topk_mask(sim_qg.t(), kt)  # (G, Q): q in the top-kt texts of g
    valid_q = text_member.t().gather(1, fwd)  # (Q, kf)
    valid_q[:, 0] = True  # the best image always stands in for the probe itself
    q_idx, q_valid = _expand(fwd, valid_q, half_idx, half_valid)

    # Local query expansion over the k2 nearest images.
    if k2 > 1:
        nn_g = sim_gg.topk(min(k2, g), dim=1).indices  # (G, k2), self first
        v_g_qe = v_g[nn_g].mean(1)  # (G, G)
    else:
        v_g_qe = v_g
    vg_csc = _csc(v_g_qe)

    out = torch.empty_like(sim_qg)
    for s in range(0, nq, chunk):
        e = min(s + chunk, nq)
        v_q = _distribution(d_qg[s:e], q_idx[s:e], q_valid[s:e])  # (Qc, G)
        if k2 > 1:
            top = fwd[s:e, : min(k2 - 1, g)]  # (Qc, k2-1) nearest images
            v_q = (v_q + v_g[top].sum(1)) / (1 + top.shape[1])
        m = _min_overlap(v_q, vg_csc, g)  # (Qc, G)
        jac = 1.0 - m / (2.0 - m)
        out[s:e] = -((1.0 - lambda_value) * jac + lambda_value * d_qg[s:e])
    return out


# ------------------------------------------------------------------------------ entry points
def rerank(method: str, sim_qg: torch.Tensor, gallery_features: torch.Tensor | None = None, *,
           sim_gg: torch.Tensor | None = None, **params) -> torch.Tensor:
    """Re-ranked (Q, G) scores by ``method`` (none | jaccard | kreciprocal).

    Give L2-normalised (G, D) ``gallery_features`` or their (G, G) ``sim_gg``. ``params``
    go to the method (jaccard: k, alpha; kreciprocal: k1, k2, lambda_value).
    """
    if method not in METHODS:
        raise RerankError(f"unknown re-rank {method!r}: choose from {list(METHODS)}")
    if method == "none":
        return sim_qg
    if sim_gg is None:
        if gallery_features is None:
            raise RerankError("re-ranking needs the gallery features or their image-image similarity")
        f = torch.as_tensor(gallery_features).float()
        sim_gg = f @ f.t()
    sim_qg = torch.as_tensor(sim_qg)
    if method == "jaccard":
        return jaccard_rerank(sim_qg, sim_gg, **params)
    return kreciprocal_rerank(sim_qg, sim_gg, **params)


def rerank_evaluation(result, method: str, **params) -> dict:
    """Re-rank an :class:`~tbps.engine.evaluate.EvalResult` (text->image) and score it again.

    Returns {"method", "params", "t2i": metrics, "seconds", "seconds_per_query"}; the time
    covers the image-image similarity and the re-rank, not the encoding.
    """
    import time

    from tbps.retrieval.metrics import retrieval_metrics

    if result.image_features is None:
        raise RerankError("this evaluation result has no image features to re-rank with")
    t0 = time.perf_counter()
    scores = rerank(method, result.similarity, result.image_features, **params)
    seconds = time.perf_counter() - t0
    metrics = retrieval_metrics(scores, torch.tensor(result.caption_ids), torch.tensor(result.image_ids))
    n = max(len(result.caption_ids), 1)
    return {"method": method, "params": params, "t2i": metrics, "seconds": seconds, "seconds_per_query": seconds / n}


def index_reranker(method: str, **params) -> Callable:
    """A ``GalleryIndex.search(..., reranker=...)`` hook re-ranking each call's candidates.

    The gallery of the re-rank is the union of the candidates of the call's queries
    (image-image similarities from the stored features); non-candidates keep their order
    below. Returns scores for the (Q, K) candidate grid; missing candidates (-1) stay -inf.
    """
    if method not in METHODS:
        raise RerankError(f"unknown re-rank {method!r}: choose from {list(METHODS)}")

    def hook(query_feats: np.ndarray, cand_ids: np.ndarray, cand_scores: np.ndarray, index) -> np.ndarray:
        if method == "none":
            return cand_scores
        present = cand_ids >= 0
        uniq = np.unique(cand_ids[present])
        if len(uniq) == 0:
            return cand_scores
        rows = np.searchsorted(np.asarray(index.ids), uniq)  # ids are sorted: rows in uniq order
        feats_by_uniq = torch.from_numpy(np.asarray(index.features[rows], dtype=np.float32))  # (U, D)
        q = torch.from_numpy(np.asarray(query_feats, dtype=np.float32))
        new = rerank(method, q @ feats_by_uniq.t(), feats_by_uniq, **params).numpy()  # (Q, U)
        col = np.searchsorted(uniq, np.where(present, cand_ids, uniq[0]))
        out = np.take_along_axis(new, col, axis=1).astype(np.float64)
        return np.where(present, out, -np.inf)

    return hook
