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
    "train.cpu_threads=1",  # fixed: the default follows the machine's load, and runs compared bit for bit must not
]


@pytest.fixture
def micro_overrides():
    return list(MICRO)


def objective_setup(recipe, root):
    """A recipe's model, training set and objective on the dataset at ``root``, with the trainer's hooks
    run in its order (prepare_data, configure, on_epoch_start) at the first epoch where every stage's
    losses are on. Returns (model, dataset, objective, epoch, collate)."""
    from tbps.data.dataset import Collate, TrainPairs
    from tbps.data.layouts import load_annotations
    from tbps.data.text import clean_caption
    from tbps.models.factory import create_model, get_tokenizer
    from tbps.objectives import build_objective

    from tbps.recipes.stages import stage_starts

    epoch = max(stage_starts(recipe.stages, recipe.train.epochs), default=0)
    torch.manual_seed(0)
    model = create_model(recipe.model)
    records = load_annotations(root).split("train")
    ds = TrainPairs(records, model.image_size, mean=model.spec.mean, std=model.spec.std, augment=recipe.data.augment,
                    text_augment=None, max_words=recipe.data.max_words)
    model.prepare_vocabulary([clean_caption(c, 10**6) for r in records for c in r.captions])
    obj = build_objective(recipe.objective, model, recipe.losses_at(0), num_identities=ds.num_identities)
    obj.prepare_data(ds)
    obj.configure(recipe.losses_at(epoch))
    ds.set_epoch(int(epoch))
    obj.on_epoch_start(model, ds, epoch=int(epoch), device="cpu")
    return model, ds, obj, epoch, Collate(get_tokenizer(model.spec), obj.batch_hook(ds))


@pytest.fixture()
def fake_models(tmp_path, monkeypatch):
    """Checkpoint files whose name picks a FakeEncoder seed: fake0.pt, fake1.pt; `tbps` commands load
    them through tbps.cli.common.load_encoder (one encoder per file name)."""
    import pathlib

    import tbps.cli.common as cli_common
    from tests.fake_encoder import FakeEncoder

    made = {}

    def load(checkpoint, device="cpu", image_tta="none"):
        assert image_tta == "none", image_tta  # fake encoders have no image tower to mirror
        name = pathlib.Path(checkpoint).name
        assert pathlib.Path(checkpoint).exists(), checkpoint
        made[name] = made.get(name) or FakeEncoder(embed_dim=32, seed=int(name[4]))
        return made[name]

    monkeypatch.setattr(cli_common, "load_encoder", load)
    for n in ("fake0.pt", "fake1.pt"):
        (tmp_path / n).write_bytes(b"x")
    return tmp_path / "fake0.pt", tmp_path / "fake1.pt"
