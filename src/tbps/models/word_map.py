"""Query words the training never used, read through the words it did use.

A frozen word dictionary gives any word a vector, but the BiGRU over it has only ever read
the vectors of the training vocabulary: an unseen word ("scarlet") is a point of the frozen
space where the GRU has never been, and what it makes of it is arbitrary (bench/open_vocab.py
measured test R@1 falling several-fold on synonym-rewritten queries). :class:`NearestWords`
instead feeds such a word as the softmax-weighted mix of its ``k`` nearest training words
(cosine in the frozen encoder's space, weights ``softmax(cos / temperature)``): a point the GRU
knows. With ``oov: nearest`` all training words are candidates; the encoder alone, though, puts
many colour words nearest the wrong colour ("scarlet" -> pink, "navy" -> baseball). With
``oov: wordnet`` the candidates are first the training words WordNet relates to the word
(:meth:`tbps.models.wordnet.WordNet.related`: its synonyms, what it is a kind of, its own kinds),
the encoder choosing among them. A word WordNet relates to no training word is read through the
compounds it begins (:meth:`~tbps.models.wordnet.WordNet.compounds`: "olive" through olive_green,
a kind of green; "bermudas" through bermuda_shorts), one step further. With ``definitions`` on, a
word WordNet knows but relates to no training word either way is read through the training words its
definitions name (:meth:`~tbps.models.wordnet.WordNet.definitions`: "tawny", "of a light brown to
brownish orange color", -> brown, orange). Failing those, all training words compete. With a colour-name
table (:class:`tbps.models.colour_names.ColourNames`), a word that is a colour name in it is read as the
training colour word nearest in colour ("navy" -> blue), before WordNet is asked. With the training
captions' adjacent word pairs (``pairs``), a word is read in its context: of its candidates, only those the
training captions put between the same neighbours (its query neighbours that are training words) compete
("white mules" -> a word that follows "white", so a garment, not WordNet's "female" from the animal's
definition); where none of them fits, every training word that fits competes, and where no training word
fits both neighbours, those that fit either.

The training vocabulary is recorded in the model spec by training (``text_tower.vocabulary``,
so it travels in the checkpoint and eval, index, search and serve map words the same way); a
word in it is never touched, so in-vocabulary queries give bit-for-bit the same features.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from tbps.models.colour_names import ColourNames
from tbps.models.wordnet import POS, WordNet

Key = tuple[str, str | None, str | None]  # an unseen word and its neighbours that are training words
_DEFINITION_WORD = re.compile(r"[a-z]{3,}")  # "a", "an", "of", "or" left out: WordNet has some as nouns (vitamin A)


class NearestWords:
    """Unseen words -> rows of ``dictionary`` holding the mix of their k nearest training words.

    ``dictionary`` is a :class:`tbps.models.text_stream.WordDictionary` (``ids``, ``vectors``,
    ``add_vocabulary``, ``add``); the mixed vectors are added to it under keys no word can
    have (``word\\x00tag``), so the model's forward reads them like any other row.
    """

    def __init__(self, dictionary, vocabulary: Sequence[str], k: int = 3, temperature: float = 0.05,
                 lexicon: WordNet | None = None, definitions: bool = False, colours: ColourNames | None = None,
                 pairs: Iterable[tuple[str, str]] | None = None):
        self.dictionary = dictionary
        self.vocabulary = sorted(set(vocabulary))
        self.known = frozenset(self.vocabulary)
        self.k, self.temperature = max(1, int(k)), float(temperature)
        self.lexicon = lexicon  # candidates first from WordNet's relations (None: every training word)
        self.definitions = bool(definitions) and lexicon is not None  # then from the words its definitions name
        self.colours = colours  # a colour name first read as the training word of the nearest colour
        self._index = {w: j for j, w in enumerate(self.vocabulary)}
        # the training captions' word pairs: word -> indices of the training words seen after / before it
        self._after: dict[str, set[int]] | None = None
        self._before: dict[str, set[int]] = {}
        if pairs is not None:
            self._after = {}
            for a, b in pairs:
                if a in self._index and b in self._index:
                    self._after.setdefault(a, set()).add(self._index[b])
                    self._before.setdefault(b, set()).add(self._index[a])
        self._lemmas: dict[tuple[str, str], list[int]] | None = None  # (lemma, pos) -> training words' indices
        h = hashlib.sha256("\n".join(self.vocabulary).encode()).hexdigest()[:12]
        self.tag = f"{h}-k{self.k}-t{self.temperature:g}" + ("-wordnet" if lexicon is not None else "") + (
            "-definitions" if self.definitions else "") + ("-colours" if colours is not None else "") + (
            "-context" if self._after is not None else "")
        self._vectors: torch.Tensor | None = None  # (V, E) training words' frozen vectors
        self._unit: torch.Tensor | None = None  # the same, L2-normalised
        # (word, left, right) -> (row, [(training word, weight)]); the neighbours are None without pairs
        self._mapped: dict[Key, tuple[int, list[tuple[str, float]]]] = {}
        self._lock = threading.Lock()

    def _training_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._vectors is None:
            self.dictionary.add_vocabulary(self.vocabulary)  # the disk cache training wrote, same words
            rows = torch.tensor(self.dictionary.ids(self.vocabulary), dtype=torch.long)
            vectors = self.dictionary.vectors[rows].float()
            self._unit = F.normalize(vectors, dim=1)
            self._vectors = vectors
        return self._vectors, self._unit

    def rows(self, words: Sequence[str], ids: Sequence[int]) -> list[int]:
        """``ids`` (the dictionary rows of one text's ``words``, in order) with every unseen word's row
        replaced by its reading (with ``pairs``, the reading of the word between its neighbours)."""
        if not self.known:
            return list(ids)
        keys = [self._key(words, n) for n in range(len(words))]
        if all(k is None for k in keys):
            return list(ids)
        self._map({k: i for k, i in zip(keys, ids) if k is not None and k not in self._mapped})
        return [self._mapped[k][0] if k is not None else i for k, i in zip(keys, ids)]

    def _key(self, words: Sequence[str], n: int) -> Key | None:
        """(word, left, right) for an unseen ``words[n]``: its neighbours where they are training words
        and pairs are known, else None; None for a training word."""
        word = words[n]
        if word in self.known:
            return None
        if self._after is None:
            return word, None, None
        left = words[n - 1] if n > 0 and words[n - 1] in self.known else None
        right = words[n + 1] if n + 1 < len(words) and words[n + 1] in self.known else None
        return word, left, right

    def _map(self, raw_rows: dict[Key, int]) -> None:
        if not raw_rows:
            return
        with self._lock:
            vectors, unit = self._training_vectors()
            keys = sorted(raw_rows, key=lambda k: (k[0], k[1] or "", k[2] or ""))
            query = F.normalize(self.dictionary.vectors[[raw_rows[k] for k in keys]].float(), dim=1)  # (N, E)
            cos = query @ unit.t()  # (N, V)
            if self.lexicon is not None or self.colours is not None or self._after is not None:
                for n, key in enumerate(keys):  # only these compete, where there are any
                    allowed = self._allowed(*key)
                    if allowed:
                        outside = torch.ones(cos.shape[1], dtype=torch.bool)
                        outside[allowed] = False
                        cos[n, outside] = float("-inf")
            cos, top = cos.topk(min(self.k, unit.shape[0]), dim=1)  # (N, k)
            weights = torch.softmax(cos / self.temperature, dim=1)  # excluded candidates weigh exactly 0
            mixed = torch.einsum("nk,nke->ne", weights, vectors[top])  # (N, E)
            names = ["\x00".join((w, self.tag) if self._after is None else (w, self.tag, left or "", right or ""))
                     for w, left, right in keys]
            rows = self.dictionary.add(names, mixed)
            for n, key in enumerate(keys):
                why = [(self.vocabulary[int(j)], float(p)) for j, p in zip(top[n], weights[n]) if p > 0]
                self._mapped[key] = (rows[n], why)

    def _allowed(self, word: str, left: str | None = None, right: str | None = None) -> list[int]:
        """Indices of the training words that may read ``word``: the colour table's, else WordNet's; [] for
        none (every training word competes). With pairs, only those that fit between ``left`` and ``right``
        (training words or None); where none does, the training words that fit both, else either."""
        first: list[int] = []
        if self.colours is not None:
            colour = self.colours.nearest(word, self.known)
            if colour is not None:
                first = [self._index[colour]]
        if not first and self.lexicon is not None:
            first = self._related(word)
        if self._after is None or (left is None and right is None):
            return first
        after = self._after.get(left, set()) if left is not None else None  # None: no constraint
        before = self._before.get(right, set()) if right is not None else None
        if after is None or before is None:
            both = after if before is None else before
        else:
            both = after & before
        fitting = [j for j in first if j in both] or sorted(both) or sorted((after or set()) | (before or set()))
        return fitting or first

    def _related(self, word: str) -> list[int]:
        """Indices of the training words WordNet relates most closely to ``word`` (fewest steps); [] for none."""
        assert self.lexicon is not None
        if self._lemmas is None:
            lemmas: dict[tuple[str, str], list[int]] = {}
            for j, v in enumerate(self.vocabulary):
                for pos in POS:
                    for base in self.lexicon.base_forms(v, pos):
                        lemmas.setdefault((base, pos), []).append(j)
            self._lemmas = lemmas
        steps = self._steps(self.lexicon.related(word))
        if not steps:  # known only as a compound's first part ("olive" green, "bermuda" shorts): one step more
            for compound in self.lexicon.compounds(word):
                for j, n in self._steps(self.lexicon.related(compound)).items():
                    steps[j] = min(n + 1, steps.get(j, n + 1))
        if not steps and self.definitions:  # nor as a compound's: the training words its definitions name,
            named = {(base, pos): 0 for text in self.lexicon.definitions(word)  # all alike: the encoder chooses
                     for token in _DEFINITION_WORD.findall(text.lower())
                     for pos in ("n", "a")  # what a colour, a garment or a person is defined by
                     for base in self.lexicon.base_forms(token, pos)}
            steps = self._steps(named)
        fewest = min(steps.values(), default=None)
        return sorted(j for j, n in steps.items() if n == fewest)

    def _steps(self, related: dict[tuple[str, str], int]) -> dict[int, int]:
        """{training word's index: fewest steps} for WordNet's ``related`` lemmas that are training words."""
        assert self._lemmas is not None
        steps: dict[int, int] = {}
        for lemma, n in related.items():
            for j in self._lemmas.get(lemma, ()):
                steps[j] = min(n, steps.get(j, n))
        return steps

    def explain(self, words: Sequence[str]) -> dict[str, list[tuple[str, float]]]:
        """For each unseen word among one text's ``words`` (first occurrence order, read where it first
        occurs): [(training word, weight)]."""
        if not self.known:
            return {}
        first: dict[str, Key] = {}
        for n in range(len(words)):
            key = self._key(words, n)
            if key is not None and key[0] not in first:
                first[key[0]] = key
        todo = [k for k in first.values() if k not in self._mapped]
        if todo:
            self._map(dict(zip(todo, self.dictionary.ids([k[0] for k in todo]))))
        return {w: self._mapped[k][1] for w, k in first.items()}
