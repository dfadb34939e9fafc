"""Inference: a trained checkpoint as an image/text encoder for indexing and search.

``Encoder.fingerprint`` identifies the checkpoint and the preprocessing; an index built
with one encoder refuses queries from another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tbps.data.text import clean_caption
from tbps.data.transforms import eval_transform
from tbps.models.checkpoint import CheckpointError, file_sha256, load_model, save_checkpoint

__all__ = ["CheckpointError", "Encoder", "create_untrained_checkpoint"]


class Encoder:
    """Image and text encoder of a tbps checkpoint; outputs L2-normalised float32 arrays."""

    def __init__(self, model, *, fingerprint: dict, device="cpu", max_words: int = 77, checkpoint: str | None = None):
        from tbps.models.factory import get_tokenizer

        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.tokenizer = get_tokenizer(model.spec)
        self.max_words = max_words
        self.fingerprint = fingerprint
        self.checkpoint = checkpoint
        self.image_size = model.image_size
        self.embed_dim = int(fingerprint["embed_dim"])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device="cpu") -> "Encoder":
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
        max_words = ckpt.get("recipe", {}).get("data", {}).get("max_words", 77)
        return cls(model, fingerprint=fingerprint, device=device, max_words=max_words, checkpoint=ckpt["path"])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, H, W) tensor with the eval transform the model was trained with."""
        return eval_transform(image, self.image_size, self.model.spec.mean, self.model.spec.std)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed images -> (B, D) float32, L2-normalised."""
        feats = self.model.encode_image(pixels.to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Descriptions -> (B, D) float32, L2-normalised (cleaned and truncated as in training)."""
        tokens = self.tokenizer([clean_caption(t, self.max_words) for t in texts]).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy()


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
