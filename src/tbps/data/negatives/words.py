"""Caption words for the text hard negatives: what a word is (``WORD_RE``), the spaCy tags
of each word, and ``Slot``, a word that a tier may change.

spaCy splits hyphenated words (``t-shirt``), so a word takes the tags of its syntactic head
token. Both the parser (:mod:`.text`) and tier 3's part-of-speech check (:mod:`.mlm`) read
words this way.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from typing import NamedTuple

WORD_RE = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")


def word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each word of ``text``, in order."""
    return [m.span() for m in WORD_RE.finditer(text)]


def doc_word_tags(doc, spans: Sequence[tuple[int, int]]) -> list[tuple[str, str, str]]:
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


class Slot(NamedTuple):
    """One word of a caption that a tier may replace, with what the replacement must match."""

    start: int
    end: int
    word: str
    kind: str        # "noun" (key noun), "lex" (colour/pattern/length/sleeve/tone), "adj", "verb"
    pool: tuple      # pool key: ("noun", category, "NN"|"NNS"), ("lex", category), ("adj", tag), ("verb", tag)
    pos: str         # spaCy coarse POS of the word's head token
    article: str | None  # "a"/"an" right before the word, else None
