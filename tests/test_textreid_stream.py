"""The frozen-dictionary text stream: cache reuse/invalidation, open vocabulary, model hooks."""

from __future__ import annotations

import pytest
import torch

from tbps.models import ModelSpec, create_model, get_tokenizer
from tbps.models.text_stream import (
    RandomWordEncoder,
    TextStreamError,
    WordDictionary,
    WordTokenizer,
    split_words,
)


class CountingEncoder(RandomWordEncoder):
    def __init__(self, dim=8, key=None):
        super().__init__(dim)
        self.key = key or self.key
        self.calls: list[list[str]] = []

    def encode(self, words):
        self.calls.append(list(words))
        return super().encode(words)


def test_cache_is_reused_and_invalidated(tmp_path):
    enc = CountingEncoder()
    d1 = WordDictionary(enc, cache=tmp_path)
    info = d1.add_vocabulary(["red", "coat", "man", "red"])
    assert info["encoded"] == 3 and not info["cached"] and enc.calls == [["coat", "man", "red"]]
    path = tmp_path / info["path"].split("/")[-1]
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))  # written atomically, no leftovers
    # Same encoder and vocabulary (any order): the file is reused, nothing is encoded.
    enc2 = CountingEncoder()
    d2 = WordDictionary(enc2, cache=tmp_path)
    info2 = d2.add_vocabulary(["man", "coat", "red"])
    assert info2["cached"] and enc2.calls == [] and info2["path"] == info["path"]
    assert torch.equal(d2.vectors[d2.ids(["red"])], d1.vectors[d1.ids(["red"])])
    # Another vocabulary or another encoder: another file, encoded afresh.
    enc3 = CountingEncoder()
    info3 = WordDictionary(enc3, cache=tmp_path).add_vocabulary(["man", "coat", "blue"])
    assert not info3["cached"] and info3["path"] != info["path"] and enc3.calls
    enc4 = CountingEncoder(key="other-encoder")
    info4 = WordDictionary(enc4, cache=tmp_path).add_vocabulary(["man", "coat", "red"])
    assert not info4["cached"] and "other-encoder" in info4["path"] and enc4.calls
    # A corrupt file (or one holding other words) is rebuilt, not trusted.
    path.write_bytes(b"not a tensor file")
    enc5 = CountingEncoder()
    info5 = WordDictionary(enc5, cache=tmp_path).add_vocabulary(["red", "coat", "man"])
    assert not info5["cached"] and enc5.calls == [["coat", "man", "red"]]
    blob = torch.load(path, weights_only=True)
    blob["words"] = ["a", "b", "c"]
    torch.save(blob, path)
    enc6 = CountingEncoder()
    assert not WordDictionary(enc6, cache=tmp_path).add_vocabulary(["red", "coat", "man"])["cached"]


def test_unknown_words_are_encoded_on_the_fly_not_mapped_to_unk(tmp_path):
    enc = CountingEncoder()
    d = WordDictionary(enc, cache=tmp_path)
    d.add_vocabulary(["a", "red", "coat"])
    tok = WordTokenizer(d, context_length=9)
    ids = tok(["a crimson coat", "A red, red coat with a rucksack and more words"])
    assert ids.shape == (2, 9) and ids[0, 3:].eq(0).all()  # padded with 0
    # New words encoded once each; "words" is beyond the context length, never encoded.
    assert enc.calls[-1] == ["and", "crimson", "more", "rucksack", "with"]
    crimson, rucksack = d.index["crimson"], d.index["rucksack"]
    assert crimson != rucksack and ids[0, 1] == crimson
    assert torch.allclose(d.vectors[crimson], RandomWordEncoder(8).encode(["crimson"])[0])
    assert split_words("T-shirt, man's bag/shoes.") == ["t-shirt", "man's", "bag", "shoes"]


def test_model_with_frozen_stream_trains_only_gru_and_heads(tmp_path, monkeypatch):
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    spec = ModelSpec(arch="micro-vit", text_tower={"source": "random", "hidden": 16, "dim": 12}, embed_dim=24)
    model = create_model(spec)
    tok = get_tokenizer(model.spec)
    info = model.prepare_vocabulary(["A man in a red coat.", "a woman, blue jeans"])
    assert info["words"] == 8
    # The frozen vectors are standardised by the training words' statistics, saved with the model.
    d = model.text_stream.dictionary
    vocab = d.vectors[d.ids(["a", "man", "in", "red", "coat", "woman", "blue", "jeans"])]
    assert torch.allclose(model.text_stream.input_mean, vocab.mean(0), atol=1e-6)
    assert model.text_stream.input_scale.item() == pytest.approx(1 / (vocab - vocab.mean(0)).std().item(), rel=1e-5)
    assert "text_stream.input_mean" in model.state_dict()
    tokens = tok(["a man in a red coat", "blue jeans", ""])
    assert tokens.shape == (3, 32)
    img, txt = model.encode_image(torch.randn(3, 3, 32, 16)), model.encode_text(tokens)
    assert img.shape == txt.shape == (3, 24) and model.embed_dim == 24
    (img.sum() + txt.sum()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("text_stream.gru") for n in trainable) and "image_head.weight" in trainable
    assert not any(n.startswith(("clip.transformer", "clip.token_embedding")) for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "clip.visual" not in n
               and "logit_scale" not in n)
    # Max-pooling ignores padding: the same caption padded differently gives the same vector.
    short = WordTokenizer(tok.dictionary, 8)(["blue jeans"])
    model.eval()
    assert torch.allclose(model.encode_text(short), model.encode_text(tokens[1:2]), atol=1e-6)
    g, words, mask = model.text_tokens(tokens)
    assert words.shape == (3, 32, 24) and mask[1].sum() == 2 and torch.allclose(g, model.encode_text(tokens))
    # The frozen table is shared by a momentum copy, not duplicated.
    import copy

    assert copy.deepcopy(model).text_stream.dictionary is model.text_stream.dictionary


def test_clip_source_needs_real_weights_and_bad_options_are_named():
    with pytest.raises(TextStreamError, match="real CLIP weights"):
        create_model(ModelSpec(arch="micro-vit", text_tower={"source": "clip"}))
    with pytest.raises(TextStreamError, match="hiden"):
        create_model(ModelSpec(arch="micro-vit", text_tower={"hiden": 3}))
