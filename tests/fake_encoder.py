"""A tiny deterministic stand-in for ``tbps.retrieval.encoder.Encoder``, for tests and demos.

Images: the RGB crop is resized to 16x8 and projected by a fixed random matrix; texts: a
hashed bag of words. Both are L2-normalised. No learning, no semantics beyond "similar
pixels give similar features"; it exists so that index and server tests run in
milliseconds and without a checkpoint.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np


class FakeEncoder:
    """Same interface as ``tbps.retrieval.encoder.Encoder`` (fingerprint, embed_dim, preprocess,
    encode_images, encode_texts); ``delay_s`` sleeps per batch to imitate a slow model."""

    image_size = (16, 8)  # (H, W)

    def __init__(self, embed_dim: int = 32, seed: int = 0, delay_s: float = 0.0):
        self.embed_dim = int(embed_dim)
        self.seed = int(seed)
        self.delay_s = float(delay_s)
        h, w = self.image_size
        rng = np.random.default_rng(seed)
        self._proj = rng.standard_normal((3 * h * w, self.embed_dim)).astype(np.float32)
        self.fingerprint = {
            "checkpoint_sha256": hashlib.sha256(f"fake-{seed}".encode()).hexdigest(),
            "arch": "fake-pixels",
            "image_size": [h, w],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "embed_dim": self.embed_dim,
        }

    def preprocess(self, image):
        import torch

        h, w = self.image_size
        arr = np.asarray(image.convert("RGB").resize((w, h)), dtype=np.float32) / 255.0  # (H, W, 3)
        return torch.from_numpy((arr - 0.5) / 0.5).permute(2, 0, 1).contiguous()  # (3, H, W)

    def encode_images(self, pixels) -> np.ndarray:
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        x = np.asarray(pixels, dtype=np.float32).reshape(len(pixels), -1)  # (B, 3*H*W)
        f = x @ self._proj  # (B, D)
        return (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def unknown_words(self, text: str) -> dict:
        return {}  # a word-hashing encoder knows every word

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for word in re.findall(r"\w+", t.lower()):
                hsh = int.from_bytes(hashlib.md5(f"{self.seed}:{word}".encode()).digest()[:8], "little")
                out[i, hsh % self.embed_dim] += 1.0 if (hsh >> 32) & 1 else -1.0
            if not out[i].any():
                out[i, 0] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)
