"""Unseen colour words read through a colour-name table (tbps/models/colour_names.py)."""

from __future__ import annotations

import pytest
import torch

from tbps.models import ModelSpec, create_model, get_tokenizer
from tbps.models.colour_names import ColourNames, load_colour_names, srgb_to_lab
from tbps.models.text_stream import TextStreamError, WordDictionary, text_tower_config
from tbps.models.word_map import NearestWords
from tbps.models.wordnet import WordNet
from tests.test_open_vocab import TableEncoder
from tests.test_wordnet import write_wordnet

# A constructed table: "scarlet" lies nearest "dark red" in colour, "navy" nearest "navy blue" (its own entry left
# out), "teal" nearest "blue green", and no other name ends in "teal".
TABLE = {"red": "#e50000", "dark red": "#840000", "blue": "#0343df", "navy blue": "#001146", "green": "#15b01a",
         "blue green": "#137e6d", "scarlet": "#be0119", "navy": "#01153e", "teal": "#029386", "denim": "#3b638c"}


def test_srgb_to_lab_matches_known_values():
    assert srgb_to_lab("#ffffff") == pytest.approx((100.0, 0.0, 0.0), abs=0.02)  # the 4-digit sRGB matrix
    assert srgb_to_lab("#000000") == pytest.approx((0.0, 0.0, 0.0), abs=1e-9)
    # CIELAB (D65) of the sRGB primaries, as colour-science references give them
    assert srgb_to_lab("#ff0000") == pytest.approx((53.24, 80.09, 67.20), abs=0.05)
    assert srgb_to_lab("#00ff00") == pytest.approx((87.73, -86.18, 83.18), abs=0.05)
    assert srgb_to_lab("#0000ff") == pytest.approx((32.30, 79.19, -107.86), abs=0.05)
    with pytest.raises(ValueError, match="#rrggbb"):
        srgb_to_lab("red")


def test_a_colour_name_is_read_as_the_last_word_of_the_nearest_name_ending_in_a_candidate():
    table = ColourNames(TABLE)
    assert len(table) == len(TABLE) and "Scarlet" in table and "anorak" not in table
    assert table.nearest("scarlet", {"red", "blue", "green"}) == "red"  # "dark red" is nearest
    assert table.nearest("navy", {"red", "blue", "green"}) == "blue"  # "navy blue", not its own "navy"
    assert table.nearest("teal", {"red", "blue", "green"}) == "green"  # "blue green" ends in green
    assert table.nearest("scarlet", {"blue"}) == "blue"  # only names ending in a candidate compete
    assert table.nearest("anorak", {"red"}) is None  # not a colour name
    assert table.nearest("teal", {"teal"}) is None  # no other name ends in it


def test_the_colour_table_comes_before_wordnet_and_the_encoder(tmp_path):
    d = WordDictionary(TableEncoder(), cache=False)  # the encoder alone reads scarlet as red, tote as bag
    lexicon = WordNet(write_wordnet(tmp_path / "wn"))  # scarlet a kind of red here too
    vocab = ["red", "blue", "bag", "a"]
    table = ColourNames({"scarlet": "#0000ff", "sky blue": "#0000f0"})  # a scarlet the colour of the sky
    without = NearestWords(d, vocab, k=3, temperature=0.1, lexicon=lexicon)
    assert [w for w, _ in without.explain(["scarlet"])["scarlet"]] == ["red"]
    m = NearestWords(d, vocab, k=3, temperature=0.1, lexicon=lexicon, colours=table)
    why = m.explain(["scarlet", "tote", "red"])
    assert why["scarlet"] == [("blue", 1.0)]  # its colour, not WordNet's relation nor the encoder's nearest word
    assert why["tote"] == without.explain(["tote"])["tote"]  # no colour name: read as before
    row = m.rows(["scarlet"], d.ids(["scarlet"]))[0]
    assert torch.equal(d.vectors[row], d.vectors[d.index["blue"]])
    assert m.tag.endswith("-colours") and not without.tag.endswith("-colours")


def _spec(**tower):
    return ModelSpec(arch="micro-vit", image_size=(32, 16), context_length=12, embed_dim=16,
                     text_tower={"source": "random", "hidden": 8, "dim": 8, **tower})


def test_oov_colours_is_recorded_and_read_through_the_tokenizer(tmp_path, monkeypatch):
    import tbps.models.text_stream as ts

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    monkeypatch.setattr(ts, "load_wordnet", lambda: None)
    monkeypatch.setattr(ts, "_WARNED", {"wordnet"})
    monkeypatch.setattr(ts, "load_colour_names", lambda: ColourNames(TABLE))
    torch.manual_seed(0)
    # the colour table alone (read in context, "navy" between "a" and "coat" would be red: the only training
    # word these two captions put there; tests/test_open_vocab.py)
    model = create_model(_spec(oov_colours=True, oov_context=False), load_pretrained=False).eval()
    model.prepare_vocabulary(["a man in a red coat", "a woman in a blue jacket"])
    assert model.spec.text_tower["oov_colours"] is True
    tok = get_tokenizer(model.spec)
    assert tok.explain("a navy coat") == {"navy": [("blue", pytest.approx(1.0))]}
    same = tok("a man in a red coat")
    without = _spec(oov_colours=False)
    without.text_tower["vocabulary"] = model.spec.text_tower["vocabulary"]
    expected = get_tokenizer(without).explain("a navy coat")  # the encoder's reading
    assert set(expected) == {"navy"} and len(expected["navy"]) == 3
    monkeypatch.setattr(ts, "load_colour_names", lambda: None)  # no matplotlib: one warning, the reading without
    monkeypatch.setattr(ts, "_WARNED", {"wordnet"})
    with pytest.warns(UserWarning, match="matplotlib .* not installed"):
        off = get_tokenizer(model.spec)
        assert off.explain("a navy coat") == expected
    assert torch.equal(off("a man in a red coat"), same)  # training words: the same rows either way
    with pytest.raises(TextStreamError, match="oov_colours"):
        text_tower_config(_spec(oov_colours="yes"))


def test_the_installed_table_reads_common_colour_words():
    table = load_colour_names()
    if table is None:
        pytest.skip("matplotlib is not installed")
    basic = {"red", "blue", "green", "yellow", "orange", "pink", "purple", "white", "black", "grey", "brown"}
    assert {w: table.nearest(w, basic) for w in ("navy", "olive", "mustard", "ivory", "charcoal", "scarlet")} == {
        "navy": "blue", "olive": "green", "mustard": "yellow", "ivory": "white", "charcoal": "grey", "scarlet": "red"}
