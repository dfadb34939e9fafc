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


def write_wordnet(root, synsets=SYNSETS, glosses=GLOSSES):
    """A WordNet database folder in the real format: data.* lines at their byte offsets, sorted index.*."""
    names = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
    by_pos = {p: [k for k, v in synsets.items() if v[0] == p] for p in names}

    def line(key, offsets):
        pos, kind, lemmas, ptrs = synsets[key]
        words = " ".join(f"{w} 0" for w in lemmas)
        pointers = " ".join(f"{s} {offsets.get(t, 0):08d} {synsets[t][0] if synsets[t][1] != 's' else 's'} 0000"
                            for s, t in ptrs)
        gloss = glosses.get(key, "a gloss")
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
    "jacket": (0.1, 0.1, 0.9), "with": (0.5, 0.4, 0.6), "who": (0.3, 0.6, 0.1), "jogger": (0.0, 0.9, 0.3),
    # closed compounds no database lists; the encoder alone reads the first two wrongly (blue, red)
    "goosejacket": (0.1, 0.9, 0.2), "redshoes": (0.9, 0.1, 0.0), "zzshoes": (0.0, 0.2, 1.0),
    "goosewith": (0.5, 0.5, 0.5),
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


def test_a_closed_compound_no_reading_reaches_is_read_as_its_head(wordnet):
    d = WordDictionary(WordNetTable(), cache=False)
    vocab = ["a", "blue", "jacket", "red", "shoe", "with"]
    off = NearestWords(d, vocab, k=3, temperature=0.1, lexicon=wordnet, definitions=True)
    on = NearestWords(d, vocab, k=3, temperature=0.1, lexicon=wordnet, definitions=True, heads=True)
    assert off.explain(["goosejacket"])["goosejacket"][0][0] == "blue"  # the encoder alone: wrong
    assert off.explain(["redshoes"])["redshoes"][0][0] == "red"
    # a word WordNet knows ("goose") or a training word ("red"), then a training noun (through its plural)
    assert on.explain(["goosejacket", "redshoes"]) == {"goosejacket": [("jacket", pytest.approx(1.0))],
                                                       "redshoes": [("shoe", pytest.approx(1.0))]}
    # no word before the ending ("zz" + shoes), or an ending that is no noun ("with"): the encoder, as before
    assert on.explain(["zzshoes", "goosewith"]) == off.explain(["zzshoes", "goosewith"])
    # words an earlier reading reaches are read as before (scarlet: related to red; tawny: its definition)
    assert on.explain(["scarlet", "tawny"]) == off.explain(["scarlet", "tawny"])
    assert on.tag != off.tag
    assert NearestWords(d, vocab, k=1, heads=True).tag == NearestWords(d, vocab, k=1).tag  # no lexicon: no heads


def test_a_word_no_reading_reaches_can_be_left_out(wordnet):
    d = WordDictionary(WordNetTable(), cache=False)
    vocab = ["a", "blue", "red", "shoe"]
    keep = NearestWords(d, vocab, k=1, lexicon=wordnet)
    drop = NearestWords(d, vocab, k=1, lexicon=wordnet, unread="drop")
    assert keep.explain(["zebra"]) == {"zebra": [("red", pytest.approx(1.0))]}  # the encoder's guess
    assert drop.explain(["zebra", "scarlet"]) == {"zebra": [], "scarlet": [("red", pytest.approx(1.0))]}
    words = ["a", "zebra", "scarlet"]
    ids = d.ids(words)
    rows = drop.rows(words, ids)
    assert rows[0] == ids[0] and rows[1] is None and torch.equal(d.vectors[rows[2]], d.vectors[d.index["red"]])
    # with no reading to trust (no lexicon, no colour table) every word is the encoder's, none left out
    assert NearestWords(d, vocab, k=1, unread="drop").explain(["zebra"]) == {"zebra": [("red", pytest.approx(1.0))]}
    with pytest.raises(ValueError, match="unread 'skip'"):
        NearestWords(d, vocab, unread="skip")


def test_with_rare_definition_words_a_word_in_many_glosses_does_not_read(tmp_path):
    # 150 more glosses holding "who", one defining a jogger by "who" and "red"; "who" is a noun (as WordNet's
    # World Health Organization), so the training word "who" is one of the nouns a definition can name
    synsets = {**SYNSETS, "jogger": ("n", "n", ["jogger"], []), "who": ("n", "n", ["who"], [])}
    glosses = {**GLOSSES, "jogger": "someone who runs slowly in red", "who": "an agency"}
    for i in range(150):
        synsets[f"filler{i}"] = ("n", "n", [f"filler{i}"], [])
        glosses[f"filler{i}"] = "a thing who fills"
    wn = WordNet(write_wordnet(tmp_path / "wn", synsets, glosses))
    total = len(synsets)
    assert wn.gloss_share("who") == pytest.approx(151 / total)
    assert wn.gloss_share("red") == pytest.approx(2 / total)  # tawny's gloss and the jogger's
    assert wn.gloss_share("zebra") == 0.0 and wn.gloss_share("RED") == wn.gloss_share("red")
    d = WordDictionary(WordNetTable(), cache=False)
    vocab = ["a", "blue", "red", "who"]
    every = NearestWords(d, vocab, k=1, lexicon=wn, definitions=True)
    rare = NearestWords(d, vocab, k=1, lexicon=wn, definitions=True, rare_definition_words=True)
    assert every.explain(["jogger"]) == {"jogger": [("who", pytest.approx(1.0))]}  # the encoder prefers "who"
    assert rare.explain(["jogger"]) == {"jogger": [("red", pytest.approx(1.0))]}  # "who" is in 80 % of glosses
    assert rare.explain(["tawny"]) == every.explain(["tawny"])  # red and blue are in few
    assert rare.tag != every.tag
    assert NearestWords(d, vocab, k=1, lexicon=wn, rare_definition_words=True).tag == NearestWords(
        d, vocab, k=1, lexicon=wn).tag  # without the definitions reading the switch does nothing


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


@pytest.mark.skipif(find_wordnet() is None, reason="no WordNet installed (apt install wordnet-base)")
def test_the_installed_wordnet_reads_closed_compounds_by_their_heads():
    from tbps.models.wordnet import load_wordnet

    d = WordDictionary(type("Ones", (WordEncoder,), {"key": "ones", "dim": 2,
                                                     "encode": lambda self, ws: torch.ones(len(ws), 2)})(),
                       cache=False)
    vocab = ["a", "red", "shorts", "pants", "bag", "tie", "his", "who", "wearing"]
    wn = load_wordnet()
    m = NearestWords(d, vocab, k=5, lexicon=wn, definitions=True, heads=True, unread="drop")
    read = {w: {n for n, _ in v} for w, v in m.explain(["boardshorts", "hotpants", "bookbag", "auntie"]).items()}
    # boardshorts, hotpants, bookbag: no reading before reaches a training word; auntie is no "aun" + tie
    assert read == {"boardshorts": {"shorts"}, "hotpants": {"pants"}, "bookbag": {"bag"}, "auntie": set()}
    # joggers, "someone who runs a steady slow pace": "who" is in 5 % of WordNet's glosses, so it does not read
    assert wn.gloss_share("who") > 0.02 > wn.gloss_share("white") > wn.gloss_share("coat")
    every = NearestWords(d, vocab, k=5, lexicon=wn, definitions=True)
    rare = NearestWords(d, vocab, k=5, lexicon=wn, definitions=True, rare_definition_words=True, unread="drop")
    assert every.explain(["joggers"]) == {"joggers": [("who", pytest.approx(1.0))]}
    assert rare.explain(["joggers"]) == {"joggers": []}
