"""Every tiny architecture runs forward and backward; token outputs agree with the global ones; the CLIP
tokenizer's word memo gives open_clip's own token tensors."""

import pytest
import torch

from tbps.recipes.config import load_recipe
from tbps.models import ModelSpec, create_model, get_tokenizer, list_architectures
from tbps.models.spec import ModelError
from tbps.objectives import StepContext, build_objective


@pytest.mark.parametrize("arch", list_architectures()["tiny"])
def test_tiny_arch_forward_backward_all_params_get_grad(arch):
    torch.manual_seed(0)
    model = create_model(ModelSpec(arch=arch))
    tok = get_tokenizer(model.spec)
    h, w = model.image_size
    out = model(torch.randn(3, 3, h, w), tok(["a man in a red coat", "a woman", "a child with a bag"]))
    loss = (out["image_features"] @ out["text_features"].t()).logsumexp(1).mean() * out["logit_scale"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_token_outputs_match_global_features():
    torch.manual_seed(0)
    model = create_model(ModelSpec(arch="micro-vit")).eval()
    tok = get_tokenizer(model.spec)
    x, t = torch.randn(2, 3, *model.image_size), tok(["a man in a red coat", "a woman"])
    g, patches = model.image_tokens(x)
    assert torch.allclose(g, model.encode_image(x), atol=1e-5)
    h, w = model.image_size
    assert patches.shape == (2, (h // 8) * (w // 8), g.shape[-1])  # patch 8, projected to D
    tg, words, mask = model.text_tokens(t)
    assert torch.allclose(tg, model.encode_text(t), atol=1e-5)
    assert words.shape[:2] == t.shape and words.shape[-1] == tg.shape[-1]
    # sot + 6 words + eot for the first caption; sot + 2 + eot for the second
    assert mask.sum(1).tolist() == [8, 4]


def test_text_attention_dropout_is_set_and_active_in_training():
    model = create_model(ModelSpec(arch="micro-vit", text_attn_dropout=0.5))
    blocks = model.clip.transformer.resblocks
    assert all(b.attn.dropout == 0.5 for b in blocks)
    tok = get_tokenizer(model.spec)(["a man in a long red coat with a black backpack"])
    model.train()
    a, b = model.encode_text(tok), model.encode_text(tok)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.allclose(model.encode_text(tok), model.encode_text(tok))


def test_position_embeddings_interpolated_for_non_square_input(tmp_path):
    """Square pretrained weights (as CLIP's) loaded into a 2:1 model: the grid is resized."""
    torch.manual_seed(0)
    square = create_model(ModelSpec(arch="micro-vit", image_size=(32, 32)))
    weights = tmp_path / "square.pt"
    torch.save(square.clip.state_dict(), weights)
    tall = create_model(ModelSpec(arch="micro-vit", image_size=(64, 32), pretrained=str(weights)))
    pos = tall.clip.visual.positional_embedding
    assert pos.shape[0] == 1 + 8 * 4  # (64/8) x (32/8) patches + class token
    assert torch.equal(pos[0], square.clip.visual.positional_embedding[0])  # class token kept
    # a bicubic resize of a 4x4 grid to 8x4: columns keep their values' range, not random ones
    old = square.clip.visual.positional_embedding[1:].reshape(4, 4, -1)
    new = pos[1:].reshape(8, 4, -1)
    assert torch.allclose(new.mean(0), old.mean(0), atol=0.15)
    assert torch.equal(tall.clip.visual.conv1.weight, square.clip.visual.conv1.weight)
    tall.encode_image(torch.randn(1, 3, 64, 32))


def test_unknown_architecture_and_missing_weights_give_clear_errors():
    with pytest.raises(ModelError, match="unknown architecture 'ViT-Q-99'"):
        create_model(ModelSpec(arch="ViT-Q-99"))


def test_paper_architectures_are_known_to_open_clip():
    from tbps.models.spec import arch_config

    for arch in list_architectures()["paper"]:
        cfg = arch_config(arch)
        assert cfg["embed_dim"] in (512, 1024)


def test_unknown_text_tower_type_is_a_model_error_naming_the_known_ones():
    spec = ModelSpec(arch="micro-vit", text_tower={"type": "lstm"})
    for build in (create_model, get_tokenizer):
        with pytest.raises(ModelError, match=r"'lstm'.*\['frozen-words', 'hf'\].*null"):
            build(spec)


def test_text_tower_registry_dispatches_by_type(tmp_path, monkeypatch):
    from tbps.models.text_stream import FrozenWordStream, WordTokenizer
    from tbps.models.text_towers import CLIP_TOWER, TEXT_TOWERS, text_tower

    assert text_tower(ModelSpec()) is CLIP_TOWER and text_tower(ModelSpec(text_tower={})) is CLIP_TOWER
    assert text_tower(ModelSpec(text_tower={"source": "random"})) is TEXT_TOWERS["frozen-words"]  # the default type
    assert text_tower(ModelSpec(text_tower={"type": "hf"})) is TEXT_TOWERS["hf"]
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    # dim 7: a word dictionary of its own (dictionaries are shared per encoder in the process)
    model = create_model(ModelSpec(arch="micro-vit", text_tower={"type": "frozen-words", "source": "random", "dim": 7}))
    assert isinstance(model.text_stream, FrozenWordStream) and isinstance(get_tokenizer(model.spec), WordTokenizer)
    clip = create_model(ModelSpec(arch="micro-vit"))
    assert clip.text_stream is None and clip.prepare_vocabulary(["a man in a red coat"]) is None


# --- CLIP's tokenizer, its words memoised (models/clip_bpe.py): the same tensors as open_clip's ---

EDGE_CAPTIONS = [
    "", "   ", "a", "A MAN IN A RED COAT, Black Shoes", "café au lait, naïve résumé, Ærø",
    "cafÃ© crÃ¨me, Ã©tÃ©",  # mojibake: ftfy repairs it before the BPE
    "行人穿着红色外套和黑色裤子", "👩‍🚀 with a 🎒 and 👟👟 🇫🇷", "&amp;amp; &lt;b&gt; fish &amp; chips &#39;x&#39;",
    "<b>bold</b> & <i>it</i>", "he's here, they'll go; we're off, I'd, you've, I'm, don't, HE'S, THEY'LL",
    "born 1999, 3.5 m tall, 42nd street, 0.007", "  spaced\t\tout \n new\r\nline  ", "<start_of_text> x <end_of_text>",
    "ﬁne ﬂuffy", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "curly “quotes” ‘and’ ’tis", "\x00ctrl\x1b[31mred\x1b[0m",
    "\u00a0nbsp\u2028sep\u200bzero", "Straße İstanbul ΣΊΣΥΦΟΣ", "a-b_c/d\\e|f~g`h^i", "!!!??? ... ---",
]


@pytest.fixture(scope="module")
def clip_tokenizers():
    """(tbps's CLIP tokenizer, open_clip's own) at context length 24."""
    import open_clip

    tok = get_tokenizer(ModelSpec(arch="micro-vit", context_length=24))
    return tok, open_clip.get_tokenizer("micro-vit", context_length=24)


def _synthetic_captions(n_ids: int = 40) -> list[str]:
    """Synthetic captions as ``tbps synth`` writes them, raw and as training feeds them (augmented, cleaned)."""
    import random

    import numpy as np

    from tbps.data.text import clean_caption
    from tbps.data.text_aug import augment_caption
    from tbps.synth.attributes import sample_identities
    from tbps.synth.captions import make_caption

    attrs, _ = sample_identities(n_ids, seed=3)
    nrng, rng = np.random.default_rng(3), random.Random(3)
    raw = [make_caption(a, nrng) for a in attrs for _ in range(2)]
    augmented = [augment_caption(c, c.upper(), rng, backtranslation_prob=0.2, deletion_prob=0.3) for c in raw]
    return raw + augmented + [clean_caption(c, 60) for c in augmented]


def test_clip_tokenizer_is_memoised_and_matches_open_clip_on_synthetic_captions(clip_tokenizers):
    from open_clip.tokenizer import SimpleTokenizer

    from tbps.models.clip_bpe import MemoTokenizer

    tok, ref = clip_tokenizers
    assert type(tok) is MemoTokenizer and isinstance(tok, SimpleTokenizer)  # export's check still holds
    captions = _synthetic_captions()
    ours = tok(captions)
    assert ours.dtype == torch.long and ours.shape == (len(captions), 24)
    assert torch.equal(ours, ref(captions))
    for length in (77, 6):  # no truncation at all; nearly every caption cut
        assert torch.equal(tok(captions, context_length=length), ref(captions, context_length=length))
    assert tok.word_ids  # the words went through the memo
    assert tok.encode(captions[0]) == ref.encode(captions[0])


def test_clip_tokenizer_memo_matches_open_clip_on_edge_cases(clip_tokenizers):
    tok, ref = clip_tokenizers
    long = " ".join(["a tall man in a dark-blue coat"] * 12)  # > 24 tokens: cut, the last id eot
    captions = EDGE_CAPTIONS + [long]
    assert torch.equal(tok(captions), ref(captions))
    for c in captions:
        assert torch.equal(tok(c), ref(c)), c
    row = tok(long)[0]
    assert row[-1] == ref.eot_token_id and row[-2] != ref.eot_token_id and (row != 0).all()
    assert tok("")[0, :3].tolist() == [ref.sot_token_id, ref.eot_token_id, 0]
    assert tok([]).shape == ref([]).shape == (0, 24)


def test_clip_tokenizer_memo_hit_gives_the_same_row(clip_tokenizers):
    tok, ref = clip_tokenizers
    captions = ["a woman in a grey hoodie and jeans", "she's carrying a red handbag", "a woman in a grey hoodie and jeans"]
    first = tok(captions)
    size = len(tok.word_ids)
    again = tok(captions[::-1])
    assert len(tok.word_ids) == size  # every word came from the memo
    assert torch.equal(again, first.flip(0)) and torch.equal(first[0], first[2])
    assert torch.equal(again, ref(captions[::-1]))


def test_clip_tokenizer_memo_is_bounded_and_words_past_it_are_still_right():
    import open_clip

    from tbps.models.clip_bpe import memoize

    tok = memoize(open_clip.get_tokenizer("micro-vit", context_length=32))
    ref = open_clip.get_tokenizer("micro-vit", context_length=32)
    tok.word_limit = 5
    captions = _synthetic_captions(8) + EDGE_CAPTIONS
    assert torch.equal(tok(captions), ref(captions))
    assert len(tok.word_ids) == 5
    kept = dict(tok.word_ids)
    assert torch.equal(tok(captions[::-1]), ref(captions[::-1])) and tok.word_ids == kept


def test_clip_tokenizer_memo_pickles_with_the_tokenizer_attributes(clip_tokenizers):
    import pickle

    from tbps.data.dataset import Collate
    from tbps.data.masking import MaskSpec

    tok, ref = clip_tokenizers
    tok(["a man in a red coat"])
    collate = pickle.loads(pickle.dumps(Collate(tok)))  # as a DataLoader worker receives it
    copy = collate.tokenizer
    assert type(copy) is type(tok) and copy.word_ids == tok.word_ids
    assert (copy.vocab_size, copy.sot_token_id, copy.eot_token_id, copy.context_length) == (49408, 49406, 49407, 24)
    assert copy.encoder == ref.encoder and MaskSpec.from_tokenizer(copy) == MaskSpec.from_tokenizer(ref)
    assert copy.decode(ref.encode("a man in a red coat")) == ref.decode(ref.encode("a man in a red coat"))
    captions = _synthetic_captions(4)
    assert torch.equal(collate.tokens(captions), ref(captions))


def test_clip_tokenizer_memo_leaves_other_tokenizers_and_reductions_to_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    from tbps.models.clip_bpe import MemoTokenizer, memoize

    class Own(SimpleTokenizer):
        pass

    words = get_tokenizer(ModelSpec(arch="micro-vit", text_tower={"type": "frozen-words", "source": "random", "dim": 7}))
    assert memoize(words) is words
    own = Own.__new__(Own)
    assert memoize(own) is own  # not exactly open_clip's class: left as it is
    reduced = memoize(SimpleTokenizer(context_length=8, reduction_mask="random"))
    ref = SimpleTokenizer(context_length=8, reduction_mask="random")
    assert type(reduced) is MemoTokenizer
    captions = _synthetic_captions(4)

    def draw(tokenizer):
        torch.manual_seed(0)  # random_mask_tokenize draws from torch's generator
        return tokenizer(captions)

    ours = draw(reduced)
    assert torch.equal(ours, draw(ref))
    assert not torch.equal(ours, SimpleTokenizer(context_length=8)(captions))  # reduced, not cut


def test_clip_tokenizer_clean_skips_ftfy_only_where_ftfy_changes_nothing(clip_tokenizers, monkeypatch):
    import pickle
    import random
    import string

    import ftfy
    from open_clip.tokenizer import SimpleTokenizer

    from tbps.models.clip_bpe import memoize

    tok, ref = clip_tokenizers
    rng = random.Random(0)
    alphabet = list(string.printable) + ["&amp;", "&lt;", "&#39;", "&", " ", "A", "\x0b", "\x1b[0m", "\x7f", "\x00",
                                         "é", "Ã©", "©", "\x85", "\u2028", "ﬁ", "“", "ｗ", "\u00a0", "İ"]
    texts = ["".join(rng.choices(alphabet, k=rng.randrange(30))) for _ in range(3000)] + _synthetic_captions(10)
    assert [tok.clean(t) for t in texts] == [ref.clean_fn(t) for t in texts]
    canon, canon_ref = memoize(SimpleTokenizer(clean="canonicalize")), SimpleTokenizer(clean="canonicalize")
    assert [canon.clean(t) for t in texts[:300]] == [canon_ref.clean_fn(t) for t in texts[:300]]
    assert torch.equal(canon(texts[:300]), canon_ref(texts[:300]))

    fixed = []
    real = ftfy.fix_text
    monkeypatch.setattr(ftfy, "fix_text", lambda text: fixed.append(text) or real(text))
    for t in (tok, pickle.loads(pickle.dumps(tok))):
        assert t.clean("  A Man, in RED (42)!  ") == "a man, in red (42)!" and not fixed  # skipped
        assert t.clean("fish &amp; chips") == "fish & chips" and t.clean("café") == "café" and len(fixed) == 2
        fixed.clear()


def test_compile_towers_keeps_the_weights_and_the_features():
    """Compiled towers (train.compile) give the uncompiled model's features and gradients up to float
    rounding, through both encoding paths, and leave the state-dict keys alone (checkpoints load into an
    uncompiled model)."""
    import copy

    torch.manual_seed(0)
    m = create_model(ModelSpec(arch="micro-vit", image_size=(32, 16), context_length=16))
    ref = copy.deepcopy(m)
    assert m.compile_towers() == ["clip.visual.transformer", "clip.transformer"]
    assert m.clip.visual.transformer._compiled_call_impl is not None
    assert list(m.state_dict()) == list(ref.state_dict())
    images = torch.randn(3, 3, 32, 16)
    tokens = get_tokenizer(m.spec)(["a man in a red shirt", "a woman", "black shoes and a blue bag"])
    paths = (lambda x: x.encode_image(images), lambda x: x.encode_text(tokens), lambda x: x.image_tokens(images)[1])
    for model in (m, ref):
        sum(fn(model).sum() for fn in paths).backward()
    for fn in paths:
        torch.testing.assert_close(fn(m), fn(ref), rtol=1e-4, atol=1e-5)
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert len(grads) > 10
    for n, p in m.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_conv_stem_replaces_the_patch_embedding_keeping_the_grid_and_round_trips_a_checkpoint(tmp_path):
    from tbps.models.checkpoint import load_model, save_checkpoint
    from tbps.models.conv_stem import ConvStem

    torch.manual_seed(0)
    plain = create_model(ModelSpec(arch="micro-vit"))
    model = create_model(ModelSpec(arch="micro-vit", conv_stem=[4, 8, 8]))
    stem = model.clip.visual.conv1
    assert isinstance(stem, ConvStem)
    assert [m.stride for m in stem if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3 + [(1, 1)]
    x = torch.randn(2, 3, *model.image_size)
    g, patches = model.image_tokens(x)
    assert patches.shape == plain.image_tokens(x)[1].shape  # the same 4 x 2 token grid of 8-pixel cells
    tok = get_tokenizer(model.spec)
    out = model(x, tok(["a man in a red coat", "a woman"]))
    (out["image_features"] @ out["text_features"].t()).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())

    path = save_checkpoint(tmp_path / "stem.pt", {"model_spec": model.spec.to_dict(), "model": model.state_dict()})
    loaded, _ = load_model(path)
    assert loaded.spec.conv_stem == [4, 8, 8]
    model.eval()
    assert torch.equal(loaded.encode_image(x), model.encode_image(x))


@pytest.mark.parametrize("stem, pretrained, message", [
    ([8, 8], None, "2 stride-2 convolutions .4-pixel cells. but the architecture's patches are"),
    ([8, "wide", 8], None, "a list of channel counts"),
    ([8, 8, 10 ** 9], None, "a list of channel counts"),
    ("8", None, "a list of channel counts"),
    ([8, 8, 8], "weights.pt", "trains from scratch: set model.pretrained: null"),
])
def test_conv_stem_that_cannot_be_built_is_a_model_error_naming_why(stem, pretrained, message):
    with pytest.raises(ModelError, match=message):
        create_model(ModelSpec(arch="micro-vit", conv_stem=stem, pretrained=pretrained))
