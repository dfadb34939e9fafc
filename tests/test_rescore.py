"""Top-k re-scoring: candidates above non-candidates, non-candidate order kept, a fixed ranking."""

from __future__ import annotations

import torch

from tbps.retrieval.rescore import rescore_topk


def _order(row: torch.Tensor) -> list[int]:
    return torch.argsort(row, descending=True, stable=True).tolist()


def test_non_candidates_keep_their_order_below_all_candidates():
    torch.manual_seed(0)
    sim = torch.randn(5, 12)
    k = 4
    itm = torch.rand(5, 12)
    out = rescore_topk(sim, lambda q, g: itm[q, g], k=k, batch_pairs=3)
    top = sim.topk(k, dim=1).indices
    for i in range(5):
        cand = set(top[i].tolist())
        ranked = _order(out[i])
        assert set(ranked[:k]) == cand  # candidates first
        rest = [j for j in ranked[k:]]
        assert rest == [j for j in _order(sim[i]) if j not in cand]  # stage-1 order kept below
        # Candidates ordered by ITM alone (RaSa).
        assert ranked[:k] == sorted(cand, key=lambda j: -itm[i, j].item())


def test_rescoring_fixes_a_constructed_itc_mistake():
    from tbps.retrieval.metrics import retrieval_metrics

    # ITC ranks a wrong image (id 1) first for query 0 (id 0); the matcher knows better.
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.2, 0.7, 0.6, 0.1]])
    qids, gids = torch.tensor([0, 2]), torch.tensor([1, 0, 2, 3])
    truth = (qids[:, None] == gids[None, :]).float()  # a perfect matcher: 1 on true pairs
    before = retrieval_metrics(sim, qids, gids)
    out = rescore_topk(sim, lambda q, g: 0.1 + 0.8 * truth[q, g], k=2)
    after = retrieval_metrics(out, qids, gids)
    assert before["R1"] == 0.0 and after["R1"] == 100.0
    # APTM's mix: a small ITC weight only breaks ITM ties.
    tie = rescore_topk(sim, lambda q, g: torch.full((len(q),), 0.5), k=3, mode="itm+itc")
    assert _order(tie[0])[:3] == [0, 1, 2] and _order(tie[1])[:3] == [1, 2, 0]


def test_k_larger_than_gallery_and_bad_arguments():
    import pytest

    sim = torch.tensor([[0.1, 0.3, 0.2]])
    out = rescore_topk(sim, lambda q, g: g.float() / 10, k=128)
    assert _order(out[0]) == [2, 1, 0]
    with pytest.raises(ValueError, match="mode"):
        rescore_topk(sim, lambda q, g: g.float(), mode="rasa")
    with pytest.raises(ValueError, match="k >= 1"):
        rescore_topk(sim, lambda q, g: g.float(), k=0)


def test_search_rescorer_scores_index_candidates_with_the_fusion_encoder(tiny_dataset, micro_overrides):
    import numpy as np

    from tbps.recipes.config import load_recipe
    from tbps.data.layouts import load_annotations
    from tbps.models import create_model
    from tbps.models.factory import get_tokenizer
    from tbps.models.fusion import build_fusion, image_memory
    from tbps.retrieval.rescore import SearchRescorer

    r = load_recipe("laip-cpu", micro_overrides + ["losses.fusion.width=32", "losses.fusion.heads=2"])
    torch.manual_seed(0)
    model = create_model(r.model).eval()
    fusion = build_fusion(model, r.losses["fusion"]).eval()
    tok = get_tokenizer(model.spec)
    paths = [rec.image for rec in load_annotations(tiny_dataset, progress=False).split("test")][:5]

    class FakeIndex:  # the one method the rescorer uses
        def image_path(self, item_id):
            return paths[item_id]

    texts = ["a man in a red shirt", "a woman with a blue bag"]
    rescorer = SearchRescorer(model, fusion, tok, max_words=60)
    cand = np.array([[3, 1, 4], [0, -1, 2]])
    new = rescorer.for_texts(texts)(None, cand, np.zeros(cand.shape), FakeIndex())
    assert new.shape == (2, 3) and new[1, 1] == -np.inf and np.isfinite(new[0]).all()
    # Same numbers as the fusion encoder run directly on the pair.
    from tbps.data.dataset import GalleryImages

    x = torch.stack([GalleryImages(paths, model.image_size, model.spec.mean, model.spec.std)[2][0]])
    with torch.no_grad():
        _, words, mask = model.text_tokens(tok([texts[1]]))
        ref = fusion.itm_score(fusion(words, mask, image_memory(model, x)[1])).item()
    assert abs(new[1, 2] - ref) < 1e-5
