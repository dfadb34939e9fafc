"""Evaluation: encode a split's gallery and queries (``tbps.retrieval.encoder``, the one place
that encodes), score all pairs, compute the metrics.

Text-to-image is the headline (queries = captions, gallery = images); image-to-text uses
the transposed matrix. Metrics are computed in bounded-memory query chunks
(:func:`tbps.retrieval.metrics.retrieval_metrics`), never with a full argsort.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tbps.data.dataset import eval_split
from tbps.data.records import Record
from tbps.retrieval.encoder import encode_captions, encode_images


@dataclass
class EvalResult:
    metrics: dict  # {"t2i": {...}, "i2t": {...}, "queries": Q, "gallery": G}
    similarity: torch.Tensor  # (Q, G) text-to-image cosine similarity
    image_paths: list
    image_ids: list[int]
    captions: list[str]
    caption_ids: list[int]
    image_features: torch.Tensor | None = None  # (G, D) L2-normalised, for re-ranking


def evaluate(model, tokenizer, records: Sequence[Record], *, batch_size: int = 256, device="cpu",
             num_workers: int = 0, max_words: int = 77, progress: bool = True, image_tta: str = "none") -> EvalResult:
    """Text-to-image and image-to-text R@1/5/10, mAP and mINP (percent) on ``records``; ``image_tta``:
    the gallery's test-time average (``tbps.retrieval.encoder.image_features``; "none" in training)."""
    from tbps.retrieval.metrics import evaluate_both

    was_training = model.training
    model.eval()
    paths, image_ids, captions, caption_ids = eval_split(records)
    img = encode_images(model, paths, batch_size=batch_size, device=device, num_workers=num_workers,
                        progress=progress, tta=image_tta)
    txt = encode_captions(model, tokenizer, captions, batch_size=batch_size, device=device,
                          max_words=max_words, progress=progress)
    model.train(was_training)
    sim = txt @ img.t()  # (Q, G)
    # i2t ranks the transposed matrix; the metrics read its strided rows chunk by chunk (no full copy).
    metrics = {**evaluate_both(sim, torch.tensor(caption_ids), torch.tensor(image_ids)),
               "queries": len(captions), "gallery": len(paths)}
    return EvalResult(metrics, sim, paths, image_ids, captions, caption_ids, image_features=img)


@dataclass
class CheckpointEvaluation:
    """:func:`evaluate_checkpoint`'s result, with what re-scoring and re-ranking reuse."""

    result: EvalResult
    model: torch.nn.Module
    checkpoint: dict  # the loaded checkpoint (``path`` included)
    tokenizer: object
    max_words: int


def evaluate_checkpoint(checkpoint, data_root, split: str = "test", *, layout: str | None = None,
                        strict: bool = False, batch_size: int = 256, device="cpu", progress: bool = False,
                        load_progress: bool | None = None, image_tta: str = "none") -> CheckpointEvaluation:
    """Load a checkpoint (or run folder) and evaluate it on one split of a dataset folder, captions
    truncated as its recipe trained them (what ``tbps eval`` and ``tbps.evaluate`` run).
    ``load_progress``: a bar while the annotations load (default: as ``progress``); ``image_tta``: see
    :func:`evaluate`."""
    from tbps.data.layouts import load_annotations
    from tbps.models.checkpoint import load_model, max_words
    from tbps.models.factory import get_tokenizer

    model, ckpt = load_model(checkpoint, device)
    records = load_annotations(data_root, layout, strict=strict,
                               progress=progress if load_progress is None else load_progress).split(split)
    tokenizer, words = get_tokenizer(model.spec), max_words(ckpt)
    res = evaluate(model, tokenizer, records, batch_size=batch_size, device=device, max_words=words,
                   progress=progress, image_tta=image_tta)
    return CheckpointEvaluation(res, model, ckpt, tokenizer, words)


def format_table(metrics: dict, title: str = "") -> str:
    """A plain-text table of both directions, as printed by `tbps eval`."""
    keys = ["R1", "R5", "R10", "mAP", "mINP"]
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'':<14}" + "".join(f"{k:>8}" for k in keys))
    for direction, label in (("t2i", "text->image"), ("i2t", "image->text")):
        if direction in metrics:
            lines.append(f"{label:<14}" + "".join(f"{metrics[direction][k]:>8.2f}" for k in keys))
    lines.append(f"({metrics.get('queries', '?')} queries, {metrics.get('gallery', '?')} gallery images)")
    return "\n".join(lines)
