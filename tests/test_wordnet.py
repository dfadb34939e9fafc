"""WordNet read from its database files (models/wordnet.py) and unseen query words read through it
(models/word_map.py, oov: wordnet). A small database in the real wndb(5WN) format is written here;
one test reads the real one where it is installed (CI installs Debian's wordnet-base)."""

from __future__ import annotations

import pytest
import torch

from tbps.models.text_stream import WordDictionary, WordEncoder
from tbps.models.word_map import NearestWords
from tbps.models.wordnet import WordNet, WordNetError, find_wordnet
from tests.test_open_vocab import TableEncoder

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n  2 Princeton University\n"
# name: (pos, synset type, lemmas, [(pointer symbol, target name)])
SYNSETS = {
    "color": ("n", "n", ["color", "colour"], [("~", "red"), ("~", "blue")]),
    "red": ("n", "n", ["red", "redness"], [("@", "color"), ("~", "scarlet"), ("~", "crimson")]),
    "scarlet": ("n", "n", ["scarlet", "vermilion"], [("@", "red")]),
    "crimson": ("n", "n", ["crimson"], [("@", "red")]),
    "blue": ("n", "n", ["blue"], [("@", "color"), ("~", "navy")]),
    "navy": ("n", "n", ["navy", "navy_blue"], [("@", "blue")]),
    "clothing": ("n", "n", ["clothing", "wear"], [("~", "footwear"), ("~", "jacket")]),
    "footwear": ("n", "n", ["footwear"], [("@", "clothing"), ("~", "shoe")]),
    "shoe": ("n", "n", ["shoe"], [("@", "footwear")]),
    "jacket": ("n", "n", ["jacket"], [("@", "clothing"), ("~", "anorak")]),
    "anorak": ("n", "n", ["anorak", "parka"], [("@", "jacket")]),
    "goose": ("n", "n", ["goose"], []),
    "chromatic": ("a", "a", ["chromatic"], [("&", "reddish"), ("&", "olive")]),
    "reddish": ("a", "s", ["reddish", "ruddy"], [("&", "chromatic")]),
    "olive": ("a", "s", ["olive"], [("&", "chromatic")]),
    "wear_v": ("v", "v", ["wear"], []),
    # "olive" (the satellite above) relates to no colour word; a compound it begins does (olive_green is a
    # kind of green), another does not. "scarlet" begins one too.
    "green": ("n", "n", ["green"], [("@", "color")]),
    "gray": ("n", "n", ["gray", "grey"], [("@", "color")]),
    "olive_green": ("n", "n", ["olive_green", "olive-green"], [("@", "green")]),
    "olive-gray": ("a", "s", ["olive-gray"], [("&", "chromatic")]),
    "scarlet_fever": ("n", "n", ["scarlet_fever", "fever"], []),
    # a satellite with no head: WordNet relates it to nothing, its definition names two colours
    "tawny": ("a", "s", ["tawny"], []),
}
# Definitions (the rest: "a gloss"); quoted examples follow a definition after "; ".
GLOSSES = {"tawny": 'of a light red to blue colour; "a tawny shoe"', "goose": "web-footed bird; any of various geese"}
EXCEPTIONS = {"noun.exc": "geese goose\n", "verb.exc": "wore wear\n"}


def write_wordnet(root, synsets=SYNSETS):
    """A WordNet database folder in the real format: data.* lines at their byte offsets, sorted index.*."""
    names = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
    by_pos = {p: [k for k, v in synsets.items() if v[0] == p] for p in names}

    def line(key, offsets):
        pos, kind, lemmas, ptrs = synsets[key]
        words = " ".join(f"{w} 0" for w in lemmas)
        pointers = " ".join(f"{s} {offsets.get(t, 0):08d} {synsets[t][0] if synsets[t][1] != 's' else 's'} 0000"
                            for s, t in ptrs)
        gloss = GLOSSES.get(key, "a gloss")
        return f"{offsets.get(key, 0):08d} 00 {kind} {len(lemmas):02x} {words} {len(ptrs):03d} {pointers} | {gloss}\n"

    offsets = {}
    for pos in names:  # every field has a fixed width, so a line's length does not depend on the offsets
        at = len(HEADER)
        for key in by_pos[pos]:
            offsets[key] = at
            at += len(line(key, {}).encode())
    root.mkdir(parents=True, exist_ok=True)
    for pos, name in names.items():
        (root / f"data.{name}").write_text(HEADER + "".join(line(k, offsets) for k in by_pos[pos]), "latin-1")
        index: dict[str, list[int]] = {}
        for key in by_pos[pos]:
            for lemma in synsets[key][2]:
                index.setdefault(lemma, []).append(offsets[key])
        rows = [f"{lemma} {pos} {len(offs)} 1 @ {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs) + "  \n"
                for lemma, offs in sorted(index.items())]
        (root / f"index.{name}").write_text(HEADER + "".join(rows), "latin-1")
    for name, text in EXCEPTIONS.items():
        (root / name).write_text(text)
    return root


@pytest.fixture
def wordnet(tmp_path):
    return WordNet(write_wordnet(tmp_path / "wn"))


def test_every_lemma_is_found_and_absent_words_are_not(wordnet):
    for key, (pos, _, lemmas, _) in SYNSETS.items():
        for lemma in lemmas:
            assert wordnet.base_forms(lemma, pos) == [lemma]
            assert any(wordnet.synset(s)[1] == lemmas for s in wordnet.senses(lemma))
    assert wordnet.senses("zebra") == [] and wordnet.senses("aaa") == [] and wordnet.senses("zzz") == []
    assert wordnet.base_forms("shoes", "n") == ["shoe"] and wordnet.base_forms("geese", "n") == ["goose"]
    assert wordnet.base_forms("wearing", "v") == ["wear"] and wordnet.base_forms("wore", "v") == ["wear"]
    assert wordnet.base_forms("wearing", "n") == []  # "wear" the noun is not an inflection of "wearing"


def test_related_goes_up_or_down_never_to_siblings(wordnet):
    r = wordnet.related("scarlet")
    assert r[("scarlet", "n")] == 0 and r[("vermilion", "n")] == 0  # one synset
    assert r[("red", "n")] == 1 and r[("color", "n")] == 2  # what it is a kind of
    assert ("crimson", "n") not in r and ("blue", "n") not in r  # siblings and cousins: no
    assert ("color", "n") not in wordnet.related("scarlet", up=1)
    f = wordnet.related("footwear")
    assert f[("shoe", "n")] == 1 and f[("clothing", "n")] == 1  # its kinds (down) and its kind (up)
    assert ("jacket", "n") not in f  # up to clothing, then down: a sibling
    assert ("shoe", "n") not in wordnet.related("footwear", down=0)
    assert wordnet.related("parkas")[("jacket", "n")] == 1  # through the plural
    # Adjectives: a satellite's "&" points up to its head, the head's "&" down to its satellites.
    assert wordnet.related("ruddy") == {("reddish", "a"): 0, ("ruddy", "a"): 0, ("chromatic", "a"): 1}
    assert wordnet.related("chromatic")[("olive", "a")] == 1
    assert wordnet.related("unknownword") == {}


def test_compounds_are_the_lemmas_a_word_begins(wordnet):
    assert wordnet.compounds("olive") == ["olive_green", "olive-green", "olive-gray"]
    assert wordnet.compounds("olive-grays") == []  # no base form that begins one
    assert wordnet.compounds("Olive") == wordnet.compounds("olive")
    assert wordnet.compounds("scarlet") == ["scarlet_fever"]
    assert wordnet.compounds("green") == [] and wordnet.compounds("zebra") == []
    assert wordnet.compounds("oliv") == []  # a prefix of a word is not a compound of it


def test_find_wordnet_follows_the_environment(tmp_path, monkeypatch):
    root = write_wordnet(tmp_path / "wn")
    monkeypatch.setenv("TBPS_WORDNET", str(root))
    assert find_wordnet() == root
    monkeypatch.setenv("TBPS_WORDNET", str(tmp_path / "nothing"))
    with pytest.raises(WordNetError, match="TBPS_WORDNET=.*nothing: no WordNet database"):
        find_wordnet()


def test_damaged_databases_are_named(tmp_path):
    root = write_wordnet(tmp_path / "wn")
    (root / "index.verb").unlink()
    with pytest.raises(WordNetError, match="index.verb: missing"):
        WordNet(root)
    root = write_wordnet(tmp_path / "wn2")
    data = (root / "data.noun").read_bytes()
    (root / "data.noun").write_bytes(data[:len(HEADER)] + b"x" + data[len(HEADER) + 1 :])  # the first offset
    with pytest.raises(WordNetError, match=r"data.noun: no synset at byte"):
        WordNet(root).related("color")
    root = write_wordnet(tmp_path / "wn3")
    text = (root / "index.noun").read_text().replace("jacket n 1 1 @ 1 0", "jacket n 3 1 @ 3 0")
    (root / "index.noun").write_text(text)
    with pytest.raises(WordNetError, match="index.noun: 'jacket n 3"):
        WordNet(root).senses("jacket")


VECTORS = {  # a 3-d space where the encoder alone gets colours wrong: "scarlet" is nearest "blue"
    "red": (1.0, 0.0, 0.0), "blue": (0.0, 1.0, 0.0), "shoe": (0.0, 0.0, 1.0), "clothing": (0.3, 0.3, 0.6),
    "a": (0.5, 0.5, 0.5), "scarlet": (0.2, 0.9, 0.1), "footwear": (0.3, 0.3, 0.7), "zebra": (0.9, 0.1, 0.0),
    "goose": (0.1, 0.9, 0.2), "olive": (0.0, 0.0, 1.0), "green": (0.0, 0.7, 0.7), "gray": (0.6, 0.0, 0.8),
    "fever": (0.9, 0.0, 0.1), "tawny": (0.0, 0.1, 1.0),
}


class WordNetTable(TableEncoder):
    key, vectors = "table-wn-3", VECTORS


def test_wordnet_candidates_come_first_and_the_encoder_decides_among_them(wordnet):
    d = WordDictionary(WordNetTable(), cache=False)
    vocab = ["a", "blue", "clothing", "red", "shoe"]
    plain = NearestWords(d, vocab, k=1)
    lexical = NearestWords(d, vocab, k=1, lexicon=wordnet)
    assert plain.explain(["scarlet"])["scarlet"] == [("blue", pytest.approx(1.0))]  # the encoder alone: wrong
    assert lexical.explain(["scarlet"])["scarlet"] == [("red", pytest.approx(1.0))]  # WordNet: a kind of red
    row = lexical.rows(["scarlet"], d.ids(["scarlet"]))[0]
    assert torch.equal(d.vectors[row], d.vectors[d.index["red"]])
    # Fewest steps win: footwear is one step from both shoe (down) and clothing (up); the encoder picks.
    assert lexical.explain(["footwear"])["footwear"] == [("clothing", pytest.approx(1.0))]
    both = NearestWords(d, vocab, k=3, temperature=0.1, lexicon=wordnet).explain(["footwear"])["footwear"]
    assert [w for w, _ in both] == ["clothing", "shoe"]  # only the two related words get weight
    assert sum(p for _, p in both) == pytest.approx(1.0)
    # A word WordNet relates to no training word, or does not know: the encoder's nearest.
    assert lexical.explain(["goose", "zebra"]) == {"goose": [("blue", pytest.approx(1.0))],
                                                   "zebra": [("red", pytest.approx(1.0))]}
    assert lexical.tag != plain.tag  # their mixed rows never share a key


def test_a_word_known_only_in_compounds_is_read_through_them(wordnet):
    d = WordDictionary(WordNetTable(), cache=False)
    vocab = ["a", "blue", "fever", "gray", "green", "red", "shoe"]
    # olive relates to no training word; olive_green, which it begins, is a kind of green. The encoder
    # alone reads it as shoe, and would prefer gray to green; olive-gray relates to no training word.
    assert NearestWords(d, vocab, k=1).explain(["olive"])["olive"] == [("shoe", pytest.approx(1.0))]
    m = NearestWords(d, vocab, k=3, temperature=0.1, lexicon=wordnet)
    assert m.explain(["olive"])["olive"] == [("green", pytest.approx(1.0))]
    # a word WordNet relates to a training word (scarlet: red, one step) is not read through its compounds
    # (scarlet_fever is a synonym of fever, also one step further)
    assert m.explain(["scarlet"])["scarlet"] == [("red", pytest.approx(1.0))]


def test_definitions_are_read_without_their_examples(wordnet):
    assert wordnet.definitions("tawny") == ["of a light red to blue colour"]
    assert wordnet.definitions("geese") == ["web-footed bird", "any of various geese"]
    assert wordnet.definitions("zebra") == []


def test_a_word_related_to_none_is_read_through_the_words_its_definitions_name(wordnet):
    d = WordDictionary(WordNetTable(), cache=False)
    vocab = ["a", "blue", "gray", "red", "shoe"]
    off = NearestWords(d, vocab, k=3, temperature=0.1, lexicon=wordnet)
    on = NearestWords(d, vocab, k=3, temperature=0.1, lexicon=wordnet, definitions=True)
    assert off.explain(["tawny"])["tawny"][0][0] == "shoe"  # related to none: the encoder alone, wrong
    # the colours its definition names, the encoder weighing them; not "a" (a word of one letter), not
    # the "shoe" of its quoted example
    read = on.explain(["tawny"])["tawny"]
    assert [w for w, _ in read] == ["blue", "red"] and sum(p for _, p in read) == pytest.approx(1.0)
    assert on.tag != off.tag
    # words WordNet relates to a training word are read as before; a definition naming none leaves the encoder
    assert on.explain(["scarlet"])["scarlet"] == [("red", pytest.approx(1.0))]
    assert on.explain(["goose"]) == off.explain(["goose"])
    # with no lexicon the switch does nothing
    assert NearestWords(d, vocab, k=1, definitions=True).tag == NearestWords(d, vocab, k=1).tag


@pytest.mark.skipif(find_wordnet() is None, reason="no WordNet installed (apt install wordnet-base)")
def test_the_installed_wordnet_reads_colour_and_garment_synonyms():
    from tbps.models.wordnet import load_wordnet

    wn = load_wordnet()
    d = WordDictionary(type("Ones", (WordEncoder,), {"key": "ones", "dim": 2,
                                                     "encode": lambda self, ws: torch.ones(len(ws), 2)})(),
                       cache=False)
    vocab = ["a", "red", "blue", "green", "black", "white", "jacket", "trousers", "backpack", "bag", "shoes",
             "wearing", "girl", "man", "with", "in", "shorts"]
    m = NearestWords(d, vocab, k=5, lexicon=wn)  # equal vectors: the weights are WordNet's candidates alone
    read = {w: {n for n, _ in m.explain([w])[w]} for w in
            ("scarlet", "navy", "ebony", "ivory", "anorak", "chinos", "rucksack", "footwear", "lass", "fellow",
             "olive", "bermudas")}
    assert read == {"scarlet": {"red"}, "navy": {"blue"}, "ebony": {"black"}, "ivory": {"white"},
                    "anorak": {"jacket"}, "chinos": {"trousers"}, "rucksack": {"backpack"},
                    "footwear": {"shoes"}, "lass": {"girl"}, "fellow": {"man"},
                    "olive": {"green"}, "bermudas": {"shorts"}}  # through olive_green, bermuda_shorts
