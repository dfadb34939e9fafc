"""tbps: text-based person search.

Train and evaluate TBPS methods on the public benchmarks, and search your own gallery of
person crops by text. The library never parses command lines: the CLI (``tbps.cli``) turns
flags and recipe files into plain arguments. Scripts use the small API below instead of
deep import paths, which may move::

    import tbps

    recipe = tbps.load_recipe("tbps-clip-cpu", ["optim.lr=5e-4"])
    summary = tbps.train("data/synth", recipe, "runs/cpu", time_budget=8)
    encoder = tbps.load_encoder("runs/cpu/best.pt")
    tbps.build_index("gallery.idx", encoder, "crops/", metadata_csv="crops.csv")
    with tbps.open_index("gallery.idx") as index:
        hits = index.search(encoder.encode_texts(["a woman in a red coat"]), k=10)[0]
    metrics = tbps.retrieval_metrics(similarity, query_ids, gallery_ids)  # R@k, mAP, mINP

Importing ``tbps`` is cheap: each function imports what it needs (torch, open_clip, faiss)
when called.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_index",
    "evaluate",
    "load_encoder",
    "load_recipe",
    "open_index",
    "retrieval_metrics",
    "synthesize",
    "train",
]


def load_recipe(name_or_path: str = "tbps-clip-cpu", overrides: Sequence[str] = ()):
    """A shipped recipe by name (``tbps train --list-recipes``) or a YAML path, with
    ``section.key=value`` overrides applied and validated: a :class:`tbps.recipes.config.Recipe`."""
    from tbps.recipes.config import load_recipe as _load

    return _load(name_or_path, list(overrides))


def train(data_root: str | os.PathLike, recipe: Any = "tbps-clip-cpu", out_dir: str | os.PathLike = "runs/tbps",
          **options: Any) -> dict:
    """Train (or with ``resume=True`` continue) a recipe on a dataset folder; returns the run's summary
    (paths of ``best.pt``/``last.pt``, the best val metrics, steps, time).

    recipe: a :class:`Recipe`, or a name/path for :func:`load_recipe`. options: the fields of
    :class:`tbps.engine.train.TrainJob` (``epochs``, ``time_budget`` in minutes, ``budget_clock``,
    ``init_from``, ``device``, ``layout``, ``strict``, ``progress``, ...). A non-empty ``out_dir`` is
    refused (``TrainError``) unless ``resume=True`` or ``overwrite=True``; every option is checked
    before any work.
    """
    from tbps.engine.train import TrainJob
    from tbps.engine.train import train as _train

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(str(recipe))
    return _train(TrainJob(data_root=str(data_root), recipe=recipe, out_dir=str(out_dir), **options))


def evaluate(checkpoint: str | os.PathLike, data_root: str | os.PathLike, split: str = "test", *,
             device: str = "cpu", layout: str | None = None, progress: bool = False, image_tta: str = "none") -> dict:
    """Text-to-image and image-to-text R@1/5/10, mAP and mINP (percent) of a checkpoint (or run folder)
    on one split of a dataset folder, as ``tbps eval`` prints them (``image_tta="flip"``: as ``--tta flip``)."""
    from tbps.engine.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, data_root, split, layout=layout, device=device,
                               progress=progress, image_tta=image_tta).result.metrics


def load_encoder(checkpoint: str | os.PathLike, device: str = "cpu", image_tta: str = "none"):
    """A trained checkpoint (``best.pt``, ``last.pt`` or a run folder) or a converted one (``tbps convert``:
    IRRA, RDE, TBPS-CLIP, OpenAI, open_clip) as an image/text encoder: ``preprocess(PIL image)`` gives the
    (3, H, W) tensor the model's source code would, ``encode_images((B, 3, H, W))`` and
    ``encode_texts(list[str])`` give (B, D) L2-normalised float32 arrays, captions cleaned and tokenised
    as the source did (:class:`tbps.retrieval.encoder.Encoder`). ``image_tta="flip"`` averages each
    image's features with its mirror image's (as ``tbps index build --tta flip``)."""
    from tbps.retrieval.encoder import Encoder

    return Encoder.from_checkpoint(checkpoint, device=device, image_tta=image_tta)


def build_index(path: str | os.PathLike, encoder, images_dir: str | os.PathLike, **options: Any) -> dict:
    """Embed every image under ``images_dir`` into a new gallery index at ``path``; returns counts.

    encoder: from :func:`load_encoder`, or a checkpoint path. options: those of
    :func:`tbps.index.build_index` (``recursive``, ``metadata_csv``, ``batch_size``, ``workers``,
    ``search_mode``, ``overwrite``, ``progress``).
    """
    from tbps.index import build_index as _build

    if isinstance(encoder, (str, os.PathLike)):
        encoder = load_encoder(encoder)
    return _build(path, encoder, images_dir, **options)


def open_index(path: str | os.PathLike):
    """Open a gallery index for search (:class:`tbps.index.GalleryIndex`; use it as a context manager)."""
    from tbps.index import GalleryIndex

    return GalleryIndex.open(path)


def retrieval_metrics(similarity, query_ids, gallery_ids, **options: Any) -> dict:
    """Exact R@k, mAP and mINP (percent) of a (Q, G) similarity matrix, in bounded memory (ties rank
    as a stable descending sort: :func:`tbps.retrieval.metrics.retrieval_metrics`)."""
    from tbps.retrieval.metrics import retrieval_metrics as _metrics

    return _metrics(similarity, query_ids, gallery_ids, **options)


def synthesize(out_dir: str | os.PathLike, ids: int = 1000, **options: Any) -> dict:
    """Write a synthetic pedestrian dataset in the CUHK-PEDES layout (``tbps synth``); returns its
    summary (:func:`tbps.synth.synthesize`)."""
    from tbps.synth import synthesize as _synth

    return _synth(out_dir, ids=ids, **options)
