"""Image transforms: the eval transform, TBPS-CLIP's augmentation pool, strong SimCLR views.

Everything here runs in the data pipeline (workers), never inside ``model.forward``.
Randomness comes from an explicit ``random.Random`` and a forked torch RNG per sample,
so a sample's augmentation depends only on (seed, epoch, index): runs are reproducible
and a resumed run sees the same images as an uninterrupted one. The normalisation
``mean`` / ``std`` are always passed in (the model's ``spec.mean`` / ``spec.std``): the
data layer does not import the models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from tbps.data.images import open_image, to_rgb

# TBPS-CLIP's pool: each training image gets `num_ops` draws (with replacement) from these.
AUGMENT_POOL = ("color_jitter", "rotation", "resized_crop", "grayscale", "hflip", "erasing")


@dataclass
class AugmentConfig:
    """Image augmentation settings of a recipe (``data.augment`` in the YAML)."""

    pool: Sequence[str] = AUGMENT_POOL
    num_ops: int = 2
    mvs: bool = False  # a second, independently augmented view for N-ITC (MVS)
    ss_views: bool = False  # two strong views for the SimCLR loss (SS)

    def __post_init__(self):
        unknown = set(self.pool) - set(AUGMENT_POOL)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; choose from {list(AUGMENT_POOL)}")


def load_image(path, size: tuple[int, int]) -> Image.Image:
    """Open upright as RGB (``tbps.data.images.open_image``) and resize to (height, width), bicubic."""
    return open_image(path).resize((size[1], size[0]), Image.BICUBIC)


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> normalised (3, H, W) float tensor: ``(x / 255 - mean) / std`` in float32.

    The same operations, in the same order and precision, as torchvision's ``pil_to_tensor``,
    ``div_(255)`` and ``normalize`` (so bit-identical), in NumPy: 2.5x cheaper a crop, which
    counts where images are decoded between forward passes (``tbps.index.embed``)."""
    import numpy as np

    a = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # (H, W, 3)
    x = a.transpose(2, 0, 1).astype(np.float32)
    x /= np.float32(255.0)
    x -= np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy(x)


RESIZE_MODES = ("squash", "shortest")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def eval_transform(img: Image.Image, size: tuple[int, int], mean: Sequence[float],
                   std: Sequence[float], *, resize: str = "squash", interpolation: str = "bicubic") -> torch.Tensor:
    """The deterministic test-time transform: RGB (``to_rgb``: 16-bit and transparent images by
    their meaning), resize, normalise.

    resize "squash" (tbps, IRRA, TBPS-CLIP): straight to (H, W); "shortest" (OpenAI CLIP, open_clip):
    the short side to the target's (torchvision's ``Resize(int)``), then a centre crop to (H, W).
    """
    img = to_rgb(img)
    if resize not in RESIZE_MODES or interpolation not in INTERPOLATIONS:
        raise ValueError(f"resize {resize!r} / interpolation {interpolation!r}: known {RESIZE_MODES} / {INTERPOLATIONS}")
    if resize == "shortest":
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import center_crop
        from torchvision.transforms.functional import resize as tv_resize

        mode = InterpolationMode(interpolation)
        img = center_crop(tv_resize(img, min(size), interpolation=mode), list(size))
    elif img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), getattr(Image, interpolation.upper()))
    return to_tensor(img, mean, std)


def _op(name: str, size: tuple[int, int]):
    import torchvision.transforms as T

    # Arguments as in TBPS-CLIP's code; defaults otherwise (flip p=0.5, grayscale p=0.1).
    return {
        "color_jitter": lambda: T.ColorJitter(0.1, 0.1, 0.1, 0),
        "rotation": lambda: T.RandomRotation(15),
        "resized_crop": lambda: T.RandomResizedCrop(size, scale=(0.9, 1.0), antialias=True),
        "grayscale": lambda: T.RandomGrayscale(),
        "hflip": lambda: T.RandomHorizontalFlip(),
        "erasing": lambda: T.RandomErasing(scale=(0.10, 0.20), value=0),
    }[name]()


class PoolAugment:
    """Apply ``num_ops`` operations drawn with replacement from the pool, then normalise."""

    def __init__(self, size: tuple[int, int], config: AugmentConfig, mean: Sequence[float],
                 std: Sequence[float]):
        self.size, self.config, self.mean, self.std = tuple(size), config, mean, std
        self.ops = {name: _op(name, self.size) for name in config.pool}

    def __call__(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """(3, H, W) float image in [0, 1] -> augmented, normalised (3, H, W)."""
        erase = []
        for name in rng.choices(list(self.config.pool), k=self.config.num_ops) if self.config.pool else []:
            if name == "erasing":
                erase.append(self.ops[name])  # erasing acts after normalisation, as in torchvision pipelines
            else:
                x = self.ops[name](x)
        from torchvision.transforms.functional import normalize

        x = normalize(x, self.mean, self.std)
        for op in erase:
            x = op(x)
        return x


class StrongViews:
    """SimCLR-style strong augmentation for the SS loss: crop 0.2-1, jitter, grayscale, blur, flip."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]):
        import torchvision.transforms as T

        k = max(3, (min(size) // 10) | 1)  # odd blur kernel ~10% of the short side
        self.t = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
                T.RandomHorizontalFlip(),
                T.Normalize(mean, std),
            ]
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(3, H, W) float image in [0, 1] -> a strong view, normalised."""
        return self.t(x)

