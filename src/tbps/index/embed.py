"""Image files to unit features: decoding (threads or ``DataLoader`` workers), the encoder in this process.

On a CPU the model's forward pass and the decoding (read, SHA-256, decode, preprocess) take
turns, each on every core: a batch is decoded by a pool of threads, then embedded (when the
model runs on fewer threads than there are cores, the spare cores decode the next batch
meanwhile). On a GPU
(or with ``workers`` > 0) decoding runs in worker processes and overlaps the forward pass,
each worker stacking its batch into one tensor. An unreadable, corrupt or non-image file
becomes a failure (index, reason) in its batch; it never stops the run. ``embed_files`` only
yields batches: what is stored, and where, is the caller's business (``tbps.index.build``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from tbps.index.errors import IndexInputError
from tbps.threads import torch_threads


@dataclass
class EmbeddedBatch:
    """One batch of ``embed_files``: the files that decoded, their features, and the ones that did not."""

    indices: list[int]  # positions in ``paths`` of the embedded files, in order
    features: np.ndarray  # (len(indices), D) float32, L2-normalised
    infos: list[dict]  # per embedded file: width, height, sha256 (of the bytes read)
    failures: list[tuple[int, str]]  # (position in ``paths``, reason) of the skipped files


def default_workers(device="cpu") -> int:
    """Decoding worker processes for ``embed_files``.

    On a CPU, none: the forward pass already keeps every core busy, and a decoding process
    beside it makes the model's threads wait on each other (on 2 cores one worker took the
    build from 72% to 19% of the model's own speed, ``bench/index_throughput.py``); the files
    of each batch are decoded by a pool of threads between forward passes instead, so both
    phases use all the cores in turn. On a GPU the cores are free: up to 4 workers, one core
    left for this process.
    """
    if str(device).split(":")[0] == "cpu":
        return 0
    return max(1, min(4, _cores() - 1))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


@dataclass
class _Decoded:
    """One batch of ``ImageReader`` items, stacked where they are decoded (a worker sends one
    tensor per batch, not one per image)."""

    indices: list[int]  # positions of the decoded files, in order
    pixels: object  # (len(indices), 3, H, W) tensor, or None when nothing decoded
    infos: list[dict]
    failures: list[tuple[int, str]]


def _collate(items) -> _Decoded:
    import torch

    good = [b for b in items if b[1] is not None]
    return _Decoded([b[0] for b in good], torch.stack([b[1] for b in good]) if good else None,
                    [b[2] for b in good], [(b[0], b[3]) for b in items if b[1] is None])


def _worker_init(_):
    import torch

    torch.set_num_threads(1)  # workers decode; the main process owns the other cores for the model


def _decoded_in_threads(reader: ImageReader, batch_size: int, model_threads: int) -> Iterator[_Decoded]:
    """The batches, decoded in this process by a pool of threads (PIL, hashlib and NumPy
    release the GIL while they work).

    When the model's threads leave cores free (``model_threads`` < cores: e.g. one thread on a
    busy machine), the free cores decode the next batch while the caller embeds this one.
    Otherwise every core is the model's: a batch is decoded, by one thread per core, only when
    it is asked for, i.e. between the caller's forward passes, so the two never compete.
    """
    from concurrent.futures import ThreadPoolExecutor

    spare = _cores() - model_threads
    ahead = spare > 0
    starts = range(0, len(reader), batch_size)

    def submit(pool, lo):
        return [pool.submit(reader.__getitem__, i) for i in range(lo, min(lo + batch_size, len(reader)))]

    with ThreadPoolExecutor(spare if ahead else max(1, model_threads)) as pool:
        pending = submit(pool, 0) if ahead else None
        for lo in starts:
            if ahead:
                items = [f.result() for f in pending]
                if lo + batch_size < len(reader):
                    pending = submit(pool, lo + batch_size)  # decoded while this batch is embedded
            else:
                items = [f.result() for f in submit(pool, lo)]
            yield _collate(items)


def _decoded_in_workers(reader: ImageReader, batch_size: int, workers: int) -> Iterator[_Decoded]:
    from torch.utils.data import DataLoader

    yield from DataLoader(reader, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                          worker_init_fn=_worker_init, prefetch_factor=4)


@contextlib.contextmanager
def _model_threads(device, workers: int):
    """With decoding workers on a CPU, the model gets the cores they leave (never more threads
    than cores: two threads beside a busy worker on 2 cores wait on each other)."""
    import torch

    n = torch.get_num_threads()
    if workers > 0 and str(device).split(":")[0] == "cpu":
        n = min(n, _cores() - workers)
    with torch_threads(n):
        yield


def embed_files(paths: Sequence[str], encoder, *, batch_size: int = 64, workers: int | None = None,
                progress: bool = True, desc: str = "embedding") -> Iterator[EmbeddedBatch]:
    """Embed the images at ``paths`` in order, one ``EmbeddedBatch`` per ``batch_size`` files.

    encoder: ``preprocess(PIL image) -> (3, H, W)`` decodes, ``encode_images(pixels
    (B, 3, H, W)) -> (B, D)`` embeds (``tbps.retrieval.encoder.Encoder``); its ``device``
    (default cpu) picks the default workers. Features are re-normalised, as the index stores
    unit vectors. workers: decoding processes (None: ``default_workers(device)``; 0: decode
    in this process, in threads, see ``_decoded_in_threads``). progress: a tqdm bar on stderr.
    """
    if batch_size <= 0:
        raise IndexInputError(f"batch size must be positive, got {batch_size}")
    device = getattr(encoder, "device", "cpu")
    workers = default_workers(device) if workers is None else int(workers)
    if not paths:
        return
    import torch
    from tqdm import tqdm

    reader = ImageReader(paths, encoder.preprocess)
    dim = int(encoder.embed_dim)
    bar = tqdm(total=len(paths), unit="img", desc=desc, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    with _model_threads(device, workers):
        batches = (_decoded_in_workers(reader, batch_size, workers) if workers > 0
                   else _decoded_in_threads(reader, batch_size, torch.get_num_threads()))
        try:
            for batch in batches:
                yield EmbeddedBatch(batch.indices, _encode(encoder, batch.pixels, dim), batch.infos, batch.failures)
                bar.update(len(batch.indices) + len(batch.failures))
        finally:
            batches.close()
            bar.close()


def _encode(encoder, pixels, dim: int) -> np.ndarray:
    """(B, D) unit features of a (B, 3, H, W) batch of preprocessed images (None: B = 0)."""
    import torch

    if pixels is None:
        return np.zeros((0, dim), dtype=np.float32)
    with torch.inference_mode():
        feats = encoder.encode_images(pixels)
    feats = np.asarray(feats, dtype=np.float32)
    if feats.shape != (len(pixels), dim):
        raise RuntimeError(f"encoder returned features of shape {feats.shape}, expected {(len(pixels), dim)}")
    # Guard against non-normalised output: the index stores unit vectors.
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)
