"""Checkpoints: one file holding everything needed to rebuild, resume or serve.

Keys: ``format``, ``version``, ``model_spec`` (architecture and its config, so the file
rebuilds anywhere), ``model`` (state dict), ``objective`` (heads), ``recipe``, and for
resuming ``optimizer``, ``epoch``, ``step_in_epoch``, ``global_step``, ``rng``,
``best``. Writes are atomic: a crash leaves the previous file intact.

A checkpoint is data, never code: it holds tensors, numbers, strings and lists/dicts of them
only (version 2 stores the RNG states as tensors, no numpy objects), and it is read with
``torch.load(weights_only=True)`` or from safetensors (:mod:`tbps.models.tensorfile`). The
format follows the name: ``*.safetensors`` or ``.pt`` (anything else).
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
from tbps.models.tensorfile import SAFETENSORS_SUFFIX, TensorFileError, read_state, write_state

FORMAT = "tbps-checkpoint"
VERSION = 2  # 2: RNG states as tensors (version 1 kept numpy arrays, which need code to unpickle)
# What a run folder offers, in order of preference.
RUN_FILES = ("best.pt", "best.safetensors", "last.pt", "last.safetensors")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or not a tbps checkpoint."""

    user_error = True


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format tags) atomically to ``path``: safetensors when the name ends in
    ``.safetensors``, else ``torch.save``'s format. Raises ``TypeError`` (and writes nothing) when
    ``state`` holds a value that is not a tensor, number, string or list/dict of those."""
    path = Path(path)
    fmt = "safetensors" if path.suffix == SAFETENSORS_SUFFIX else "pt"
    state = {**state, "format": FORMAT, "version": VERSION}
    state.pop("path", None)  # added on load: where the file was, not what it holds
    with atomic_write(path, "wb") as f:
        write_state(f, state, fmt)
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file ``path`` names: itself, or a run folder's best (else last) checkpoint."""
    path = Path(path)
    if path.is_dir():
        for name in RUN_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a run folder without best.pt or last.pt")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint file")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file (``.pt`` or ``.safetensors``) or a run folder's best (else last)
    checkpoint, as data only: no code in the file runs. Adds ``path``.

    Raises :class:`CheckpointError` (one line naming the file) for a missing, unreadable or
    foreign file, and for one that would need arbitrary code to unpickle.
    """
    path = resolve_checkpoint(path)
    try:
        ckpt = read_state(path, map_location)
    except TensorFileError as e:
        hint = (" (a last.pt written by tbps before checkpoint version 2 holds numpy RNG state: use the run's "
                "best.pt)" if "GLOBAL numpy" in str(e) else "")
        raise CheckpointError(f"{e}{hint}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tbps checkpoint (made by `tbps train`)")
    ckpt["path"] = str(path)
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the model stored in a checkpoint: returns (model in eval mode, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("model_spec"), dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{ckpt['path']}: a tbps checkpoint without its model (model_spec and model)")
    spec = ModelSpec.from_dict(ckpt["model_spec"])
    model = create_model(spec, load_pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # missing, unexpected or misshapen tensors: say which, in one line
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{ckpt['path']}: its weights do not fit its model_spec ({spec.arch}): "
                              f"{detail[:300]}") from None
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
    """The python, numpy, torch (and CUDA) generator states, for an exact resume, as tensors and
    plain numbers (so a checkpoint holding them loads without code)."""
    version, internal, gauss_next = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"bit_generator": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states :func:`rng_state` returned (CUDA's only where CUDA is available)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["bit_generator"], npy["key"].numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["gauss"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
