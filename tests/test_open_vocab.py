"""Unseen query words read through the training vocabulary (models/word_map.py, oov: nearest; oov: wordnet
with a WordNet database is tested in test_wordnet.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tbps.models import ModelSpec, create_model, get_tokenizer
from tbps.models.text_stream import TextStreamError, WordDictionary, WordEncoder, WordTokenizer, text_tower_config
from tbps.models.word_map import NearestWords

VECTORS = {  # a constructed 3-d space: "scarlet" is nearest "red", then "blue"; "tote" nearest "bag"
    "red": (1.0, 0.0, 0.0), "blue": (0.0, 1.0, 0.0), "bag": (0.0, 0.0, 1.0), "a": (0.5, 0.5, 0.5),
    "scarlet": (0.9, 0.3, 0.0), "tote": (0.1, 0.0, 0.8),
}


class TableEncoder(WordEncoder):
    """Word vectors from a table (``vectors``), for constructed spaces."""

    key, dim, vectors = "table-3", 3, VECTORS

    def encode(self, words):
        return torch.tensor([self.vectors[w] for w in words])


def test_unseen_word_becomes_its_nearest_training_words(tmp_path):
    d = WordDictionary(TableEncoder(), cache=False)
    m1 = NearestWords(d, ["red", "blue", "bag", "a"], k=1)
    ids = d.ids(["a", "scarlet", "bag", "tote"])
    rows = m1.rows(["a", "scarlet", "bag", "tote"], ids)
    assert rows[0] == ids[0] and rows[2] == ids[2]  # training words keep their own rows
    assert torch.equal(d.vectors[rows[1]], d.vectors[d.index["red"]])  # k=1: exactly the nearest word
    assert torch.equal(d.vectors[rows[3]], d.vectors[d.index["bag"]])
    assert d.vectors[d.index["scarlet"]].tolist() == pytest.approx([0.9, 0.3, 0.0])  # its own row is untouched
    # k=2: softmax(cos / T) over the two nearest, by hand.
    m2 = NearestWords(d, ["red", "blue", "bag", "a"], k=2, temperature=0.1)
    row = m2.rows(["scarlet"], d.ids(["scarlet"]))[0]
    s = torch.tensor(VECTORS["scarlet"]) / math.hypot(0.9, 0.3)
    cos = {w: float(s @ (torch.tensor(VECTORS[w]) / torch.tensor(VECTORS[w]).norm())) for w in ("red", "a")}
    assert cos["red"] > cos["a"] > float(s @ torch.tensor([0.0, 1.0, 0.0]))  # red, then a, then blue
    e = {w: math.exp(c / 0.1) for w, c in cos.items()}
    p_red = e["red"] / (e["red"] + e["a"])
    expected = p_red * torch.tensor(VECTORS["red"]) + (1 - p_red) * torch.tensor(VECTORS["a"])
    assert torch.allclose(d.vectors[row], expected, atol=1e-6)
    why = m2.explain(["a", "scarlet", "scarlet"])
    assert list(why) == ["scarlet"] and [w for w, _ in why["scarlet"]] == ["red", "a"]
    assert why["scarlet"][0][1] == pytest.approx(p_red, rel=1e-5)
    # The mixed rows live under keys no word can have, so two maps never share them.
    assert row != rows[1] and "scarlet" in d.index and all("\x00" in k for k in d.words[-3:])


def _spec(**tower):
    return ModelSpec(arch="micro-vit", image_size=(32, 16), context_length=12, embed_dim=16,
                     text_tower={"source": "random", "hidden": 8, "dim": 8, **tower})


def test_model_reads_unseen_word_as_its_neighbour_and_known_queries_are_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = create_model(_spec(oov="nearest", oov_k=1), load_pretrained=False).eval()
    tok = get_tokenizer(model.spec)
    training = ["a man in a red coat with a black bag", "a woman in blue jeans", "a girl with a white hat"]
    model.prepare_vocabulary(training)
    vocab = model.spec.text_tower["vocabulary"]
    assert vocab == sorted({w for c in training for w in c.split()})  # recorded in the spec
    # Naive nearest training word of "scarlet" by cosine over the frozen vectors.
    d = tok.dictionary
    row = d.ids(["scarlet"])[0]  # (encoded now: the table grows, so index it afterwards)
    v = d.vectors[row]
    nearest = max(vocab, key=lambda w: float(torch.cosine_similarity(v, d.vectors[d.index[w]], dim=0)))
    with torch.no_grad():
        unseen = model.encode_text(tok(["a man in a scarlet coat"]))
        replaced = model.encode_text(tok([f"a man in a {nearest} coat"]))
        assert torch.equal(unseen, replaced)
        off_spec = _spec(oov="encode")
        off_spec.text_tower["vocabulary"] = vocab
        off = get_tokenizer(off_spec)
        assert not torch.equal(model.encode_text(off(["a man in a scarlet coat"])), unseen)
        # Known words only: the same ids, bit-for-bit the same features with the map on or off.
        known = ["a woman in a red coat with a white hat", "a man in blue jeans"]
        assert torch.equal(tok(known), off(known))
        assert torch.equal(model.encode_text(tok(known)), model.encode_text(off(known)))
        drop_spec = _spec(oov="drop")
        drop_spec.text_tower["vocabulary"] = vocab
        drop = get_tokenizer(drop_spec)  # oov: drop reads the query without its unseen words
        assert torch.equal(drop(["a man in a scarlet coat"]), tok(["a man in a coat"]))
    assert tok.explain("A scarlet coat")["scarlet"] == [(nearest, pytest.approx(1.0))]
    assert drop.explain("a scarlet coat") == {"scarlet": []}
    assert off.explain("a scarlet coat") == {}  # oov: encode shows nothing


def test_vocabulary_travels_in_the_checkpoint(tmp_path, monkeypatch, capsys):
    from tbps.models.checkpoint import load_model, save_checkpoint

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    model = create_model(_spec(oov="nearest", oov_k=3), load_pretrained=False).eval()
    model.prepare_vocabulary(["a red coat", "blue jeans"])
    save_checkpoint(tmp_path / "m.pt", {"model_spec": model.spec.to_dict(), "model": model.state_dict()})
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.spec.text_tower["vocabulary"] == ["a", "blue", "coat", "jeans", "red"]
    assert {k: loaded.spec.text_tower[k] for k in ("oov", "oov_k")} == {"oov": "nearest", "oov_k": 3}
    tok_a, tok_b = get_tokenizer(model.spec), get_tokenizer(loaded.spec)
    assert tok_b.explain("a crimson anorak") == tok_a.explain("a crimson anorak") != {}
    with torch.no_grad():
        q = ["a crimson anorak", "a red coat"]
        assert torch.equal(loaded.encode_text(tok_b(q)), model.encode_text(tok_a(q)))
    # What `tbps search` shows: the Encoder cleans the query as in training, then explains it.
    from tbps.cli.search import _print_unknown_words
    from tbps.retrieval.encoder import Encoder

    why = Encoder.from_checkpoint(tmp_path / "m.pt").unknown_words("A Crimson coat!")
    # the same words and weights (the weights to float rounding: the frozen encoder may read the word
    # in a batch of another size)
    want = tok_a.explain("a crimson coat")
    assert list(why) == ["crimson"] == list(want)
    assert [w for w, _ in why["crimson"]] == [w for w, _ in want["crimson"]]
    assert [p for _, p in why["crimson"]] == pytest.approx([p for _, p in want["crimson"]], abs=1e-6)
    _print_unknown_words(why)
    (w1, p1), (w2, p2), (w3, p3) = why["crimson"]
    assert capsys.readouterr().err == (f'tbps: "crimson" (not in the training vocabulary) -> {w1} ({p1:.2f}), '
                                       f"{w2} ({p2:.2f}), {w3} ({p3:.2f})\n")
    # Without a recorded vocabulary (checkpoints from before) nothing is mapped.
    assert WordTokenizer(tok_a.dictionary, 8, _spec()).explain("a crimson anorak") == {}


@pytest.mark.parametrize("bad", [{"oov": "guess"}, {"oov": None}, {"oov_k": 0}, {"oov_k": 1.5}, {"oov_temperature": 0},
                                 {"oov_temperature": "hot"}, {"oov_definitions": "yes"}, {"oov_context": 1},
                                 {"vocabulary": "red coat"}, {"vocabulary": [1, 2]},
                                 {"word_pairs": [[0, 1]]},  # pairs without a vocabulary
                                 {"word_pairs": "0 1", "vocabulary": ["a", "b"]}])
def test_bad_oov_settings_are_named(bad):
    with pytest.raises(TextStreamError, match=next(iter(bad))):
        text_tower_config(_spec(**bad))


@pytest.mark.parametrize("pairs", [[[0, 2]], [[0]], [[True, 0]], [[0, -1]], [[0.0, 1]], [5], [[0, 1, 1]]])
def test_bad_word_pairs_are_named_where_they_are_read(pairs, tmp_path, monkeypatch):
    """A checkpoint is untrusted: a malformed pair list is one clear error when the tokenizer first reads it."""
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    spec = _spec(oov="wordnet", vocabulary=["a", "b"], word_pairs=pairs)
    text_tower_config(spec)  # the list itself passes; its entries are checked where they are read
    with pytest.raises(TextStreamError, match="word_pairs"):
        get_tokenizer(spec)(["a zorblax"])


def test_wordnet_is_the_default_and_without_one_the_encoder_reads_alone(tmp_path, monkeypatch):
    from tests.test_wordnet import write_wordnet
    import tbps.models.text_stream as ts

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    monkeypatch.setattr(ts, "load_colour_names", lambda: None)  # WordNet alone (the colour table: test_colour_names.py)
    monkeypatch.setattr(ts, "_WARNED", {"colours"})
    torch.manual_seed(0)
    model = create_model(_spec(), load_pretrained=False).eval()
    model.prepare_vocabulary(["a man in a red coat", "a woman in a blue jacket"])
    recorded = {k: model.spec.text_tower[k] for k in ("oov", "oov_k", "oov_definitions", "oov_colours", "oov_context")}
    assert recorded == {"oov": "wordnet", "oov_k": 3, "oov_definitions": True, "oov_colours": True, "oov_context": True}
    model.spec.text_tower["oov_context"] = False  # WordNet's readings alone here (in context: the tests below)
    monkeypatch.setenv("TBPS_WORDNET", str(write_wordnet(tmp_path / "wn")))
    assert get_tokenizer(model.spec).explain("a scarlet anorak") == {"scarlet": [("red", pytest.approx(1.0))],
                                                                     "anorak": [("jacket", pytest.approx(1.0))]}
    # tawny: related to no training word, its definition in the test database names red and blue
    assert sorted(w for w, _ in get_tokenizer(model.spec).explain("tawny")["tawny"]) == ["blue", "red"]
    nearest_spec = _spec(oov="nearest")
    nearest_spec.text_tower["vocabulary"] = model.spec.text_tower["vocabulary"]
    expected = get_tokenizer(nearest_spec).explain("a scarlet anorak")
    monkeypatch.delenv("TBPS_WORDNET")
    monkeypatch.setattr(ts, "load_wordnet", lambda: None)
    monkeypatch.setattr(ts, "_WARNED", {"colours"})
    with pytest.warns(UserWarning, match="no WordNet is installed .*apt install wordnet-base"):
        assert get_tokenizer(model.spec).explain("a scarlet anorak") == expected


CONTEXT_VECTORS = {  # "mules" is nearest "woman", then "a", then "coat"; "scarlet" nearest "red"
    "red": (1.0, 0.0, 0.0), "coat": (0.0, 1.0, 0.0), "woman": (0.0, 0.0, 1.0), "a": (0.5, 0.5, 0.5),
    "mules": (0.1, 0.3, 0.9), "scarlet": (0.9, 0.1, 0.0),
}


class ContextEncoder(TableEncoder):
    key, vectors = "table-context", CONTEXT_VECTORS


class OneColour:
    """A colour table that reads "scarlet" as one given training word (``tbps.models.colour_names.ColourNames``'s
    ``nearest``), to show a first-stage candidate kept where it fits its neighbours and overruled where not."""

    def __init__(self, word):
        self.word = word

    def nearest(self, word, known):
        return self.word if word == "scarlet" else None


def test_unseen_word_is_read_among_the_training_words_that_fit_its_neighbours():
    d = WordDictionary(ContextEncoder(), cache=False)
    vocab = ["a", "coat", "red", "woman"]
    captions = [["a", "red", "coat"], ["a", "woman"], ["a", "coat"]]  # pairs: a-red, red-coat, a-woman, a-coat
    pairs = {(x, y) for c in captions for x, y in zip(c, c[1:])}
    plain = NearestWords(d, vocab, k=1)
    m = NearestWords(d, vocab, k=1, pairs=pairs)
    assert m.tag != plain.tag  # rows are kept apart from the context-free map's

    def read(mapper, words):
        rows = mapper.rows(words, d.ids(words))
        return [d.vectors[r].tolist() for r in rows]

    coat, woman = list(CONTEXT_VECTORS["coat"]), list(CONTEXT_VECTORS["woman"])
    assert read(plain, ["red", "mules"])[1] == woman  # without context: the encoder's nearest
    assert read(m, ["red", "mules"])[1] == coat  # only "coat" follows "red" in the training captions
    assert read(m, ["a", "mules"])[1] == woman  # after "a": red, woman and coat fit; the encoder picks
    assert read(m, ["mules"])[0] == woman  # no training word beside it: no constraint
    # Both neighbours: none fits between "red" and "a" (red-x-a is never seen), so the words that fit either
    # compete (coat after red; nothing precedes "a"); the same word gets a row per context.
    rows = m.rows(["red", "mules", "a", "mules"], d.ids(["red", "mules", "a", "mules"]))
    assert d.vectors[rows[1]].tolist() == coat and d.vectors[rows[3]].tolist() == woman and rows[1] != rows[3]
    assert m.explain(["red", "mules", "a", "mules"]) == {"mules": [("coat", pytest.approx(1.0))]}  # its first place
    # A colour-table (first-stage) reading is kept where it fits and overruled where it does not.
    coloured = NearestWords(d, vocab, k=1, colours=OneColour("red"), pairs=pairs)
    assert coloured.explain(["a", "scarlet", "coat"])["scarlet"] == [("red", pytest.approx(1.0))]
    assert coloured.explain(["red", "scarlet"])["scarlet"] == [("coat", pytest.approx(1.0))]
    # Training words are never touched.
    ids = d.ids(["a", "red", "coat"])
    assert m.rows(["a", "red", "coat"], ids) == ids


def test_training_records_word_pairs_and_queries_are_read_in_context(tmp_path, monkeypatch):
    from tests.test_wordnet import write_wordnet
    import tbps.models.text_stream as ts

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    monkeypatch.setenv("TBPS_WORDNET", str(write_wordnet(tmp_path / "wn")))
    monkeypatch.setattr(ts, "load_colour_names", lambda: None)
    monkeypatch.setattr(ts, "_WARNED", {"colours"})
    torch.manual_seed(0)
    model = create_model(_spec(oov_context=True), load_pretrained=False).eval()
    model.prepare_vocabulary(["a man in a red coat", "a woman in a blue jacket"])
    tower = model.spec.text_tower
    vocab = tower["vocabulary"]
    assert tower["oov_context"] is True
    pairs = {(vocab[i], vocab[j]) for i, j in tower["word_pairs"]}
    assert pairs == {("a", "man"), ("man", "in"), ("in", "a"), ("a", "red"), ("red", "coat"), ("a", "woman"),
                     ("woman", "in"), ("a", "blue"), ("blue", "jacket")}
    assert tower["word_pairs"] == sorted(tower["word_pairs"])
    tok = get_tokenizer(model.spec)
    # "zorblax" is no word WordNet or a colour table knows: its neighbours decide what may read it.
    assert [w for w, _ in tok.explain("a red zorblax")["zorblax"]] == ["coat"]
    assert sorted(w for w, _ in tok.explain("a zorblax in a coat")["zorblax"]) == ["man", "woman"]
    # WordNet's reading where it fits ("scarlet" is a kind of red, and red follows "a").
    assert tok.explain("a scarlet coat")["scarlet"] == [("red", pytest.approx(1.0))]
    with torch.no_grad():  # the model reads exactly the mix it explains: here, coat
        assert torch.equal(model.encode_text(tok(["a red zorblax"])), model.encode_text(tok(["a red coat"])))
    # Off (the recorded setting changed), the same word reads the same in every context.
    off = ModelSpec.from_dict(model.spec.to_dict())
    off.text_tower["oov_context"] = False
    tok_off = get_tokenizer(off)
    assert tok_off.explain("a red zorblax") == tok_off.explain("a zorblax in a coat")
