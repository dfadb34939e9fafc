"""Image transforms: the eval transform, TBPS-CLIP's augmentation pool, strong SimCLR views.

Everything here runs in the data pipeline (workers), never inside ``model.forward``.
Randomness comes from an explicit ``random.Random`` and a forked torch RNG per sample,
so a sample's augmentation depends only on (seed, epoch, index): runs are reproducible
and a resumed run sees the same images as an uninterrupted one. The normalisation
``mean`` / ``std`` are always passed in (the model's ``spec.mean`` / ``spec.std``): the
data layer does not import the models.
"""

from __future__ import annotations

import math
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
    hflip: float = 0.0  # each image mirrored with this probability before the pool's draws (IRRA's and
                        # person re-id's RandomHorizontalFlip(0.5) on every image); 0: only when the pool draws it
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
    """Apply ``num_ops`` operations drawn with replacement from the pool, then normalise.

    In two phases, so a whole batch is augmented a few calls at a time: :meth:`plan` draws one
    image's operations and their parameters (the same draws, in the same order, from the same
    generators, as the torchvision transforms of :func:`_op` make when called), and
    :meth:`apply` carries out the plans of a batch of images, each operation once over the images
    that drew it, with the same arithmetic as torchvision's (so bit-identical images: tested
    against the transforms called one image at a time). Per image, torchvision spends most of a
    96 x 48 image's time on dispatch, not arithmetic.
    """

    def __init__(self, size: tuple[int, int], config: AugmentConfig, mean: Sequence[float],
                 std: Sequence[float]):
        self.size, self.config, self.mean, self.std = tuple(size), config, mean, std
        self.ops = {name: _op(name, self.size) for name in config.pool}
        if "rotation" in self.ops:
            from torchvision.transforms import InterpolationMode

            op = self.ops["rotation"]
            fill = [op.fill] if isinstance(op.fill, (int, float)) else op.fill
            if op.center is not None or op.expand or op.interpolation != InterpolationMode.NEAREST or any(fill):
                raise ValueError("batched rotation supports torchvision's defaults only: nearest, no centre or expand, fill 0")
        self._shape = torch.empty((3, *self.size), device="meta")  # an image's shape, for get_params
        self._grid = None  # the rotation's base grid, (1, H * W, 3), built once
        self._fallback = None  # the resized crop's box when no random box can fit (see _crop_box)

    def __call__(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """(3, H, W) float image in [0, 1] -> augmented, normalised (3, H, W)."""
        return self.apply(x[None].clone(), [self.plan(rng)])[0]

    def plan(self, rng: random.Random) -> list[tuple[str, object]]:
        """One image's operations as (name, parameters), erasing last; ``None`` parameters: the op
        drew "skip". Draws the op names from ``rng`` and their parameters from torch's default CPU
        generator."""
        import torchvision.transforms as T

        out = []
        if self.config.hflip > 0:  # torchvision's RandomHorizontalFlip(p), before the pool
            out.append(("hflip", True if torch.rand(1) < self.config.hflip else None))
        names = rng.choices(list(self.config.pool), k=self.config.num_ops) if self.config.pool else []
        # erasing acts after normalisation, so it draws last (as when it is called last)
        for name in sorted(names, key=lambda n: n == "erasing"):
            op = self.ops[name]
            if name == "color_jitter":
                order, *factors = T.ColorJitter.get_params(op.brightness, op.contrast, op.saturation, op.hue)
                params = (order.tolist(), factors)
            elif name == "rotation":
                params = T.RandomRotation.get_params(op.degrees)
            elif name == "resized_crop":
                params = self._crop_box(op)
            elif name in ("grayscale", "hflip"):
                params = True if torch.rand(1) < op.p else None
            else:  # erasing
                params = None
                if torch.rand(1) < op.p:
                    i, j, h, w, v = T.RandomErasing.get_params(self._shape, scale=op.scale, ratio=op.ratio,
                                                               value=[float(op.value)])
                    # after ten boxes that did not fit torchvision "erases" with the image itself: nothing
                    params = (i, j, h, w, v) if v is not self._shape else None
            out.append((name, params))
        return out

    def _crop_box(self, op) -> tuple[int, int, int, int]:
        """``RandomResizedCrop.get_params``: ten tries at a random box, then the central one.

        For a tall person crop (96 x 48) with TBPS-CLIP's scale (0.9, 1) and the default ratios
        (3/4, 4/3) no try can fit (the narrowest box is 56 pixels wide), so torchvision always
        returns the central box after ten tries of two uniform draws each. Then the same twenty
        draws are made in one call (the generator moves the same: tested) and the box is known."""
        import torchvision.transforms as T

        if self._fallback is None:
            (_, h, w), (s0, _), (r0, r1) = self._shape.shape, op.scale, op.ratio
            margin = 1 - 1e-4  # float32 draws and log/exp of the ratios stray ~1e-7 past the bounds
            never = (math.sqrt(h * w * s0 * r0 * margin) > w + 0.5
                     or math.sqrt(h * w * s0 / r1 * margin) > h + 0.5)
            if never:
                with torch.random.fork_rng(devices=[]):
                    self._fallback = T.RandomResizedCrop.get_params(self._shape, op.scale, op.ratio)
            else:
                self._fallback = False
        if self._fallback is False:
            return T.RandomResizedCrop.get_params(self._shape, op.scale, op.ratio)
        torch.empty(20).uniform_()
        return self._fallback

    def apply(self, x: torch.Tensor, plans: Sequence[list[tuple[str, object]]]) -> torch.Tensor:
        """(N, 3, H, W) float images in [0, 1] and one plan each -> augmented, normalised (N, 3, H, W).

        Overwrites ``x`` (pass a copy to keep it)."""
        from torchvision.transforms.functional import normalize

        for r in range(max((len(p) for p in plans), default=0)):
            groups: dict[str, list[int]] = {}
            for k, p in enumerate(plans):
                if r < len(p) and p[r][1] is not None and p[r][0] != "erasing":
                    groups.setdefault(p[r][0], []).append(k)
            for name, ks in groups.items():
                idx = torch.tensor(ks)
                x[idx] = getattr(self, f"_{name}")(x[idx], [plans[k][r][1] for k in ks])
        x = normalize(x, self.mean, self.std)
        for k, p in enumerate(plans):  # erasing acts after normalisation, as in torchvision pipelines
            for name, params in p:
                if name == "erasing" and params is not None:
                    i, j, h, w, v = params
                    x[k, :, i:i + h, j:j + w] = v
        return x

    # Each op: (n, 3, H, W) images and one parameter set each -> (n, 3, H, W), as torchvision's.
    def _hflip(self, x, _params):
        return x.flip(-1)

    def _grayscale(self, x, _params):
        from torchvision.transforms.functional import rgb_to_grayscale

        return rgb_to_grayscale(x, num_output_channels=3)

    def _resized_crop(self, x, params):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resized_crop

        op = self.ops["resized_crop"]
        boxes: dict[tuple, list[int]] = {}
        for k, box in enumerate(params):
            boxes.setdefault(tuple(box), []).append(k)
        out = torch.empty_like(x)
        for box, ks in boxes.items():
            idx = torch.tensor(ks)
            out[idx] = resized_crop(x[idx], *box, list(self.size), InterpolationMode(op.interpolation),
                                    antialias=op.antialias)
        return out

    def _rotation(self, x, angles):
        # torchvision's F.rotate: the inverse rotation about the centre as an affine grid, nearest
        # neighbour, zero fill (its fill mask only rewrites zeros with zeros when the fill is 0).
        from torch.nn.functional import grid_sample

        h, w = self.size
        if self._grid is None:
            base = torch.empty(1, h, w, 3)
            base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 + 0.5 - 1, steps=w))
            base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 + 0.5 - 1, steps=h).unsqueeze_(-1))
            base[..., 2].fill_(1)
            self._grid = base.view(1, h * w, 3)
        rows = []
        for angle in angles:
            rot = math.radians(-angle)
            rows.append([math.cos(rot), math.sin(rot), 0.0, -math.sin(rot), math.cos(rot), 0.0])
        theta = torch.tensor(rows, dtype=x.dtype).reshape(-1, 2, 3)
        scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=x.dtype)
        grid = self._grid.expand(len(scaled), -1, -1).bmm(scaled).view(-1, h, w, 2)
        return grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def _color_jitter(self, x, params):
        # torchvision's ColorJitter: brightness, contrast, saturation (hue, when drawn), each a blend
        # with a per-image factor, in the image's own drawn order. At each of the four places in the
        # order, each blend runs over all the images and is kept for those whose op it is.
        from torchvision.transforms.functional import adjust_hue, rgb_to_grayscale

        for t in range(4):
            for fn in range(4):
                f = [factors[fn] if order[t] == fn and factors[fn] is not None else None for order, factors in params]
                if all(v is None for v in f):
                    continue
                if fn == 3:
                    x = torch.stack([s if h is None else adjust_hue(s, h) for s, h in zip(x, f)])
                    continue
                keep = torch.tensor([v is not None for v in f]).view(-1, 1, 1, 1)
                f = [1.0 if v is None else v for v in f]
                if fn == 0:
                    y = _blend(x, torch.zeros_like(x), f)
                elif fn == 1:
                    y = _blend(x, torch.mean(rgb_to_grayscale(x), dim=(-3, -2, -1), keepdim=True), f)
                else:
                    y = _blend(x, rgb_to_grayscale(x), f)
                x = torch.where(keep, y, x)
        return x


def _blend(a: torch.Tensor, b: torch.Tensor, ratios: Sequence[float]) -> torch.Tensor:
    """torchvision's ``_blend`` with one ratio per image: ``(r * a + (1 - r) * b)`` clamped to [0, 1]
    (each ratio and its complement rounded to float32 as torchvision's scalar arguments are)."""
    r = torch.tensor(ratios, dtype=a.dtype).view(-1, 1, 1, 1)
    q = torch.tensor([1.0 - v for v in ratios], dtype=a.dtype).view(-1, 1, 1, 1)
    return (r * a + q * b).clamp(0, 1.0).to(a.dtype)


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

