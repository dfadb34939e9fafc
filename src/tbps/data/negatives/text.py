"""MeFa's text hard negatives: each training caption rewritten in three tiers (IMR(T) path).

MeFa ("Intra-modal reasoning path") builds three tiers of negative captions:

1. **key-noun swap** (the paper uses NLTK): either two key nouns of the caption trade places
   ("a red jacket and a blue skirt" -> "a red skirt and a blue jacket"), or one key noun is
   replaced by another key noun of the same category and number taken from the other
   captions of the corpus ("a grey handbag" -> "a grey backpack");
2. **adjective / verb substitution**: one colour, length, pattern, sleeve, tone or other
   adjective, or one verb, is replaced by a different word of the same class from the corpus
   ("purple trousers" -> "green trousers", "carrying" -> "holding");
3. **masked-LM completion**: one key word is masked and a pretrained masked LM (RoBERTa in
   the paper; any local Hugging Face ``*ForMaskedLM``) fills it in.

Everything runs in the data pipeline, never in a model's forward: :meth:`TextNegatives.prepare`
parses the training captions once with spaCy (cached on disk), :meth:`TextNegatives.epoch_table`
rewrites them all at the start of each epoch. A negative is a pure function of
``(seed, epoch, caption)`` (and, for tier 3, of the masked LM), so workers, resumes and
reruns agree.

Words. A caption is cut into words by :data:`WORD_RE` (letters and digits, hyphenated
compounds such as ``t-shirt`` / ``short-sleeved`` kept whole); only whole words made of
letters and hyphens change, every other byte of the caption stays as it was. spaCy splits
hyphenated words, so a word takes the POS / tag / dependency of its syntactic head token
(the token whose head lies outside the word: ``shirt`` in ``t-shirt``).

Choices, and why:

* **Key nouns** are NOUN heads (not compound modifiers: ``shoulder`` in "shoulder bag" stays)
  that the lexicon below files as garment, accessory or body part, directly, through the
  last part of a hyphenated word (``tee-shirt``), or through a known head suffix
  (``undershirt`` -> shirt). Person nouns (man, lady...) are not key nouns: the pronouns
  around them would give the rewrite away.
* **Replacement words come only from the corpus** (frequency-weighted, so typos are rare):
  the lexicon recognises words, it never injects them, so words a dataset keeps unseen for
  robustness tests (``tbps.synth.RESERVED_SYNONYMS``) stay unseen.
* **A negative must really differ**: a word is never replaced by a synonym (grey/gray,
  plaid/checked, purse/handbag, trousers/pants...) nor swapped between a generic word and a
  member of its family (shoes/sneakers, bag/backpack, top/blouse, hair/ponytail): those
  rewrites would describe the same person.
* **"a"/"an" agreement**: a word right after "a"/"an" is only replaced by one that takes the
  same article, so no negative can be spotted by a broken article.
* Colour, pattern, length, sleeve and tone words are classed by the lexicon whatever spaCy
  tags them ("checked" is often VBN); other adjectives and verbs keep spaCy's fine tag
  (JJ, VBG, VBZ...). Forms of be/have/do/get and adjectival participles ("knit beanie")
  are not substituted.
* **Tier 3 acceptance**: among the masked LM's top ``mlm_top_k`` predictions at the mask, in
  rank order, the first one that is a whole word (a word-start piece: no ``##``
  continuation for WordPiece, a ``Ġ``/``▁`` piece for byte-level BPE / SentencePiece),
  ASCII-alphabetic, different from and no synonym of the original word, not a spaCy stopword,
  agrees with a preceding "a"/"an", and keeps spaCy's coarse POS at that position when the
  completed caption is re-tagged. When no candidate qualifies the next key word (in the
  epoch's random order) is tried. Completions are memoised per (caption, word): the masked
  LM is deterministic, so later epochs mostly reuse them.

Without a loadable masked LM tier 3 is switched off with one message on stderr, never faked.
spaCy and (for tier 3) torch/transformers are imported where used.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import hashlib
import json
import os
import random
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

WORD_RE = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")
_CHANGEABLE_RE = re.compile(r"[a-z]+(?:-[a-z]+)*")
_PARSE_FORMAT = "hard_negatives/1"  # bump when the stored tags change meaning

# --------------------------------------------------------------------------------------
# Lexicon. Groups are separated by ";", synonyms inside a group by spaces; singular forms
# (plurals are derived), except words in _PLURAL_ONLY.
# --------------------------------------------------------------------------------------

_NOUN_GROUPS = {
    "garment": """
        shirt; t-shirt tshirt tee tee-shirt; blouse; polo polo-shirt; top; tanktop tank-top; camisole cami;
        tunic; jersey; sweater jumper pullover; sweatshirt; hoodie hoody; cardigan; vest; waistcoat;
        jacket; windbreaker; blazer; coat overcoat; raincoat; parka; trenchcoat; poncho; cape; suit;
        tuxedo; dress; gown; sundress; jumpsuit; romper; overalls dungarees; uniform; robe; skirt miniskirt;
        trousers pants slacks; jeans denims; shorts; leggings; tights; stockings; sweatpants joggers trackpants;
        capris; khakis; shoe footwear; sneaker trainers; boot; sandal; slipper; heel; loafer; flats; flip-flop;
        sock; underwear; outerwear; sportswear""",
    "accessory": """
        bag; handbag purse; backpack rucksack knapsack; satchel; tote; briefcase; suitcase luggage;
        schoolbag; wallet; umbrella; hat; cap; beanie toque; helmet; headband hairband; bandana; scarf;
        shawl; glove; mitten; belt; tie necktie; bowtie; watch wristwatch; bracelet; necklace; earring;
        glasses spectacles eyeglasses; sunglasses; goggles; mask; headphones headset earphones;
        phone cellphone smartphone; bottle; book; newspaper; cup; box; package parcel; bicycle bike;
        scooter; skateboard; stroller pram; cart trolley; badge; lanyard; folder; laptop""",
    "body": """
        hair; ponytail; bun; braid; pigtail; head; face; beard; moustache mustache; shoulder; arm; hand;
        wrist; finger; elbow; leg; knee; thigh; foot; ankle; waist; hip; back; neck; chest; ear; eye;
        forehead""",
}
_PLURAL_ONLY = set("""overalls dungarees trousers pants slacks jeans denims shorts leggings tights stockings
    sweatpants joggers trackpants capris khakis trainers flats glasses spectacles eyeglasses sunglasses goggles
    headphones earphones""".split())
_IRREGULAR_PLURAL = {"foot": "feet", "scarf": "scarves", "shelf": "shelves"}
_MASS_NOUNS = {"footwear", "luggage", "underwear", "outerwear", "sportswear", "hair"}

# Words that name a whole family: never swapped with a member of their own family.
_FAMILIES = {
    "footwear": ("shoe footwear", "sneaker trainers boot sandal slipper heel loafer flats flip-flop"),
    "bag": ("bag", "handbag purse backpack rucksack knapsack satchel tote briefcase suitcase schoolbag"),
    "top": ("top", "shirt t-shirt tshirt tee tee-shirt blouse polo polo-shirt tanktop tank-top camisole cami "
                   "tunic jersey sweater jumper pullover sweatshirt hoodie hoody cardigan vest waistcoat jacket "
                   "windbreaker blazer coat overcoat raincoat parka trenchcoat poncho"),
    "hair": ("hair", "ponytail bun braid pigtail"),
}
# Unknown corpus nouns ending in one of these (after >= 3 letters) join its category and family.
# (suffix -> the lexicon word whose category and family it takes)
_SUFFIX_HEADS = {"shirt": "shirt", "coat": "coat", "skirt": "skirt", "jacket": "jacket", "pants": "pants",
                 "trousers": "trousers", "dress": "dress", "boot": "boot", "shoe": "shoe", "bag": "bag",
                 "pack": "backpack", "glasses": "glasses", "watch": "watch", "wear": "underwear"}

_ADJ_GROUPS = {
    "colour": """black; white; grey gray; red crimson scarlet; blue azure; navy; green; yellow; orange;
        purple violet; pink; brown; beige; khaki; tan; maroon burgundy; cream; gold golden; silver;
        teal turquoise; olive; lavender; blonde blond; auburn""",
    "pattern": """plain solid; striped stripy; checked plaid checkered checkerboard tartan gingham;
        dotted polka-dot polka-dotted spotted; floral flowered flowery; camouflage camo""",
    "length": "long; short; knee-length; ankle-length; shoulder-length; waist-length",
    "sleeve": "short-sleeved short-sleeve; long-sleeved long-sleeve; sleeveless",
    "tone": "dark; light; bright; pale",
}
_NO_SUBSTITUTE_VERBS = set("""be is are was were been being am have has had having do does did doing done
    get gets got getting gotten""".split())


def _plural(word: str) -> str:
    if word in _IRREGULAR_PLURAL:
        return _IRREGULAR_PLURAL[word]
    if word.endswith(("s", "sh", "ch", "x", "z")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _build_lexicon():
    category: dict[str, str] = {}   # word -> garment / accessory / body / colour / pattern / ...
    concept: dict[str, str] = {}    # word -> synonym group id (singular and plural share it)
    for groups, is_noun in ((_NOUN_GROUPS, True), (_ADJ_GROUPS, False)):
        for cat, text in groups.items():
            for group in text.split(";"):
                words = group.split()
                for w in words:
                    forms = [w] if (not is_noun or w in _PLURAL_ONLY or w in _MASS_NOUNS) else [w, _plural(w)]
                    assert w not in category, f"lexicon word {w!r} listed twice"
                    for f in forms:  # a derived plural may repeat a synonym's (hoody/hoodie)
                        category.setdefault(f, cat)
                        concept.setdefault(f, words[0])
    family: dict[str, tuple[str, bool]] = {}  # word -> (family, is the family's generic word)
    for fam, (generic, members) in _FAMILIES.items():
        for names, is_generic in ((generic, True), (members, False)):
            for w in names.split():
                for f in (w, _plural(w)):
                    family[f] = (fam, is_generic)
    return category, concept, family


_CATEGORY, _CONCEPT, _FAMILY = _build_lexicon()
_SUFFIX_FORMS = tuple((f, rep) for head, rep in _SUFFIX_HEADS.items() for f in dict.fromkeys((head, _plural(head))))
_NOUN_CATEGORIES = frozenset(_NOUN_GROUPS)
_AN_EXCEPTIONS_A = ("uni", "use", "usu", "eu", "one", "once")
_AN_EXCEPTIONS_AN = ("hour", "honest", "honour", "honor", "heir")


def _takes_an(word: str) -> bool:
    if word.startswith(_AN_EXCEPTIONS_AN):
        return True
    return word[:1] in "aeiou" and not word.startswith(_AN_EXCEPTIONS_A)


def _article_ok(article: str | None, word: str) -> bool:
    return article is None or (article == "an") == _takes_an(word)


@functools.lru_cache(maxsize=1 << 16)
def _noun_class(word: str) -> tuple[str, str, tuple[str, bool] | None] | None:
    """(category, concept, family) of a key-noun word form, or None."""
    if _CATEGORY.get(word) in _NOUN_CATEGORIES:
        return _CATEGORY[word], _CONCEPT[word], _FAMILY.get(word)
    last = word.rsplit("-", 1)[-1]
    if last != word and _CATEGORY.get(last) in _NOUN_CATEGORIES:
        return _CATEGORY[last], word, _member_of(last)
    for form, rep in _SUFFIX_FORMS:
        if word.endswith(form) and len(word) - len(form) >= 3 and word[:-len(form)].isalpha():
            return _CATEGORY[rep], word, _member_of(rep)
    return None


def _member_of(word: str) -> tuple[str, bool] | None:
    fam = _FAMILY.get(word)
    return (fam[0], False) if fam else None


@functools.lru_cache(maxsize=1 << 18)
def related(a: str, b: str) -> bool:
    """True when replacing word ``a`` by ``b`` would not change the description: the same word,
    synonyms (grey/gray, purse/handbag), or a family's generic word and one of its members
    (shoes/sneakers, bag/backpack)."""
    a, b = a.lower(), b.lower()
    if a == b:
        return True
    ca, cb = _concept_of(a), _concept_of(b)
    if ca is not None and ca == cb:
        return True
    fa, fb = _FAMILY.get(a) or _family_of(a), _FAMILY.get(b) or _family_of(b)
    return bool(fa and fb and fa[0] == fb[0] and (fa[1] or fb[1]))


def _concept_of(word: str) -> str | None:
    if word in _CONCEPT:
        return _CONCEPT[word]
    nc = _noun_class(word)
    return nc[1] if nc else None


def _family_of(word: str) -> tuple[str, bool] | None:
    nc = _noun_class(word)
    return nc[2] if nc else None


# --------------------------------------------------------------------------------------
# Parsing: spaCy once per caption, reduced to one "POS TAG DEP" per word of WORD_RE.
# --------------------------------------------------------------------------------------

def _word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in WORD_RE.finditer(text)]


def _doc_word_tags(doc, spans: Sequence[tuple[int, int]]) -> list[tuple[str, str, str]]:
    """(POS, TAG, DEP) of each word's syntactic head token (the token whose head is outside it)."""
    out = []
    toks = list(doc)
    starts = [t.idx for t in toks]
    for s, e in spans:
        ids = []
        for i in range(max(bisect.bisect_right(starts, s) - 1, 0), len(toks)):
            if starts[i] >= e:
                break
            if starts[i] + len(toks[i]) > s:
                ids.append(i)
        if not ids:
            out.append(("X", "XX", "dep"))
            continue
        inside = set(ids)
        heads = [i for i in ids if toks[i].head.i not in inside or toks[i].head.i == i]
        heads = [i for i in heads if toks[i].pos_ != "PUNCT"] or heads or ids
        t = toks[heads[-1]]
        out.append((t.pos_, t.tag_, t.dep_))
    return out


def _parse(texts: Sequence[str], batch_size: int = 256) -> list[str]:
    """Captions -> one string per caption: "POS TAG DEP" per word, words joined by "|"."""
    from tbps.data.phrases import load_nlp

    nlp = load_nlp()
    out = []
    for text, doc in zip(texts, nlp.pipe(list(texts), batch_size=batch_size)):
        out.append("|".join(" ".join(x) for x in _doc_word_tags(doc, _word_spans(text))))
    return out


def _cache_root() -> Path:
    from tbps.files import cache_dir

    return cache_dir("text_negatives")


def cached_parse(texts: Sequence[str]) -> list[str]:
    """:func:`_parse` memoised on disk (gzip JSON under ``$TBPS_CACHE/text_negatives``), keyed by the texts, the spaCy model and the format."""
    from tbps.data.phrases import load_nlp
    from tbps.files import atomic_write

    texts = list(texts)
    nlp = load_nlp()
    meta = f"{nlp.meta.get('name', '')}-{nlp.meta.get('version', '')}|{_PARSE_FORMAT}"
    key = hashlib.sha256(("\x00".join(texts) + "|" + meta).encode()).hexdigest()[:24]
    path = _cache_root() / f"{key}.json.gz"
    if path.exists():
        try:
            out = json.loads(gzip.decompress(path.read_bytes()))
            if isinstance(out, list) and len(out) == len(texts):
                return out
        except (OSError, ValueError, EOFError):
            pass  # a damaged entry is parsed again and rewritten
    out = _parse(texts)
    try:
        with atomic_write(path, "wb") as f:
            f.write(gzip.compress(json.dumps(out, separators=(",", ":")).encode(), compresslevel=6))
    except OSError:
        pass  # a read-only cache only costs the re-parse next time
    return out


# --------------------------------------------------------------------------------------
# Slots: the words of a caption that a tier may change.
# --------------------------------------------------------------------------------------

class Slot(NamedTuple):
    start: int
    end: int
    word: str
    kind: str        # "noun" (key noun), "lex" (colour/pattern/length/sleeve/tone), "adj", "verb"
    pool: tuple      # pool key: ("noun", category, "NN"|"NNS"), ("lex", category), ("adj", tag), ("verb", tag)
    pos: str         # spaCy coarse POS of the word's head token
    article: str | None  # "a"/"an" right before the word, else None


def _slots(text: str, tags: str) -> tuple[Slot, ...]:
    from spacy.lang.en.stop_words import STOP_WORDS

    spans = _word_spans(text)
    parts = tags.split("|") if tags else []
    if len(parts) != len(spans):
        return ()
    out = []
    prev = None  # (end, word) of the previous word
    for (s, e), part in zip(spans, parts):
        word = text[s:e]
        article = prev[1] if prev and prev[1] in ("a", "an") and not text[prev[0]:s].strip() else None
        prev = (e, word.lower())
        if not _CHANGEABLE_RE.fullmatch(word):
            continue
        pos, tag, dep = part.split(" ")
        cat = _CATEGORY.get(word)
        if cat is not None and cat not in _NOUN_CATEGORIES:
            out.append(Slot(s, e, word, "lex", ("lex", cat), pos, article))
        elif pos in ("NOUN", "PROPN") and dep != "compound" and tag.startswith("NN"):
            nc = _noun_class(word)
            if nc is not None:
                number = "NNS" if tag in ("NNS", "NNPS") else "NN"
                out.append(Slot(s, e, word, "noun", ("noun", nc[0], number), pos, article))
        elif "-" in word or word in STOP_WORDS or cat is not None or _noun_class(word) is not None:
            continue  # a lexicon noun tagged ADJ/VERB ("jeans" as VBZ) is a tagging slip, not a verb
        elif pos == "ADJ":
            out.append(Slot(s, e, word, "adj", ("adj", tag), pos, article))
        elif pos == "VERB" and word not in _NO_SUBSTITUTE_VERBS and dep not in ("amod", "compound"):
            out.append(Slot(s, e, word, "verb", ("verb", tag), pos, article))
    return tuple(out)


class _Pool:
    """Distinct corpus words of one class, drawn in proportion to their frequency."""

    __slots__ = ("words", "cum", "weights")

    def __init__(self, counts: Counter):
        self.words = sorted(counts)  # sorted: the draw must not depend on insertion order
        self.weights = [counts[w] for w in self.words]
        self.cum, total = [], 0
        for c in self.weights:
            total += c
            self.cum.append(total)

    def draw(self, rng: random.Random, ok, tries: int = 8) -> str | None:
        for _ in range(tries):
            w = rng.choices(self.words, cum_weights=self.cum)[0]
            if ok(w):
                return w
        cands = [(w, c) for w, c in zip(self.words, self.weights) if ok(w)]
        if not cands:
            return None
        return rng.choices([w for w, _ in cands], weights=[c for _, c in cands])[0]


def _substitute(text: str, edits: Iterable[tuple[int, int, str]]) -> str:
    out, last = [], 0
    for s, e, new in sorted(edits):
        out.append(text[last:s])
        out.append(new)
        last = e
    out.append(text[last:])
    return "".join(out)


def _rng(seed: int, epoch: int, tier: int, caption: str) -> random.Random:
    h = zlib.crc32(f"{seed}\x00{epoch}\x00{tier}\x00{caption}".encode())
    return random.Random(h)


class MaskedLMUnavailable(RuntimeError):
    """The masked LM for tier 3 cannot be used (the message says why)."""


_ENABLE_HINT = ("to enable it, set losses.imr_text.mlm to a local folder holding a *ForMaskedLM model and its "
                "tokenizer (save_pretrained), such as roberta-base")


class TextNegatives:
    """Hard negative captions for MeFa's IMR(T) path.

    ``tiers``: which of the three tiers to produce, in this order; ``mlm``: local folder (or
    cached hub name) of a Hugging Face masked LM for tier 3, loaded with
    ``local_files_only=True``; ``seed``: with the epoch and the caption, fixes every random
    choice; ``mlm_top_k``: how many of the masked LM's predictions tier 3 considers.

    After construction ``tiers`` holds the tiers actually on (3 is dropped, with one message
    on stderr, when no masked LM can be loaded). ``mlm_device`` (default "cpu") and
    ``mlm_batch_size`` may be set before :meth:`epoch_table`; a pickled copy (DataLoader
    workers) reloads the masked LM on the CPU when it first needs it.
    """

    def __init__(self, tiers=(1, 2, 3), mlm: str | None = None, seed: int = 0, mlm_top_k: int = 50):
        tiers = tuple(dict.fromkeys(int(t) for t in tiers))
        bad = [t for t in tiers if t not in (1, 2, 3)]
        if bad:
            raise ValueError(f"text negative tiers must be among 1, 2, 3; got {bad}")
        if mlm_top_k < 1:
            raise ValueError(f"mlm_top_k must be >= 1, got {mlm_top_k}")
        self.mlm = mlm
        self.seed = int(seed)
        self.mlm_top_k = int(mlm_top_k)
        self.mlm_device = "cpu"
        self.mlm_batch_size = 64
        self._mlm = None  # (tokenizer, model, word-start style) once loaded
        self._slots: dict[str, tuple[Slot, ...]] = {}
        self._pools: dict[tuple, _Pool] | None = None
        self._completions: dict[tuple[str, int], str | None] = {}  # (caption, word start) -> tier-3 rewrite
        if 3 in tiers:
            try:
                self._mlm = self._load_mlm()
            except MaskedLMUnavailable as e:
                print(f"tbps: MeFa text negatives: tier 3 (masked-LM completion) is off: {e}; {_ENABLE_HINT}",
                      file=sys.stderr)
                tiers = tuple(t for t in tiers if t != 3)
        self.tiers: tuple[int, ...] = tiers

    # ------------------------------------------------------------------ pickling (workers)
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_mlm"] = None  # reloaded lazily: torch modules and CUDA do not cross processes well
        state["mlm_device"] = "cpu"
        return state

    # ------------------------------------------------------------------ corpus
    def prepare(self, captions: list[str]) -> None:
        """Parse the training captions once (spaCy, cached on disk) and build the word pools
        that tiers 1 and 2 draw replacements from (each word weighted by its frequency)."""
        counts = Counter(captions)
        unique = list(counts)
        for text, tags in zip(unique, cached_parse(unique)):
            self._slots[text] = _slots(text, tags)
        from spacy.lang.en.stop_words import STOP_WORDS

        pools: dict[tuple, Counter] = {}
        for text, n in counts.items():
            for s in self._slots[text]:
                if s.word not in STOP_WORDS:  # "back", "top": replaceable, but re-tagged ADV/ADJ as replacements
                    pools.setdefault(s.pool, Counter())[s.word] += n
        self._pools = {k: _Pool(c) for k, c in pools.items()}

    def _slots_of(self, caption: str) -> tuple[Slot, ...]:
        slots = self._slots.get(caption)
        if slots is None:  # not seen by prepare(): parsed on the spot, pools unchanged
            slots = self._slots[caption] = _slots(caption, _parse([caption])[0])
        return slots

    # ------------------------------------------------------------------ tiers 1 and 2
    def _draw(self, rng: random.Random, slot: Slot) -> str | None:
        pool = self._pools.get(slot.pool)
        if pool is None:
            return None
        return pool.draw(rng, lambda w: not related(slot.word, w) and _article_ok(slot.article, w))

    def _tier1(self, caption: str, slots: tuple[Slot, ...], epoch: int) -> str | None:
        rng = _rng(self.seed, epoch, 1, caption)
        nouns = [s for s in slots if s.kind == "noun"]
        swaps = [(a, b) for i, a in enumerate(nouns) for b in nouns[i + 1:]
                 if a.pool == b.pool and not related(a.word, b.word)
                 and _article_ok(a.article, b.word) and _article_ok(b.article, a.word)]
        if swaps and rng.random() < 0.5:
            a, b = rng.choice(swaps)
            return _substitute(caption, [(a.start, a.end, b.word), (b.start, b.end, a.word)])
        rng.shuffle(nouns)
        for s in nouns:
            w = self._draw(rng, s)
            if w is not None:
                return _substitute(caption, [(s.start, s.end, w)])
        if swaps:
            a, b = rng.choice(swaps)
            return _substitute(caption, [(a.start, a.end, b.word), (b.start, b.end, a.word)])
        return None

    def _tier2(self, caption: str, slots: tuple[Slot, ...], epoch: int) -> str | None:
        rng = _rng(self.seed, epoch, 2, caption)
        mods = [s for s in slots if s.kind in ("lex", "adj", "verb")]
        rng.shuffle(mods)
        for s in mods:
            w = self._draw(rng, s)
            if w is not None:
                return _substitute(caption, [(s.start, s.end, w)])
        return None

    def _tier3_order(self, caption: str, slots: tuple[Slot, ...], epoch: int) -> list[Slot]:
        rng = _rng(self.seed, epoch, 3, caption)
        keys = [s for s in slots if s.kind in ("noun", "lex", "adj")]
        rng.shuffle(keys)
        return keys

    # ------------------------------------------------------------------ public
    def negatives(self, caption: str, epoch: int) -> list[str | None]:
        """One rewrite of ``caption`` per tier in :attr:`tiers`, in that order; None where a tier
        finds nothing to change. Deterministic in (seed, epoch, caption)."""
        return self.epoch_table([caption], epoch)[caption]

    def epoch_table(self, captions: list[str], epoch: int, progress: bool = False) -> dict[str, list[str | None]]:
        """``{caption: negatives(caption, epoch)}`` for a whole epoch; tier 3 runs the masked LM
        in batches of ``mlm_batch_size`` masked captions."""
        if self._pools is None:
            raise RuntimeError("TextNegatives.prepare(training captions) must run before negatives are drawn")
        from tqdm import tqdm

        table: dict[str, list[str | None]] = {}
        orders: dict[str, list[Slot]] = {}
        for c in tqdm(captions, desc="text negatives", unit="caption", disable=not progress, leave=False):
            if c in table:
                continue
            slots = self._slots_of(c)
            row = []
            for t in self.tiers:
                if t == 1:
                    row.append(self._tier1(c, slots, epoch))
                elif t == 2:
                    row.append(self._tier2(c, slots, epoch))
                else:
                    row.append(None)
                    orders[c] = self._tier3_order(c, slots, epoch)
            table[c] = row
        if 3 in self.tiers:
            i3 = self.tiers.index(3)
            for c, neg in self._complete(orders, progress).items():
                table[c][i3] = neg
        return table

    # ------------------------------------------------------------------ tier 3
    def _load_mlm(self):
        if self.mlm is None:
            raise MaskedLMUnavailable("no masked LM was given (mlm is None)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch  # noqa: F401
            import transformers
            from transformers import AutoModelForMaskedLM, AutoTokenizer
        except ImportError as e:
            raise MaskedLMUnavailable(f"transformers is not installed ({e})") from e
        level, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()  # our own message says what is wrong
        transformers.logging.disable_progress_bar()
        try:
            tok = AutoTokenizer.from_pretrained(self.mlm, local_files_only=True)
            model, info = AutoModelForMaskedLM.from_pretrained(self.mlm, local_files_only=True,
                                                               output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - any load failure (missing folder, unknown config) turns tier 3 off
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MaskedLMUnavailable(f"cannot load a masked LM from {self.mlm!r} ({type(e).__name__}: {msg})") from e
        finally:
            transformers.logging.set_verbosity(level)
            if bars:
                transformers.logging.enable_progress_bar()
        prefix = getattr(model, "base_model_prefix", "") + "."
        head_missing = [k for k in info.get("missing_keys", [])
                        if not k.startswith(prefix) and not k.endswith("position_ids")]
        if head_missing:
            raise MaskedLMUnavailable(f"{self.mlm!r} has no trained masked-LM head (missing weights: "
                                      f"{', '.join(sorted(head_missing)[:3])}...)")
        if tok.mask_token is None:
            raise MaskedLMUnavailable(f"the tokenizer in {self.mlm!r} has no mask token")
        pieces = tok.convert_ids_to_tokens(tok("a shirt", add_special_tokens=False)["input_ids"])
        style = "marked" if any(p.startswith(("Ġ", "▁")) for p in pieces) else "wordpiece"
        model.eval()
        return tok, model, style

    def _candidate_words(self, ids: Sequence[int], at_start: bool) -> list[str]:
        """The model's top-k ids at a mask -> the whole alphabetic words among them, in rank order."""
        tok, _, style = self._mlm
        special = set(tok.all_special_ids)
        out = []
        for i, piece in zip(ids, tok.convert_ids_to_tokens(list(ids))):
            if i in special:
                continue
            if style == "wordpiece":
                if piece.startswith("##"):
                    continue
                word = piece
            elif piece.startswith(("Ġ", "▁")):
                word = piece[1:]
            elif at_start:
                word = piece  # a caption's first word carries no space marker
            else:
                continue  # a continuation piece of a longer word
            if word.isalpha() and word.isascii():
                out.append(word.lower())
        return out

    def _complete(self, orders: dict[str, list[Slot]], progress: bool) -> dict[str, str | None]:
        """Tier 3 for many captions: try each caption's key words in its epoch order until one
        has an acceptable completion."""
        if self._mlm is None:
            self._mlm = self._load_mlm()  # a worker's copy (see __getstate__)
        result: dict[str, str | None] = {}
        cursor = dict.fromkeys(orders, 0)
        while cursor:
            todo = []
            for c, i in list(cursor.items()):
                slots = orders[c]
                while i < len(slots) and self._completions.get((c, slots[i].start), "") is None:
                    i += 1  # known to have no completion
                if i == len(slots):
                    result[c] = None
                    del cursor[c]
                    continue
                cursor[c] = i
                key = (c, slots[i].start)
                if key in self._completions:
                    result[c] = self._completions[key]
                    del cursor[c]
                else:
                    todo.append((c, slots[i]))
            if todo:
                self._complete_slots(todo, progress)
        return result

    def _complete_slots(self, items: list[tuple[str, Slot]], progress: bool) -> None:
        """Fill ``_completions`` for (caption, slot) pairs: masked LM in batches, then re-tag."""
        import torch
        from spacy.lang.en.stop_words import STOP_WORDS
        from tqdm import tqdm

        from tbps.data.phrases import load_nlp

        tok, model, _ = self._mlm
        model.to(self.mlm_device)
        cands: list[list[str]] = []
        bs = self.mlm_batch_size
        for b in tqdm(range(0, len(items), bs), desc="tier 3 masked LM", unit="batch",
                      disable=not progress, leave=False):
            chunk = items[b:b + bs]
            texts = [c[:s.start] + tok.mask_token + c[s.end:] for c, s in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True)
            with torch.no_grad():
                logits = model(**{k: v.to(self.mlm_device) for k, v in enc.items()}).logits  # (B, L, V)
            k = min(self.mlm_top_k, logits.shape[-1])
            for row, (c, s) in enumerate(chunk):
                where = (enc["input_ids"][row] == tok.mask_token_id).nonzero()
                if len(where) != 1:  # truncated away
                    cands.append([])
                    continue
                top = logits[row, int(where[0])].float().topk(k).indices.tolist()
                words = self._candidate_words(top, at_start=s.start == 0)
                words = [w for w in dict.fromkeys(words) if w not in STOP_WORDS and not related(s.word, w)
                         and _article_ok(s.article, w)]
                cands.append(words)
        # Re-tag: the first candidate (in rank order) that keeps the coarse POS wins. A few
        # candidates per item and round, all items of a round in one spaCy batch.
        nlp = load_nlp()
        pending = list(range(len(items)))
        offset = [0] * len(items)
        per_round = 3
        while pending:
            batch = []  # (item, word, text)
            for j in pending:
                c, s = items[j]
                for w in cands[j][offset[j]:offset[j] + per_round]:
                    batch.append((j, w, c[:s.start] + w + c[s.end:]))
            found: dict[int, str] = {}
            for (j, w, text), doc in zip(batch, nlp.pipe([t for _, _, t in batch], batch_size=256)):
                if j in found:
                    continue
                s = items[j][1]
                (pos, _, _), = _doc_word_tags(doc, [(s.start, s.start + len(w))])
                if pos == s.pos:
                    found[j] = text
            still = []
            for j in pending:
                c, s = items[j]
                if j in found:
                    self._completions[(c, s.start)] = found[j]
                elif offset[j] + per_round >= len(cands[j]):
                    self._completions[(c, s.start)] = None
                else:
                    offset[j] += per_round
                    still.append(j)
            pending = still
