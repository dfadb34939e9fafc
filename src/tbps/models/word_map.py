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
training colour word nearest in colour ("navy" -> blue), before WordNet is asked.

The training vocabulary is recorded in the model spec by training (``text_tower.vocabulary``,
so it travels in the checkpoint and eval, index, search and serve map words the same way); a
word in it is never touched, so in-vocabulary queries give bit-for-bit the same features.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tbps.models.colour_names import ColourNames
from tbps.models.wordnet import POS, WordNet

_DEFINITION_WORD = re.compile(r"[a-z]{3,}")  # "a", "an", "of", "or" left out: WordNet has some as nouns (vitamin A)


class NearestWords:
    """Unseen words -> rows of ``dictionary`` holding the mix of their k nearest training words.

    ``dictionary`` is a :class:`tbps.models.text_stream.WordDictionary` (``ids``, ``vectors``,
    ``add_vocabulary``, ``add``); the mixed vectors are added to it under keys no word can
    have (``word\\x00tag``), so the model's forward reads them like any other row.
    """

    def __init__(self, dictionary, vocabulary: Sequence[str], k: int = 3, temperature: float = 0.05,
                 lexicon: WordNet | None = None, definitions: bool = False, colours: ColourNames | None = None):
        self.dictionary = dictionary
        self.vocabulary = sorted(set(vocabulary))
        self.known = frozenset(self.vocabulary)
        self.k, self.temperature = max(1, int(k)), float(temperature)
        self.lexicon = lexicon  # candidates first from WordNet's relations (None: every training word)
        self.definitions = bool(definitions) and lexicon is not None  # then from the words its definitions name
        self.colours = colours  # a colour name first read as the training word of the nearest colour
        self._index = {w: j for j, w in enumerate(self.vocabulary)}
        self._lemmas: dict[tuple[str, str], list[int]] | None = None  # (lemma, pos) -> training words' indices
        h = hashlib.sha256("\n".join(self.vocabulary).encode()).hexdigest()[:12]
        self.tag = f"{h}-k{self.k}-t{self.temperature:g}" + ("-wordnet" if lexicon is not None else "") + (
            "-definitions" if self.definitions else "") + ("-colours" if colours is not None else "")
        self._vectors: torch.Tensor | None = None  # (V, E) training words' frozen vectors
        self._unit: torch.Tensor | None = None  # the same, L2-normalised
        self._mapped: dict[str, tuple[int, list[tuple[str, float]]]] = {}  # word -> (row, [(neighbour, weight)])
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
        """``ids`` (the dictionary rows of ``words``) with every unseen word's row replaced by its mix."""
        if not self.known:
            return list(ids)
        unknown = {w: i for w, i in zip(words, ids) if w not in self.known}
        if not unknown:
            return list(ids)
        self._map({w: i for w, i in unknown.items() if w not in self._mapped})
        return [self._mapped[w][0] if w in unknown else i for w, i in zip(words, ids)]

    def _map(self, raw_rows: dict[str, int]) -> None:
        if not raw_rows:
            return
        with self._lock:
            vectors, unit = self._training_vectors()
            words = sorted(raw_rows)
            query = F.normalize(self.dictionary.vectors[[raw_rows[w] for w in words]].float(), dim=1)  # (N, E)
            cos = query @ unit.t()  # (N, V)
            if self.lexicon is not None or self.colours is not None:  # only these compete, where there are any
                for n, w in enumerate(words):
                    allowed = self._allowed(w)
                    if allowed:
                        outside = torch.ones(cos.shape[1], dtype=torch.bool)
                        outside[allowed] = False
                        cos[n, outside] = float("-inf")
            cos, top = cos.topk(min(self.k, unit.shape[0]), dim=1)  # (N, k)
            weights = torch.softmax(cos / self.temperature, dim=1)  # excluded candidates weigh exactly 0
            mixed = torch.einsum("nk,nke->ne", weights, vectors[top])  # (N, E)
            keys = [f"{w}\x00{self.tag}" for w in words]
            rows = self.dictionary.add(keys, mixed)
            for n, w in enumerate(words):
                why = [(self.vocabulary[int(j)], float(p)) for j, p in zip(top[n], weights[n]) if p > 0]
                self._mapped[w] = (rows[n], why)

    def _allowed(self, word: str) -> list[int]:
        """Indices of the training words that may read ``word``: the colour table's, else WordNet's; [] for none."""
        if self.colours is not None:
            colour = self.colours.nearest(word, self.known)
            if colour is not None:
                return [self._index[colour]]
        return self._related(word) if self.lexicon is not None else []

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
        """For each unseen word among ``words`` (first occurrence order): [(training word, weight)]."""
        unknown = [w for w in dict.fromkeys(words) if w not in self.known] if self.known else []
        todo = [w for w in unknown if w not in self._mapped]
        if todo:
            self._map(dict(zip(todo, self.dictionary.ids(todo))))
        return {w: self._mapped[w][1] for w in unknown}
