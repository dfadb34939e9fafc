"""Checkpoints: one ``.pt`` file holding everything needed to rebuild, resume or serve.

Keys: ``format``, ``version``, ``model_spec`` (architecture and its config, so the file
rebuilds anywhere), ``model`` (state dict), ``objective`` (heads), ``recipe``, and for
resuming ``optimizer``, ``epoch``, ``step_in_epoch``, ``global_step``, ``rng``,
``best``. Writes are atomic: a crash leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbps.files import atomic_write
from tbps.models.factory import create_model
from tbps.models.spec import ModelSpec

FORMAT = "tbps-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not a tbps checkpoint."""

    user_error = True


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format tags) atomically to ``path``."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file, or a run folder's ``best.pt`` (else ``last.pt``); adds ``path``.

    A full pickle (optimizer, RNG and recipe state are not plain tensors): load only files you trust.
    Raises :class:`CheckpointError` for a missing, unreadable or foreign file.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path}: a run folder without best.pt or last.pt")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tbps checkpoint (made by `tbps train`)")
    ckpt["path"] = str(path)
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the model stored in a checkpoint: returns (model in eval mode, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    spec = ModelSpec.from_dict(ckpt["model_spec"])
    model = create_model(spec, load_pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def max_words(ckpt: dict[str, Any]) -> int:
    """How many words of a caption the checkpoint's recipe kept (``data.max_words``; 77 when unrecorded):
    queries and evaluation captions are truncated the same way."""
    return int(ckpt.get("recipe", {}).get("data", {}).get("max_words", 77))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (identifies the checkpoint an index was built from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) generator states, for an exact resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states :func:`rng_state` returned (CUDA's only where CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
