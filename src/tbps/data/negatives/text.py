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

Words. A caption is cut into words by :data:`.words.WORD_RE` (letters and digits, hyphenated
compounds such as ``t-shirt`` / ``short-sleeved`` kept whole); only whole words made of
letters and hyphens change, every other byte of the caption stays as it was. spaCy splits
hyphenated words, so a word takes the POS / tag / dependency of its syntactic head token
(the token whose head lies outside the word: ``shirt`` in ``t-shirt``).

Choices, and why:

* **Key nouns** are NOUN heads (not compound modifiers: ``shoulder`` in "shoulder bag" stays)
  that :mod:`.lexicon` files as garment, accessory or body part, directly, through the
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

Without a loadable masked LM tier 3 is switched off with one message on stderr, never faked.
spaCy and (for tier 3) torch/transformers are imported where used.

Modules: :mod:`.lexicon` (word lists, synonyms, families, articles), :mod:`.words` (what a word
is, its spaCy tags, ``Slot``), :mod:`.mlm` (tier 3, with its acceptance rule), this one
(parsing and its disk cache, slots, tiers 1 and 2, :class:`TextNegatives`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tbps.data.negatives.lexicon import (
    _CATEGORY,
    _NO_SUBSTITUTE_VERBS,
    _NOUN_CATEGORIES,
    _article_ok,
    _noun_class,
    related,
)
from tbps.data.negatives.mlm import MaskedLMUnavailable, complete_slots, load_masked_lm
from tbps.data.negatives.words import Slot, doc_word_tags, word_spans

_CHANGEABLE_RE = re.compile(r"[a-z]+(?:-[a-z]+)*")
_PARSE_FORMAT = "hard_negatives/1"  # bump when the stored tags change meaning

# --------------------------------------------------------------------------------------
# Parsing: spaCy once per caption, reduced to one "POS TAG DEP" per word of WORD_RE.
# --------------------------------------------------------------------------------------

def _parse(texts: Sequence[str], batch_size: int = 256) -> list[str]:
    """Captions -> one string per caption: "POS TAG DEP" per word, words joined by "|"."""
    from tbps.data.phrases import load_nlp

    nlp = load_nlp()
    out = []
    for text, doc in zip(texts, nlp.pipe(list(texts), batch_size=batch_size)):
        out.append("|".join(" ".join(x) for x in doc_word_tags(doc, word_spans(text))))
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

def _slots(text: str, tags: str) -> tuple[Slot, ...]:
    from spacy.lang.en.stop_words import STOP_WORDS

    spans = word_spans(text)
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
        self._mlm = None  # a MaskedLM once loaded
        self._slots: dict[str, tuple[Slot, ...]] = {}
        self._pools: dict[tuple, _Pool] | None = None
        self._completions: dict[tuple[str, int], str | None] = {}  # (caption, word start) -> tier-3 rewrite
        if 3 in tiers:
            try:
                self._mlm = load_masked_lm(self.mlm)
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
    def _complete(self, orders: dict[str, list[Slot]], progress: bool) -> dict[str, str | None]:
        """Tier 3 for many captions: try each caption's key words in its epoch order until one
        has an acceptable completion."""
        if self._mlm is None:
            self._mlm = load_masked_lm(self.mlm)  # a worker's copy (see __getstate__)
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
                done = complete_slots(self._mlm, todo, top_k=self.mlm_top_k, device=self.mlm_device,
                                      batch_size=self.mlm_batch_size, progress=progress)
                for (c, s), neg in zip(todo, done, strict=True):
                    self._completions[(c, s.start)] = neg
        return result
