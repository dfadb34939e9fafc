"""The training parts a bench needs, built as ``tbps train`` builds them (bench-only helper).

``python bench/NAME.py`` puts this folder on ``sys.path``, so a bench imports it as ``_parts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Parts:
    model: Any  # tbps.models.tbps_model.TBPSModel
    dataset: Any  # tbps.data.dataset.TrainPairs
    objective: Any  # tbps.objectives.base.Objective (None when built without one)
    collate: Any  # tbps.data.dataset.Collate, with the objective's batch hook


def training_parts(recipe, records, losses: dict | None = None, *, objective: bool = True,
                   cache_images: bool = False, token_cache: dict | None = None) -> Parts:
    """The model (random weights, ``torch.manual_seed(recipe.train.seed)`` first), the training
    pairs of ``records`` with the recipe's augmentation, the frozen word dictionary where the text
    tower has one, the objective for ``losses`` (default: those at the run's start) with its data
    prepared, and the Collate. The optimiser stays with the caller: one that loads a checkpoint
    must load the state dicts before building it."""
    import torch

    from tbps.data.dataset import Collate, TrainPairs
    from tbps.engine.distributed import DistInfo
    from tbps.engine.train import _prepare_vocabulary
    from tbps.models.factory import create_model, get_tokenizer
    from tbps.objectives import build_objective

    d = recipe.data
    torch.manual_seed(recipe.train.seed)
    model = create_model(recipe.model, load_pretrained=False)
    ds = TrainPairs(records, model.image_size, mean=model.spec.mean, std=model.spec.std, augment=d.augment,
                    text_augment=d.text_augment, max_words=d.max_words, seed=recipe.train.seed)
    if cache_images:
        ds.cache_images()
    _prepare_vocabulary(model, records, DistInfo())  # the trainer's own step (back-translations included)
    obj = None
    if objective:
        obj = build_objective(recipe.objective, model, recipe.losses_at(0) if losses is None else losses,
                              num_identities=ds.num_identities)
        obj.prepare_data(ds)
    collate = Collate(get_tokenizer(model.spec), obj.batch_hook(ds) if obj is not None else None, token_cache)
    return Parts(model, ds, obj, collate)
