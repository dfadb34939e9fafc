"""MeFa's text hard negatives (tbps.data.negatives.text): real spaCy, a corpus of synthetic
captions, and a tiny randomly initialised BertForMaskedLM for tier 3."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from tbps.data.negatives import text as hn
from tbps.data.negatives.text import TextNegatives
from tbps.data.negatives.words import WORD_RE

S_BRIEF = ("a gentleman who is wearing a purple short-sleeved t-shirt with a checked pattern and purple trousers "
           "he has short grey hair he is carrying a grey handbag")
S_SWAP = "a woman in a red jacket and a blue skirt with white shoes"
S_VERB = "a man wearing a red shirt"
S_NOTHING = "this is a person"
EPOCHS = range(30)


@pytest.fixture(scope="module")
def nlp():
    from tbps.data.phrases import load_nlp

    return load_nlp()


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("tbps_cache")
        mp.setenv("TBPS_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def corpus():
    """240 cleaned synthetic captions (many synonyms) plus the fixed sentences."""
    from tbps.synth import make_caption, sample_identities
    from tbps.data.text import clean_caption

    ids, _ = sample_identities(120, seed=0)
    rng = np.random.default_rng(0)
    caps = [clean_caption(make_caption(a, rng)) for a in ids for _ in range(2)]
    return caps + [S_BRIEF, S_SWAP, S_VERB, S_NOTHING]


@pytest.fixture(scope="module")
def gen(corpus, cache_env):
    g = TextNegatives(tiers=(1, 2), seed=0)
    g.prepare(corpus)
    return g


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    """A randomly initialised 2-layer BertForMaskedLM with MiniLM's uncased WordPiece vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from tbps.models.hf_text import resolve_path

    out = tmp_path_factory.mktemp("tiny_mlm")
    tok = AutoTokenizer.from_pretrained(resolve_path("minilm"), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, tiny_mlm):
    """The same tiny BERT without a masked-LM head (like MiniLM): not usable for tier 3."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_encoder")
    BertModel(BertConfig.from_pretrained(tiny_mlm)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_mlm).save_pretrained(out)
    return out


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def separators(text: str) -> list[str]:
    return WORD_RE.split(text)


def word_tags(nlp, text: str) -> list[tuple[str, str]]:
    """(coarse POS, fine tag) per WORD_RE word: its last non-punctuation spaCy token."""
    doc = nlp(text)
    out = []
    for m in WORD_RE.finditer(text):
        toks = [t for t in doc if t.idx < m.end() and t.idx + len(t) > m.start() and t.pos_ != "PUNCT"]
        out.append((toks[-1].pos_, toks[-1].tag_))
    return out


def changed(orig: str, neg: str) -> list[int]:
    """Indices of the words that differ; the text between words must be byte-identical."""
    assert separators(orig) == separators(neg), (orig, neg)
    a, b = words(orig), words(neg)
    assert len(a) == len(b)
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def test_spacy_loads_offline_and_tags(nlp):
    tags = {t.text: t.pos_ for t in nlp("a man wearing a red shirt")}
    assert tags["red"] == "ADJ" and tags["shirt"] == "NOUN" and tags["wearing"] == "VERB"


def test_module_imports_neither_torch_nor_transformers():
    code = ("import sys, tbps.data.negatives.text; "
            "bad = [m for m in ('torch', 'transformers', 'spacy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lexicon_relations():
    assert hn.related("grey", "gray") and hn.related("plaid", "checked") and hn.related("purse", "handbag")
    assert hn.related("shoes", "sneakers") and hn.related("bag", "backpack") and hn.related("trousers", "pants")
    assert not hn.related("sneakers", "boots") and not hn.related("jacket", "coat") and not hn.related("red", "blue")
    assert hn._noun_class("t-shirt")[0] == "garment" and hn._noun_class("undershirt")[0] == "garment"
    assert hn._noun_class("committee") is None and hn._noun_class("camera") is None


def test_tier1_replaces_a_key_noun_with_same_category_and_number(gen, nlp):
    key = {"t-shirt": "garment", "trousers": "garment", "hair": "body", "handbag": "accessory"}
    orig_words, orig_tags = words(S_BRIEF), word_tags(nlp, S_BRIEF)
    seen = set()
    for epoch in EPOCHS:
        (neg, _) = gen.negatives(S_BRIEF, epoch)
        assert neg is not None
        idx = changed(S_BRIEF, neg)
        assert 1 <= len(idx) <= 2
        new_words, new_tags = words(neg), word_tags(nlp, neg)
        for i in idx:
            old, new = orig_words[i], new_words[i]
            assert old in key, (old, neg)  # only key nouns change
            assert hn._noun_class(new)[0] == key[old]  # same category
            assert new_tags[i][1] == orig_tags[i][1]  # same number (NN / NNS)
            assert not hn.related(old, new)  # really a different thing
            seen.add(old)
        assert [p for p, _ in new_tags] == [p for p, _ in orig_tags]  # grammar proxy
    assert len(seen) >= 3  # different key nouns over the epochs


def test_tier1_swaps_two_key_nouns_within_the_caption(gen, nlp):
    ws = words(S_SWAP)
    kinds = set()
    for epoch in EPOCHS:
        neg = gen.negatives(S_SWAP, epoch)[0]
        idx = changed(S_SWAP, neg)
        nw = words(neg)
        assert [p for p, _ in word_tags(nlp, neg)] == [p for p, _ in word_tags(nlp, S_SWAP)]
        if len(idx) == 2:
            i, j = idx
            assert (nw[i], nw[j]) == (ws[j], ws[i]) == ("skirt", "jacket")
            kinds.add("swap")
        else:
            (i,) = idx
            assert ws[i] in ("jacket", "skirt", "shoes") and hn._noun_class(nw[i])[0] == "garment"
            kinds.add("replace")
    assert kinds == {"swap", "replace"}


def test_tier2_substitutes_a_colour_or_a_verb(gen, nlp):
    ws, tags = words(S_VERB), word_tags(nlp, S_VERB)
    verbs = set(gen._pools[("verb", "VBG")].words)
    kinds = set()
    for epoch in EPOCHS:
        neg = gen.negatives(S_VERB, epoch)[1]
        (i,) = changed(S_VERB, neg)
        new, new_tags = words(neg)[i], word_tags(nlp, neg)
        assert [p for p, _ in new_tags] == [p for p, _ in tags]
        if ws[i] == "red":
            assert hn._CATEGORY[new] == "colour" and not hn.related("red", new)
            kinds.add("colour")
        else:
            assert ws[i] == "wearing" and new in verbs and new != "wearing"
            assert new_tags[i] == ("VERB", "VBG")
            kinds.add("verb")
    assert kinds == {"colour", "verb"}


def test_tiers_give_none_when_nothing_can_change(gen):
    assert all(gen.negatives(S_NOTHING, e) == [None, None] for e in range(5))


def test_unseen_caption_is_parsed_on_the_spot(gen):
    c = "a girl wearing a green coat and black boots"
    t1, t2 = gen.negatives(c, 0)
    assert t1 is not None and t2 is not None
    assert words(t1)[4] != "coat" or words(t1)[7] != "boots"


def test_determinism_and_epoch_table(gen, corpus, cache_env):
    a = gen.epoch_table(corpus, 3)
    other = TextNegatives(tiers=(1, 2), seed=0)
    other.prepare(corpus)  # from the disk cache this time
    assert other.epoch_table(corpus, 3) == a
    assert all(gen.negatives(c, 3) == a[c] for c in corpus[:40])
    b = gen.epoch_table(corpus, 4)
    assert sum(a[c] != b[c] for c in corpus) > len(corpus) // 4
    reseeded = TextNegatives(tiers=(1, 2), seed=1)
    reseeded.prepare(corpus)
    r = reseeded.epoch_table(corpus, 3)
    assert sum(r[c] != a[c] for c in corpus) > len(corpus) // 4
    # tiers 1-2 touch only cached parses: well under a millisecond a caption
    best = min(_timed(gen.epoch_table, corpus, e) for e in (10, 11, 12))
    assert best / len(corpus) < 1e-3, best


def _timed(f, *args) -> float:
    t = time.perf_counter()
    f(*args)
    return time.perf_counter() - t


def test_parses_are_cached_on_disk(gen, corpus, cache_env, monkeypatch):
    assert list((cache_env / "text_negatives").glob("*.json.gz"))

    def no_parse(texts, batch_size=256):
        raise AssertionError("spaCy should not run again")

    monkeypatch.setattr(hn, "_parse", no_parse)
    g = TextNegatives(tiers=(1, 2), seed=0)
    g.prepare(corpus)
    assert g.negatives(S_BRIEF, 0) == gen.negatives(S_BRIEF, 0)


def test_tier3_off_without_a_masked_lm(capsys, tmp_path, tiny_encoder):
    capsys.readouterr()
    for mlm, why in ((None, "mlm is None"), (str(tmp_path / "missing"), "cannot load"),
                     (str(tiny_encoder), "no trained masked-LM head")):
        g = TextNegatives(mlm=mlm)
        err = capsys.readouterr().err
        assert g.tiers == (1, 2)
        assert len(err.strip().splitlines()) == 1 and "tier 3" in err and why in err, err
        assert "losses.imr_text.mlm" in err and "ForMaskedLM" in err
        g.prepare([S_VERB])
        assert len(g.negatives(S_VERB, 0)) == 2
    g = TextNegatives(tiers=(3, 1), mlm=None)
    assert g.tiers == (1,) and "tier 3" in capsys.readouterr().err


def test_tier3_takes_the_best_acceptable_prediction(tiny_mlm, corpus, cache_env, nlp, capsys):
    import torch
    from spacy.lang.en.stop_words import STOP_WORDS
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    g = TextNegatives(tiers=(3,), mlm=str(tiny_mlm), mlm_top_k=50)
    assert g.tiers == (3,) and capsys.readouterr().err == ""
    g.prepare(corpus)
    caps = corpus[:12] + [S_BRIEF]
    table = g.epoch_table(caps, 0)
    assert all(table[c] == g.negatives(c, 0) for c in caps)
    tok = AutoTokenizer.from_pretrained(tiny_mlm)
    model = AutoModelForMaskedLM.from_pretrained(tiny_mlm).eval()
    done = 0
    for c in caps:
        (neg,) = table[c]
        if neg is None:
            continue
        (i,) = changed(c, neg)
        ms = list(WORD_RE.finditer(c))
        m = ms[i]
        old, new = m.group(), words(neg)[i]
        prev = ms[i - 1] if i else None
        article = prev.group() if prev and prev.group() in ("a", "an") and not c[prev.end():m.start()].strip() else None
        # the independent ranking: top-k at the mask, whole alphabetic words, acceptable, POS kept
        enc = tok(c[:m.start()] + tok.mask_token + c[m.end():], return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0, int((enc["input_ids"][0] == tok.mask_token_id).nonzero()[0])]
        expected = None
        for piece in tok.convert_ids_to_tokens(logits.topk(50).indices.tolist()):
            w = piece.lower()
            if piece.startswith("##") or not (w.isascii() and w.isalpha()) or w in STOP_WORDS or hn.related(old, w):
                continue
            if not hn._article_ok(article, w):  # "a"/"an" agreement, the module's documented rule
                continue
            cand = c[:m.start()] + w + c[m.end():]
            if word_tags(nlp, cand)[i][0] == word_tags(nlp, c)[i][0]:
                expected = w
                break
        assert new == expected, (c, neg)
        done += 1
    assert done >= 3
    # a DataLoader worker's copy reloads the masked LM and agrees
    import pickle

    copy = pickle.loads(pickle.dumps(g))
    copy._completions.clear()
    assert all(copy.negatives(c, 0) == table[c] for c in caps[:4])
