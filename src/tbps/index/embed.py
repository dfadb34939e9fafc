"""Image files to unit features: decoding in ``DataLoader`` workers, the encoder in the main process.

Decoding, hashing and preprocessing run in worker processes so they overlap the model's
forward pass. An unreadable, corrupt or non-image file becomes a failure (index, reason) in
its batch; it never stops the run. ``embed_files`` only yields batches: what is stored, and
where, is the caller's business (``tbps.index.build``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from tbps.index.errors import IndexInputError


@dataclass
class EmbeddedBatch:
    """One batch of ``embed_files``: the files that decoded, their features, and the ones that did not."""

    indices: list[int]  # positions in ``paths`` of the embedded files, in order
    features: np.ndarray  # (len(indices), D) float32, L2-normalised
    infos: list[dict]  # per embedded file: width, height, sha256 (of the bytes read)
    failures: list[tuple[int, str]]  # (position in ``paths``, reason) of the skipped files


def default_workers() -> int:
    """Decoding workers: leave one core for the model's forward pass."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class ImageReader:
    """torch Dataset over image files: ``(i, pixels (3, H, W) | None, info | None, error | None)``."""

    def __init__(self, paths: Sequence[str], preprocess):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from tbps.data.images import ImageError, open_image

        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
            sha = hashlib.sha256(data).hexdigest()
            im = open_image(data)  # upright RGB, decoded fully here: truncated files fail now
            width, height = im.size
            pixels = self.preprocess(im)
            return i, pixels, {"width": width, "height": height, "sha256": sha}, None
        except ImageError as e:
            return i, None, None, str(e).removeprefix("image: ")
        except Exception as e:  # any unreadable file is reported and skipped
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if type(e).__name__ == "UnidentifiedImageError":
                reason = "not an image (PIL cannot identify the file)"
            return i, None, None, reason


def _collate(batch):
    return batch  # a list of ImageReader items; failed ones have no pixels to stack


def _worker_init(_):
    import torch

    torch.set_num_threads(1)  # workers decode; the main process owns the cores for the model


def embed_files(paths: Sequence[str], encoder, *, batch_size: int = 64, workers: int | None = None,
                progress: bool = True, desc: str = "embedding") -> Iterator[EmbeddedBatch]:
    """Embed the images at ``paths`` in order, one ``EmbeddedBatch`` per ``batch_size`` files.

    encoder: ``preprocess(PIL image) -> (3, H, W)`` runs in the workers, ``encode_images(pixels
    (B, 3, H, W)) -> (B, D)`` in this process (``tbps.retrieval.encoder.Encoder``). Features
    are re-normalised, as the index stores unit vectors. workers: decoding processes (None:
    ``default_workers()``, 0: decode here). progress: a tqdm bar on stderr.
    """
    if batch_size <= 0:
        raise IndexInputError(f"batch size must be positive, got {batch_size}")
    workers = default_workers() if workers is None else int(workers)
    if not paths:
        return
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(
        ImageReader(paths, encoder.preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )
    dim = int(encoder.embed_dim)
    bar = tqdm(total=len(paths), unit="img", desc=desc, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for batch in loader:
            good = [b for b in batch if b[1] is not None]
            failures = [(b[0], b[3]) for b in batch if b[1] is None]
            yield EmbeddedBatch([b[0] for b in good], _encode(encoder, [b[1] for b in good], dim),
                                [b[2] for b in good], failures)
            bar.update(len(batch))
    finally:
        bar.close()


def _encode(encoder, pixels: list, dim: int) -> np.ndarray:
    """(B, D) unit features of B preprocessed images (B may be 0)."""
    import torch

    if not pixels:
        return np.zeros((0, dim), dtype=np.float32)
    with torch.inference_mode():
        feats = encoder.encode_images(torch.stack(pixels))
    feats = np.asarray(feats, dtype=np.float32)
    if feats.shape != (len(pixels), dim):
        raise RuntimeError(f"encoder returned features of shape {feats.shape}, expected {(len(pixels), dim)}")
    # Guard against non-normalised output: the index stores unit vectors.
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)
