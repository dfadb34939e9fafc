"""Query words the training never used, read through the words it did use.

A frozen word dictionary gives any word a vector, but the BiGRU over it has only ever read
the vectors of the training vocabulary: an unseen word ("scarlet") is a point of the frozen
space where the GRU has never been, and what it makes of it is arbitrary (bench/open_vocab.py
measured test R@1 falling several-fold on synonym-rewritten queries). With ``oov: nearest``
the word tokenizer instead feeds such a word as the softmax-weighted mix of its ``k`` nearest
training words (cosine in the frozen encoder's space, weights ``softmax(cos / temperature)``):
a point the GRU knows, chosen by the pretrained encoder, not by a hand-written synonym list.

The training vocabulary is recorded in the model spec by training (``text_tower.vocabulary``,
so it travels in the checkpoint and eval, index, search and serve map words the same way); a
word in it is never touched, so in-vocabulary queries give bit-for-bit the same features.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F


class NearestWords:
    """Unseen words -> rows of ``dictionary`` holding the mix of their k nearest training words.

    ``dictionary`` is a :class:`tbps.models.text_stream.WordDictionary` (``ids``, ``vectors``,
    ``add_vocabulary``, ``add``); the mixed vectors are added to it under keys no word can
    have (``word\\x00tag``), so the model's forward reads them like any other row.
    """

    def __init__(self, dictionary, vocabulary: Sequence[str], k: int = 3, temperature: float = 0.05):
        self.dictionary = dictionary
        self.vocabulary = sorted(set(vocabulary))
        self.known = frozenset(self.vocabulary)
        self.k, self.temperature = max(1, int(k)), float(temperature)
        h = hashlib.sha256("\n".join(self.vocabulary).encode()).hexdigest()[:12]
        self.tag = f"{h}-k{self.k}-t{self.temperature:g}"
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
            cos, top = (query @ unit.t()).topk(min(self.k, unit.shape[0]), dim=1)  # (N, k)
            weights = torch.softmax(cos / self.temperature, dim=1)
            mixed = torch.einsum("nk,nke->ne", weights, vectors[top])  # (N, E)
            keys = [f"{w}\x00{self.tag}" for w in words]
            rows = self.dictionary.add(keys, mixed)
            for n, w in enumerate(words):
                why = [(self.vocabulary[int(j)], float(p)) for j, p in zip(top[n], weights[n])]
                self._mapped[w] = (rows[n], why)

    def explain(self, words: Sequence[str]) -> dict[str, list[tuple[str, float]]]:
        """For each unseen word among ``words`` (first occurrence order): [(training word, weight)]."""
        unknown = [w for w in dict.fromkeys(words) if w not in self.known] if self.known else []
        todo = [w for w in unknown if w not in self._mapped]
        if todo:
            self._map(dict(zip(todo, self.dictionary.ids(todo))))
        return {w: self._mapped[w][1] for w in unknown}
