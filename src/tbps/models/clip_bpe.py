"""open_clip's CLIP BPE tokenizer with each word's ids memoised: the same token tensors, less work.

``SimpleTokenizer.encode`` cleans a caption (ftfy, HTML unescape, whitespace, lower case), cuts it into
pieces with a regex and, per piece, byte-encodes it, looks up its BPE merges (cached), splits them and looks
up each id: ~0.2-0.4 ms a caption. Training re-tokenises most captions each step (random word deletion makes
a new caption out of old words), so a caption-level cache misses while a word-level one almost never does.

:class:`MemoTokenizer` keeps the ids of each word of the cleaned caption (a space-separated run), so a
caption costs its cleaning, one ``split(" ")`` and a dict lookup per word. Words, not the regex's pieces, are
the key: no alternative of CLIP's pattern matches a space and it has no look-around, so a caption's pieces are
its words' pieces in order, and a word key skips the regex as well. The memo is bounded
(:data:`WORD_MEMO_LIMIT`); past it, new words are encoded as open_clip does, without being kept.
Printable ASCII captions (``&`` aside) skip ftfy, which leaves them as they are (:meth:`MemoTokenizer.clean`).
"""

from __future__ import annotations

import re

import torch
from open_clip.tokenizer import SimpleTokenizer, get_clean_fn

# Words a memo keeps at most (~100 bytes each with their ids: ~30 MB when full; a caption set's
# vocabulary is a few thousand words).
WORD_MEMO_LIMIT = 1 << 18

_LOWER = get_clean_fn("lower")  # open_clip's default cleaning: ftfy, HTML unescape twice, whitespace, lower case
# Printable ASCII without "&": text that cleaning only collapses and lower-cases. ftfy returns ASCII text
# unchanged by its encoding repair and its other fixes act on control characters, non-ASCII characters and
# HTML entities (which start with "&", as html.unescape's do); its ~40 us a caption is most of what is left.
_PLAIN_ASCII = re.compile(r"[ -%'-~]*")


class MemoTokenizer(SimpleTokenizer):
    """A :class:`SimpleTokenizer` whose ``encode`` looks words up in a memo (see the module docstring).

    Made from an open_clip tokenizer by :func:`memoize`; every attribute (``vocab_size``,
    ``sot_token_id``, ``encoder``, ``decode``, ``context_length``, ...) is the tokenizer's own, and it
    pickles with its memo (DataLoader workers receive it inside ``Collate``).
    """

    word_limit = WORD_MEMO_LIMIT

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        memo = self.word_ids
        for word in self.clean(text).split(" "):
            got = memo.get(word)
            if got is None:
                got = self.encode_word(word)
                if len(memo) < self.word_limit:
                    memo[word] = got
            ids.extend(got)
        return ids

    def clean(self, text: str) -> str:
        """``clean_fn(text)``, without ftfy for printable ASCII under the default cleaning."""
        if self.clean_fn is _LOWER and _PLAIN_ASCII.fullmatch(text):
            return " ".join(text.split()).lower()
        return self.clean_fn(text)

    def encode_word(self, word: str) -> tuple[int, ...]:
        """The ids of one cleaned, space-free word, as open_clip's ``encode`` computes them."""
        out: list[int] = []
        for piece in self.pat.findall(word):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            out.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return tuple(out)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """(B, context_length) int64 ids: [sot] + ids + [eot], cut to the context length with the last id
        set to eot, padded with 0 (open_clip's own call when a reduction strategy is set)."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if self.reduction_fn is not None or not length:
            return super().__call__(texts, context_length)
        sot, eot = self.sot_token_id, self.eot_token_id
        rows = []
        for text in texts:
            row = [sot, *self.encode(text), eot]
            if len(row) > length:
                row = row[:length]
                row[-1] = eot
            else:
                row.extend([0] * (length - len(row)))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)


def memoize(tokenizer):
    """``tokenizer`` as a :class:`MemoTokenizer` when it is exactly open_clip's ``SimpleTokenizer``
    (sharing its tables and BPE cache); any other tokenizer unchanged."""
    if type(tokenizer) is not SimpleTokenizer:
        return tokenizer
    memo = MemoTokenizer.__new__(MemoTokenizer)
    memo.__dict__.update(vars(tokenizer))
    memo.word_ids = {}
    return memo
