"""WordNet, read from its own database files: which words a query word is a kind of, or stands for.

A query may use words the training captions never did ("a scarlet anorak"). The frozen word
encoder alone reads many of them wrongly (all-MiniLM-L6-v2 puts "scarlet" nearest "pink" and
"navy" nearest "baseball"; docs/performance.md, section 5). WordNet, the lexical database of
English, knows them: "scarlet" is a kind of "red", an "anorak" a kind of "jacket", "rucksack"
and "backpack" are one synset. :class:`tbps.models.word_map.NearestWords` asks :meth:`WordNet.related`
first, then for the compounds the word begins (:meth:`WordNet.compounds`: "olive" -> olive_green),
and falls back to the encoder for words neither relates to any training word.

No Python package is needed: the database is the one Debian ships (``apt install wordnet-base``:
``/usr/share/wordnet``) or any WordNet 3.x ``dict`` folder (NLTK's ``corpora/wordnet`` too),
named by ``$TBPS_WORDNET``. The files are read as data (wndb(5WN) format), never run; a
malformed one is a :class:`WordNetError` naming it.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import deque
from pathlib import Path

ENV = "TBPS_WORDNET"
SEARCH_PATHS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet/dict",
                "/usr/local/WordNet-3.0/dict", "~/nltk_data/corpora/wordnet")
POS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
# wndb(5WN)'s detachment rules: the inflected ending -> the base form's ending, per part of speech.
_SUFFIXES = {
    "n": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
          ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}
_UP = {"@", "@i"}  # hypernym, instance hypernym
_DOWN = {"~", "~i"}  # hyponym, instance hyponym
_SIMILAR = "&"  # adjectives: satellite -> its head (up), head -> its satellites (down)

Synset = tuple[str, int]  # (part of speech, byte offset in data.<pos>)


class WordNetError(ValueError):
    """A WordNet database that cannot be read."""

    user_error = True


def find_wordnet() -> Path | None:
    """The WordNet ``dict`` folder: ``$TBPS_WORDNET`` if set (it must then hold one), else the first
    of :data:`SEARCH_PATHS` holding ``index.noun``; None when there is none."""
    given = os.environ.get(ENV)
    if given:
        p = Path(given).expanduser()
        if not (p / "index.noun").is_file():
            raise WordNetError(f"${ENV}={given}: no WordNet database there (index.noun is missing)")
        return p
    for candidate in SEARCH_PATHS:
        p = Path(candidate).expanduser()
        if (p / "index.noun").is_file():
            return p
    return None


class WordNet:
    """Lemmas, senses and the hypernym/hyponym graph of a WordNet 3.x database folder.

    Each file is read on first use: an index file's lines are keyed by lemma (about 0.1 s for the
    nouns), a data file is kept whole (about 25 MB in all) and only the synsets asked for are
    parsed. Safe to share between threads.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._files: dict[str, bytes] = {}  # pos -> data.<pos>
        self._by_lemma: dict[str, dict[str, str]] = {}  # index file -> {lemma: its line}
        self._sorted: dict[str, list[str]] = {}  # index file -> its lemmas, sorted (for prefix look-ups)
        self._index: dict[tuple[str, str], tuple[int, ...]] = {}  # (lemma, pos) -> synset offsets, most frequent first
        self._exceptions: dict[tuple[str, str], list[str]] = {}  # (inflected, pos) -> base forms ("geese" -> goose)
        self._synsets: dict[Synset, tuple[str, list[str], list[tuple[str, Synset]]]] = {}
        self._lock = threading.Lock()
        for pos, name in POS.items():
            for needed in (f"index.{name}", f"data.{name}"):
                if not (self.root / needed).is_file():
                    raise WordNetError(f"{self.root / needed}: missing (not a WordNet 3.x database folder)")
            if (self.root / f"{name}.exc").is_file():
                for line in self._read(f"{name}.exc").decode("latin-1").splitlines():
                    fields = line.split()
                    if len(fields) >= 2:
                        self._exceptions.setdefault((fields[0], pos), []).extend(fields[1:])

    def _read(self, name: str) -> bytes:
        path = self.root / name
        try:
            return path.read_bytes()
        except OSError as e:
            raise WordNetError(f"{path}: cannot be read ({e.strerror or e})") from None

    def _data(self, pos: str) -> bytes:
        """data.<pos>, read whole on first use (synsets are found by byte offset)."""
        data = self._files.get(pos)
        if data is None:
            data = self._read(f"data.{POS[pos]}")
            with self._lock:
                self._files[pos] = data
        return data

    def _offsets(self, lemma: str, pos: str) -> tuple[int, ...]:
        """The synsets of a lemma in ``pos``, most frequent sense first (() when it has none)."""
        key = (lemma, pos)
        got = self._index.get(key)
        if got is None:
            name = f"index.{POS[pos]}"
            lines = self._lines(name)
            got = self._index[key] = self._parse_index_line(lines[lemma], name) if lemma in lines else ()
        return got

    def _lines(self, name: str) -> dict[str, str]:
        """An index file's lines by lemma (one pass over the file, about 0.1 s for the nouns)."""
        lines = self._by_lemma.get(name)
        if lines is None:
            lines = {}
            for line in self._read(name).decode("latin-1").splitlines():
                if line and not line.startswith(" "):  # the licence header starts with two spaces
                    lines[line.split(" ", 1)[0]] = line
            with self._lock:
                self._by_lemma[name] = lines
        return lines

    def _parse_index_line(self, line: str, name: str) -> tuple[int, ...]:
        fields, senses = line.split(), -1
        try:
            senses, pointers = int(fields[2]), int(fields[3])
            offsets = tuple(int(o) for o in fields[6 + pointers : 6 + pointers + senses])
        except (IndexError, ValueError):
            offsets = ()
        if not offsets or len(offsets) != senses:
            raise WordNetError(f"{self.root / name}: {line[:40]!r} is not a WordNet index line")
        return offsets

    def base_forms(self, word: str, pos: str) -> list[str]:
        """The word's base forms in ``pos`` that WordNet has ("denims" -> ["denim"]), the word itself first."""
        word = word.lower().replace(" ", "_")
        forms = [word, *self._exceptions.get((word, pos), [])]
        forms += [word[: -len(end)] + base for end, base in _SUFFIXES[pos] if word.endswith(end) and len(word) > len(end)]
        return [f for f in dict.fromkeys(forms) if self._offsets(f, pos)]

    def senses(self, word: str) -> list[Synset]:
        """Every synset of every base form of ``word``, nouns first, each part of speech's most frequent first."""
        return [(pos, off) for pos in POS for base in self.base_forms(word, pos) for off in self._offsets(base, pos)]

    def compounds(self, word: str) -> list[str]:
        """The noun and adjective lemmas that begin with a base form of ``word`` and a joint: "olive" ->
        olive_green, olive-drab, olive_tree, ...; "bermudas" -> bermuda_shorts, bermuda_grass, ..."""
        found: dict[str, None] = {}
        for pos in ("n", "a"):
            name = f"index.{POS[pos]}"
            lemmas = self._sorted.get(name)
            if lemmas is None:
                lemmas = sorted(self._lines(name))
                with self._lock:
                    self._sorted[name] = lemmas
            for base in self.base_forms(word, pos) or [word.lower()]:
                for joint in ("_", "-"):
                    prefix = base + joint
                    i = bisect.bisect_left(lemmas, prefix)
                    while i < len(lemmas) and lemmas[i].startswith(prefix):
                        found.setdefault(lemmas[i])
                        i += 1
        return list(found)

    def definitions(self, word: str) -> list[str]:
        """The definitions of every sense of ``word`` in :meth:`senses` order, without their quoted
        examples: "tawny" -> ["of a light brown to brownish orange color", "the color of tanned leather"]."""
        found: list[str] = []
        for pos, offset in self.senses(word):
            self.synset((pos, offset))  # the line is checked to be a synset there
            data = self._data(pos)
            end = data.find(b"\n", offset)
            _, _, gloss = data[offset : end if end >= 0 else len(data)].decode("latin-1").partition("|")
            found += [part.strip() for part in gloss.split(";") if part.strip() and not part.strip().startswith('"')]
        return found

    def synset(self, key: Synset) -> tuple[str, list[str], list[tuple[str, Synset]]]:
        """(synset type: n, v, a, s for an adjective satellite, r; lemmas; [(pointer symbol, target)])."""
        got = self._synsets.get(key)
        if got is not None:
            return got
        pos, offset = key
        path = self.root / f"data.{POS[pos]}"
        data = self._data(pos)
        end = data.find(b"\n", offset)
        fields = data[offset : end if end >= 0 else len(data)].decode("latin-1").split("|")[0].split()
        try:
            if int(fields[0]) != offset:
                raise ValueError
            kind, count = fields[2], int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].split("(")[0].lower() for i in range(count)]  # "red(a)" -> red
            i = 4 + 2 * count
            pointers = []
            for _ in range(int(fields[i])):
                symbol, target, target_pos = fields[i + 1], int(fields[i + 2]), fields[i + 3]
                pointers.append((symbol, ("a" if target_pos == "s" else target_pos, target)))
                i += 4
        except (IndexError, ValueError):
            raise WordNetError(f"{path}: no synset at byte {offset} (a damaged or foreign file)") from None
        got = self._synsets[key] = (kind, lemmas, pointers)
        return got

    def related(self, word: str, up: int = 2, down: int = 1) -> dict[tuple[str, str], int]:
        """{(lemma, pos): steps} for the lemmas of the synsets ``word`` belongs to (0 steps), of those
        it is a kind of (up to ``up`` hypernym steps: "scarlet" -> "red"; an adjective satellite's head)
        and of its own kinds (up to ``down`` hyponym steps: "footwear" -> "shoe"). Paths go one way
        only, never up then down, so siblings ("scarlet" and "crimson" under "red") are not related."""
        found: dict[tuple[str, str], int] = {}
        start = self.senses(word)
        seen = set(start)
        queue = deque((s, "", 0) for s in start)
        while queue:
            key, way, steps = queue.popleft()
            kind, lemmas, pointers = self.synset(key)
            for lemma in lemmas:
                found.setdefault((lemma, key[0]), steps)
            for symbol, target in pointers:
                if symbol in _UP or (symbol == _SIMILAR and kind == "s"):
                    step = "up"
                elif symbol in _DOWN or (symbol == _SIMILAR and kind != "s"):
                    step = "down"
                else:
                    continue
                if (way and step != way) or steps + 1 > (up if step == "up" else down) or target in seen:
                    continue
                seen.add(target)
                queue.append((target, step, steps + 1))
        return found


_LOADED: dict[Path, WordNet] = {}
_LOAD_LOCK = threading.Lock()


def load_wordnet() -> WordNet | None:
    """The process's WordNet (see :func:`find_wordnet`), read once; None when none is installed."""
    root = find_wordnet()
    if root is None:
        return None
    with _LOAD_LOCK:
        if root not in _LOADED:
            _LOADED[root] = WordNet(root)
        return _LOADED[root]
