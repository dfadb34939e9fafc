"""The one place that turns images and captions into retrieval features.

Evaluation (``engine/evaluate.py``), the gallery index (through :class:`Encoder`), search-time
re-scoring and MeFa's image bank all encode through the functions here, so "indexed features
equal evaluated features" holds by construction: the same cleaning and tokenisation of a
caption (:func:`tokenize_captions`), the same forward and L2 normalisation of a batch
(:func:`image_features`, :func:`text_features`).

:class:`Encoder` is a trained checkpoint as an image/text encoder for indexing and search; its
``fingerprint`` identifies the checkpoint and the preprocessing, and an index built with one
encoder refuses queries from another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tbps.data.text import clean_caption
from tbps.data.transforms import eval_transform
from tbps.models.checkpoint import CheckpointError, file_sha256, load_model, save_checkpoint
from tbps.models.checkpoint import max_words as checkpoint_max_words

__all__ = [
    "IMAGE_TTA",
    "CheckpointError",
    "Encoder",
    "caption_settings",
    "clean_captions",
    "create_untrained_checkpoint",
    "encode_captions",
    "encode_image_batches",
    "encode_images",
    "image_features",
    "text_features",
    "tokenize_captions",
]


def clean_captions(texts: Sequence[str], max_words: int | None, cleaning: str = "tbps-clip") -> list[str]:
    """Captions as the tokenizer gets them, cleaned and truncated to ``max_words`` words as in training.

    cleaning "tbps-clip" (tbps's own, TBPS-CLIP's): lower-case, strip ``.!"()*#:;~``, at most ``max_words``
    words; "none" (IRRA, RDE, OpenAI CLIP, open_clip): the raw caption (the tokenizer does its own
    ftfy/whitespace/lower-case cleaning), cut to ``max_words`` words only when that is set.
    """
    if cleaning == "none":
        return [t if max_words is None else " ".join(t.split()[:max_words]) for t in texts]
    if cleaning != "tbps-clip":
        raise ValueError(f"unknown caption cleaning {cleaning!r} (tbps-clip, none)")
    return [clean_caption(t, max_words or 77) for t in texts]


def tokenize_captions(tokenizer, texts: Sequence[str], max_words: int | None,
                      cleaning: str = "tbps-clip") -> torch.Tensor:
    """Captions -> (B, L) token ids, cleaned as :func:`clean_captions` says."""
    return tokenizer(clean_captions(texts, max_words, cleaning))


def caption_settings(spec, max_words: int | None) -> tuple[str, int | None]:
    """(cleaning, max_words) of a model: a converted model's recorded ones, else tbps's (the recipe's)."""
    pre = getattr(spec, "preprocess", None)
    if not pre:
        return "tbps-clip", max_words
    return pre.get("caption_cleaning", "tbps-clip"), pre.get("max_words")


def resize_settings(spec) -> dict:
    """``eval_transform``'s resize/interpolation of a model (tbps's squash + bicubic unless converted)."""
    pre = getattr(spec, "preprocess", None) or {}
    return {"resize": pre.get("resize", "squash"), "interpolation": pre.get("interpolation", "bicubic")}


IMAGE_TTA = ("none", "flip")  # test-time averages of a gallery image's features (``image_features``)


def _check_tta(tta: str) -> None:
    if tta not in IMAGE_TTA:
        raise ValueError(f"unknown image test-time augmentation {tta!r} ({', '.join(IMAGE_TTA)})")


def image_features(model, pixels: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """(B, 3, H, W) preprocessed images on the model's device -> (B, D) float32, L2-normalised.

    tta "flip": the normalised mean of the image's and its mirror image's (left-right) normalised
    features, ``normalize(normalize(f(x)) + normalize(f(flip(x))))``: two forward passes, an option for
    a gallery (captions that say "left" or "right" would lose what tells the two apart).
    """
    _check_tta(tta)
    feats = F.normalize(model.encode_image(pixels).float(), dim=-1)
    if tta == "flip":
        mirrored = F.normalize(model.encode_image(pixels.flip(-1)).float(), dim=-1)
        return F.normalize(feats + mirrored, dim=-1)
    return feats


def text_features(model, tokens: torch.Tensor, unpadded: bool = False) -> torch.Tensor:
    """(B, L) token ids on the model's device -> (B, D) float32, L2-normalised. ``unpadded``: skip
    the work on padding where the model can (``TBPSModel.encode_text_unpadded``: the same
    features up to float rounding, about half the time for short queries)."""
    encode = model.encode_text_unpadded if unpadded else model.encode_text
    return F.normalize(encode(tokens).float(), dim=-1)


@torch.no_grad()
def encode_image_batches(model, batches: Iterable[torch.Tensor], *, device="cpu", progress: bool = False,
                         desc: str = "encode images", total: int | None = None, tta: str = "none") -> torch.Tensor:
    """Batches of (B, 3, H, W) preprocessed images -> (N, D) L2-normalised features on the CPU, in
    order, with the model in eval mode (its mode is restored afterwards); ``tta`` as in
    :func:`image_features`."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    feats = []
    try:
        for x in tqdm(batches, desc=desc, unit="batch", total=total, disable=not progress, leave=False):
            feats.append(image_features(model, x.to(device), tta).cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats) if feats else torch.empty(0, 0)


def encode_images(model, paths: Sequence, *, batch_size: int = 256, device="cpu", num_workers: int = 0,
                  progress: bool = True, tta: str = "none") -> torch.Tensor:
    """Image files -> (N, D) L2-normalised features, in order (the eval transform of the model;
    ``tta`` as in :func:`image_features`)."""
    from torch.utils.data import DataLoader

    from tbps.data.dataset import GalleryImages

    spec = model.spec
    loader = DataLoader(GalleryImages(paths, model.image_size, spec.mean, spec.std, **resize_settings(spec)),
                        batch_size=batch_size, num_workers=num_workers)
    return encode_image_batches(model, (x for x, _ in loader), device=device, progress=progress,
                                total=len(loader), tta=tta)


@torch.no_grad()
def encode_captions(model, tokenizer, captions: Sequence[str], *, batch_size: int = 256, device="cpu",
                    max_words: int = 77, progress: bool = True) -> torch.Tensor:
    """Captions -> (N, D) L2-normalised features on the CPU, in order (cleaned as in training)."""
    from tqdm import tqdm

    feats = []
    cleaning, words = caption_settings(model.spec, max_words)
    steps = range(0, len(captions), batch_size)
    for i in tqdm(steps, desc="encode captions", unit="batch", disable=not progress, leave=False):
        tokens = tokenize_captions(tokenizer, captions[i : i + batch_size], words, cleaning).to(device)
        feats.append(text_features(model, tokens).cpu())
    return torch.cat(feats) if feats else torch.empty(0, 0)


class Encoder:
    """Image and text encoder of a tbps checkpoint; outputs L2-normalised float32 arrays.

    image_tta: "none" or "flip" (:func:`image_features`), applied by ``encode_images``; "flip" is
    recorded in the fingerprint (``image_tta``), so an index built with it takes image queries and
    additions only from an encoder that mirrors too (text features do not change).
    """

    def __init__(self, model, *, fingerprint: dict, device="cpu", max_words: int = 77, checkpoint: str | None = None,
                 image_tta: str = "none"):
        from tbps.models.factory import get_tokenizer

        _check_tta(image_tta)
        if image_tta != "none":
            fingerprint = {**fingerprint, "image_tta": image_tta}
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.tokenizer = get_tokenizer(model.spec)
        self.cleaning, self.max_words = caption_settings(model.spec, max_words)
        self.resize = resize_settings(model.spec)
        self.fingerprint = fingerprint
        self.checkpoint = checkpoint
        self.image_size = model.image_size
        self.embed_dim = int(fingerprint["embed_dim"])
        self.image_tta = image_tta

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device="cpu", image_tta: str = "none") -> "Encoder":
        """Load ``best.pt``/``last.pt`` or a run folder (best.pt preferred)."""
        model, ckpt = load_model(path, device)
        spec = model.spec
        fingerprint = {
            "checkpoint_sha256": file_sha256(ckpt["path"]),
            "arch": spec.arch,
            "image_size": list(model.image_size),
            "mean": list(spec.mean),
            "std": list(spec.std),
            "embed_dim": model.embed_dim,
            "context_length": model.context_length,
        }
        if spec.preprocess:  # a converted model: how its source code prepared inputs (native: unchanged)
            fingerprint["preprocess"] = dict(spec.preprocess)
        if spec.tse:
            fingerprint["tse"] = dict(spec.tse)
        max_words = checkpoint_max_words(ckpt)
        return cls(model, fingerprint=fingerprint, device=device, max_words=max_words, checkpoint=ckpt["path"],
                   image_tta=image_tta)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, H, W) tensor with the eval transform the model was trained with."""
        return eval_transform(image, self.image_size, self.model.spec.mean, self.model.spec.std, **self.resize)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed images -> (B, D) float32, L2-normalised."""
        return image_features(self.model, pixels.to(self.device), self.image_tta).cpu().numpy()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Descriptions -> (B, D) float32, L2-normalised (cleaned and truncated as in training)."""
        tokens = tokenize_captions(self.tokenizer, texts, self.max_words, self.cleaning).to(self.device)
        return text_features(self.model, tokens, unpadded=True).cpu().numpy()

    def unknown_words(self, text: str) -> dict[str, list[tuple[str, float]]]:
        """How a description's words outside the training vocabulary are read: {word: [(training word,
        weight), ...]} (frozen word-dictionary towers with ``oov: nearest``; {} otherwise or when none are)."""
        explain = getattr(self.tokenizer, "explain", None)
        if explain is None or self.cleaning != "tbps-clip":
            return {}
        return explain(clean_caption(text, self.max_words or 77))


def create_untrained_checkpoint(path: str | os.PathLike, arch: str = "tiny-vit", seed: int = 0) -> Path:
    """Write a valid checkpoint with random weights (for tests and benchmarks)."""
    from tbps.recipes.config import load_recipe
    from tbps.models.factory import create_model
    from tbps.models.spec import ModelSpec

    recipe = load_recipe("tbps-clip-cpu", [f"model.arch={arch}", "model.image_size=null", "model.context_length=null"])
    torch.manual_seed(seed)
    model = create_model(ModelSpec(arch=arch), load_pretrained=False)
    return save_checkpoint(path, {"model_spec": model.spec.to_dict(), "model": model.state_dict(),
                                  "objective": {}, "recipe": recipe.to_dict(), "epoch": 0, "step_in_epoch": 0,
                                  "global_step": 0, "history": [], "best": None})
