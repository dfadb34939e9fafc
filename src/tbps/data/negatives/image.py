"""MeFa's image hard negatives: for each training image, the most similar training images of
other people, from a feature bank of the current model refreshed every epoch.

The bank is the global image features of every training image (eval transform, no
augmentation), L2-normalised; neighbours come from an exact chunked matrix product
(``chunk`` rows at a time, so memory stays ``chunk x N`` floats even at CUHK-PEDES's 34k images;
faiss would only pay off far beyond that).
"""

from __future__ import annotations

from typing import Iterator

import torch


def hard_negative_images(features: torch.Tensor, pids: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """(N, D) normalised features, (N,) person ids -> (N, k') indices of each image's k most similar
    images of other persons, most similar first (k' = min(k, N - largest identity's size))."""
    n = features.shape[0]
    k = min(k, n - int(torch.unique(pids, return_counts=True)[1].max()))
    if k <= 0:
        raise ValueError("image hard negatives need at least two persons in the training set")
    out = torch.empty(n, k, dtype=torch.long)
    for s in range(0, n, chunk):
        sim = features[s:s + chunk] @ features.t()  # (c, N)
        sim = sim.masked_fill(pids[s:s + chunk, None] == pids[None, :], float("-inf"))
        out[s:s + chunk] = sim.topk(k, dim=1).indices.cpu()
    return out


def bank_batches(dataset, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The bank's input: every record of a :class:`TrainPairs` in order, as (B, 3, H, W) batches
    with the eval transform (its in-memory cache when it has one; an unreadable file is a black
    image). The features come from ``tbps.retrieval.encoder.encode_image_batches``."""
    from torchvision.transforms.functional import normalize

    n = len(dataset.records)
    for s in range(0, n, batch_size):
        imgs = torch.stack([dataset.record_image(i) for i in range(s, min(s + batch_size, n))])
        yield normalize(imgs, dataset.mean, dataset.std)
