"""Both re-ranks against naive loop implementations on small matrices, and the index hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tbps.retrieval.rerank import (
    RerankError,
    index_reranker,
    jaccard_rerank,
    kreciprocal_rerank,
    rerank,
)


def _feats(n_ids=4, per=3, q_per=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_ids, d, generator=g)
    gal = F.normalize(centres.repeat_interleave(per, 0) + 0.8 * torch.randn(n_ids * per, d, generator=g), dim=-1)
    qry = F.normalize(centres.repeat_interleave(q_per, 0) + 1.0 * torch.randn(n_ids * q_per, d, generator=g), dim=-1)
    return qry, gal


def _naive_jaccard(sqg, sgg, k, alpha):
    # TextReID's code: argsort, top-k lists, a double loop with Python sets.
    qn = torch.argsort(sqg, dim=1, descending=True)[:, :k].tolist()
    gn = torch.argsort(sgg, dim=1, descending=True)[:, :k].tolist()
    out = sqg.clone()
    for i in range(len(qn)):
        for j in range(len(gn)):
            a, b = set(qn[i]), set(gn[j])
            out[i, j] += alpha * len(a & b) / len(a | b)
    return out


def _naive_kreciprocal(sqg, sgg, k1, k2, lam):
    nq, g = sqg.shape
    dqg, dgg = (1 - sqg) / 2, (1 - sgg) / 2
    top = lambda row, k: torch.argsort(row, descending=True)[:k].tolist()
    k1g, kh = min(k1, g - 1), min(round(k1 / 2), g - 1)

    def r_gal(x, k):
        return [y for y in top(sgg[x], k + 1) if x in top(sgg[y], k + 1)]

    half = [r_gal(x, kh) for x in range(g)]

    def expand(base):
        e = set(base)
        for c in base:
            if len(set(half[c]) & set(base)) > 2 / 3 * len(half[c]):
                e |= set(half[c])
        return e

    def dist(drow, members):
        v = torch.zeros(g)
        for j in members:
            v[j] = torch.exp(-drow[j])
        return v / v.sum()

    vg = torch.stack([dist(dgg[x], expand(r_gal(x, k1g))) for x in range(g)])
    vq = []
    for q in range(nq):
        fwd = top(sqg[q], min(k1, g))
        base = [fwd[0]] + [x for x in fwd[1:] if q in top(sqg[:, x], min(k1, nq))]
        vq.append(dist(dqg[q], expand(base)))
    vq = torch.stack(vq)
    if k2 > 1:
        vg_qe = torch.stack([vg[top(sgg[x], min(k2, g))].mean(0) for x in range(g)])
        vq = torch.stack([(vq[q] + vg[top(sqg[q], min(k2 - 1, g))].sum(0)) / (1 + min(k2 - 1, g)) for q in range(nq)])
        vg = vg_qe
    out = torch.empty(nq, g)
    for q in range(nq):
        for x in range(g):
            jac = 1 - torch.minimum(vq[q], vg[x]).sum() / torch.maximum(vq[q], vg[x]).sum()
            out[q, x] = -((1 - lam) * jac + lam * dqg[q, x])
    return out


@pytest.mark.parametrize("k", [1, 3, 5])
def test_jaccard_matches_textreid_reference(k):
    q, g = _feats(seed=k)
    sqg, sgg = q @ g.t(), g @ g.t()
    got = jaccard_rerank(sqg, sgg, k=k, alpha=0.05, chunk=3)  # chunks smaller than Q
    assert torch.allclose(got, _naive_jaccard(sqg, sgg, k, 0.05), atol=1e-6)
    assert not torch.allclose(got, sqg)


@pytest.mark.parametrize("k1,k2,lam,seed", [(4, 3, 0.3, 0), (6, 1, 0.3, 1), (20, 6, 0.5, 2), (3, 2, 0.0, 3)])
def test_kreciprocal_matches_naive(k1, k2, lam, seed):
    q, g = _feats(n_ids=4, per=3, q_per=2, seed=seed)
    sqg, sgg = q @ g.t(), g @ g.t()
    got = kreciprocal_rerank(sqg, sgg, k1=k1, k2=k2, lambda_value=lam, chunk=5)
    ref = _naive_kreciprocal(sqg, sgg, k1, k2, lam)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_kreciprocal_uses_reciprocity_and_lambda_one_is_plain_order():
    q, g = _feats(seed=5)
    sqg, sgg = q @ g.t(), g @ g.t()
    only_dist = kreciprocal_rerank(sqg, sgg, k1=4, k2=2, lambda_value=1.0)
    assert torch.equal(only_dist.argsort(1, descending=True), sqg.argsort(1, descending=True))
    # The Jaccard part changes the order on clustered data.
    mixed = kreciprocal_rerank(sqg, sgg, k1=4, k2=2, lambda_value=0.3)
    assert not torch.equal(mixed.argsort(1), sqg.argsort(1))


def test_rerank_entry_point_and_errors():
    q, g = _feats()
    sqg = q @ g.t()
    assert torch.equal(rerank("none", sqg, g), sqg)
    assert torch.allclose(rerank("jaccard", sqg, g), jaccard_rerank(sqg, g @ g.t()))
    with pytest.raises(RerankError, match="unknown re-rank 'knn'"):
        rerank("knn", sqg, g)
    with pytest.raises(RerankError, match=r"\(Q, G\)"):
        jaccard_rerank(sqg, sqg)


class _Index:
    def __init__(self, feats):
        self.features = feats.numpy()
        self.ids = np.arange(10, 10 + len(feats), dtype=np.int64)


def test_index_hook_reranks_the_candidate_set():
    q, g = _feats(seed=7)
    ix = _Index(g)
    sqg = (q @ g.t()).numpy()
    order = np.argsort(-sqg, axis=1)[:, :6]
    cand_ids, cand_scores = ix.ids[order], np.take_along_axis(sqg, order, 1).astype(np.float64)
    cand_ids[0, -1], cand_scores[0, -1] = -1, -np.inf  # a missing candidate stays missing
    new = index_reranker("jaccard", k=3)(q.numpy(), cand_ids, cand_scores, ix)
    uniq = np.unique(cand_ids[cand_ids >= 0])
    sub = g[torch.from_numpy(uniq - 10)]
    ref = jaccard_rerank(q @ sub.t(), sub @ sub.t(), k=3).numpy()
    col = np.searchsorted(uniq, np.where(cand_ids >= 0, cand_ids, uniq[0]))
    expect = np.take_along_axis(ref, col, 1)
    assert np.allclose(new[cand_ids >= 0], expect[cand_ids >= 0], atol=1e-6) and new[0, -1] == -np.inf
    assert new.shape == cand_scores.shape
    assert np.array_equal(index_reranker("none")(q.numpy(), cand_ids, cand_scores, ix), cand_scores)
    kr = index_reranker("kreciprocal", k1=4, k2=2)(q.numpy(), cand_ids, cand_scores, ix)
    assert np.isfinite(kr[cand_ids >= 0]).all()


def test_tbps_eval_reports_reranked_figures_beside_plain(tiny_dataset, tmp_path, capsys):
    import json

    from tbps.cli.main import main
    from tbps.retrieval.encoder import create_untrained_checkpoint

    ckpt = create_untrained_checkpoint(tmp_path / "m.pt", arch="micro-vit")
    assert main(["eval", str(ckpt), "--data", str(tiny_dataset), "--rerank", "jaccard", "--json"]) in (0, None)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["reranked"]["method"] == "jaccard" and set(out["reranked"]["t2i"]) >= {"R1", "mAP"}
    assert out["t2i"] != out["reranked"]["t2i"] and out["reranked"]["seconds_per_query"] > 0
    assert main(["eval", str(ckpt), "--data", str(tiny_dataset), "--rerank", "kreciprocal"]) in (0, None)
    text = capsys.readouterr().out
    assert "re-ranked: kreciprocal" in text and text.count("text->image") == 2
