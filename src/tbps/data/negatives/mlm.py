"""Tier 3 of MeFa's text hard negatives: a local masked LM fills in one masked key word.

Among the masked LM's top ``top_k`` predictions at the mask, in rank order, the first one
that is a whole word (a word-start piece: no ``##`` continuation for WordPiece, a ``Ġ``/``▁``
piece for byte-level BPE / SentencePiece), ASCII-alphabetic, different from and no synonym of
the original word, not a spaCy stopword, agrees with a preceding "a"/"an", and keeps spaCy's
coarse POS at that position when the completed caption is re-tagged, is the completion.

A model that cannot be used raises :class:`MaskedLMUnavailable`, never a fake completion.
torch and transformers are imported where used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from tbps.data.negatives.lexicon import _article_ok, related
from tbps.data.negatives.words import Slot, doc_word_tags


class MaskedLMUnavailable(RuntimeError):
    """The masked LM for tier 3 cannot be used (the message says why)."""


class MaskedLM(NamedTuple):
    """A loaded masked LM: tokenizer, model (eval mode) and how its pieces mark word starts."""

    tokenizer: Any
    model: Any
    style: str  # "marked" (a Ġ/▁ piece starts a word) or "wordpiece" (## pieces continue one)


def load_masked_lm(path: str | None) -> MaskedLM:
    """Load a Hugging Face ``*ForMaskedLM`` and its tokenizer from a local folder (or the cache)."""
    if path is None:
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
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model, info = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any load failure (missing folder, unknown config) turns tier 3 off
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MaskedLMUnavailable(f"cannot load a masked LM from {path!r} ({type(e).__name__}: {msg})") from e
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()
    prefix = getattr(model, "base_model_prefix", "") + "."
    head_missing = [k for k in info.get("missing_keys", [])
                    if not k.startswith(prefix) and not k.endswith("position_ids")]
    if head_missing:
        raise MaskedLMUnavailable(f"{path!r} has no trained masked-LM head (missing weights: "
                                  f"{', '.join(sorted(head_missing)[:3])}...)")
    if tok.mask_token is None:
        raise MaskedLMUnavailable(f"the tokenizer in {path!r} has no mask token")
    pieces = tok.convert_ids_to_tokens(tok("a shirt", add_special_tokens=False)["input_ids"])
    style = "marked" if any(p.startswith(("Ġ", "▁")) for p in pieces) else "wordpiece"
    model.eval()
    return MaskedLM(tok, model, style)


def candidate_words(lm: MaskedLM, ids: Sequence[int], at_start: bool) -> list[str]:
    """The model's top-k ids at a mask -> the whole alphabetic words among them, in rank order."""
    tok = lm.tokenizer
    special = set(tok.all_special_ids)
    out = []
    for i, piece in zip(ids, tok.convert_ids_to_tokens(list(ids))):
        if i in special:
            continue
        if lm.style == "wordpiece":
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


def complete_slots(lm: MaskedLM, items: list[tuple[str, Slot]], *, top_k: int, device: str = "cpu",
                   batch_size: int = 64, progress: bool = False) -> list[str | None]:
    """The completed caption for each (caption, slot), or None where no prediction is acceptable."""
    cands = _acceptable_predictions(lm, items, top_k, device, batch_size, progress)
    return _first_keeping_pos(items, cands)


def _acceptable_predictions(lm: MaskedLM, items: list[tuple[str, Slot]], top_k: int, device: str,
                            batch_size: int, progress: bool) -> list[list[str]]:
    """Masked LM in batches: per item, its acceptable words in rank order (before the POS check)."""
    import torch
    from spacy.lang.en.stop_words import STOP_WORDS
    from tqdm import tqdm

    tok, model = lm.tokenizer, lm.model
    model.to(device)
    cands: list[list[str]] = []
    for b in tqdm(range(0, len(items), batch_size), desc="tier 3 masked LM", unit="batch",
                  disable=not progress, leave=False):
        chunk = items[b:b + batch_size]
        texts = [c[:s.start] + tok.mask_token + c[s.end:] for c, s in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits  # (B, L, V)
        k = min(top_k, logits.shape[-1])
        for row, (c, s) in enumerate(chunk):
            where = (enc["input_ids"][row] == tok.mask_token_id).nonzero()
            if len(where) != 1:  # truncated away
                cands.append([])
                continue
            top = logits[row, int(where[0])].float().topk(k).indices.tolist()
            words = candidate_words(lm, top, at_start=s.start == 0)
            words = [w for w in dict.fromkeys(words) if w not in STOP_WORDS and not related(s.word, w)
                     and _article_ok(s.article, w)]
            cands.append(words)
    return cands


def _first_keeping_pos(items: list[tuple[str, Slot]], cands: list[list[str]]) -> list[str | None]:
    """Re-tag: the first candidate (in rank order) that keeps the coarse POS wins. A few
    candidates per item and round, all items of a round in one spaCy batch."""
    from tbps.data.phrases import load_nlp

    nlp = load_nlp()
    result: list[str | None] = [None] * len(items)
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
            (pos, _, _), = doc_word_tags(doc, [(s.start, s.start + len(w))])
            if pos == s.pos:
                found[j] = text
        still = []
        for j in pending:
            if j in found:
                result[j] = found[j]
            elif offset[j] + per_round < len(cands[j]):
                offset[j] += per_round
                still.append(j)
        pending = still
    return result
