"""Shared fixtures: a tiny synthetic dataset made once per test session."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest
import torch

# Two cores: keep intra-op threads low so parallel helpers (DataLoader workers, gloo) don't thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))
logging.getLogger().setLevel(logging.ERROR)
# Tests never write into the user's cache folder (tests that check the cache set their own).
os.environ.setdefault("TBPS_CACHE", tempfile.mkdtemp(prefix="tbps-test-cache-"))  # open_clip warns about random init on every tiny model


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """24 identities x 3 views at 64x32, CUHK-PEDES layout (train/val/test by identity)."""
    from tbps.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, ids=24, images_per_id=3, seed=0, image_size=(64, 32), workers=1, progress=False)
    return root


# Recipe overrides that make training take seconds: the 1-layer micro architecture.
MICRO = [
    "model.arch=micro-vit",
    "model.image_size=[32, 16]",
    "model.context_length=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.eval_batch_size=64",
    "train.log_every=1",
]


@pytest.fixture
def micro_overrides():
    return list(MICRO)
