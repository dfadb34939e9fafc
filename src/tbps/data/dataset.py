"""Torch datasets over ``Record``s: training pairs and the evaluation gallery/queries.

A training item is one (image, caption) pair; person ids are remapped to 0..P-1 for
classifiers. Tokenisation happens in :class:`Collate`, never in the model.
"""

from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import normalize

from tbps.data.records import Record
from tbps.data.text import clean_caption
from tbps.data.text_aug import TextAugmentConfig, augment_caption
from tbps.data.transforms import AugmentConfig, PoolAugment, StrongViews, eval_transform, load_image
from tbps.threads import torch_threads


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # A fixed mix of the three numbers, so a sample's randomness ignores worker and resume order.
    return (seed * 1_000_003 + epoch) * 2_147_483_647 + index


class TrainPairs(Dataset):
    """(image, caption, person index) per caption of each training record."""

    def __init__(
        self,
        records: Sequence[Record],
        image_size: tuple[int, int],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentConfig | None = None,
        text_augment: TextAugmentConfig | None = None,
        max_words: int = 77,
        seed: int = 0,
    ):
        self.records = list(records)
        self.size = tuple(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.text_augment = text_augment
        self.max_words = max_words
        self.seed = seed
        self.epoch = 0
        self.pid_index = {pid: i for i, pid in enumerate(sorted({r.pid for r in self.records}))}
        self.items = [(ri, ci) for ri, r in enumerate(self.records) for ci in range(len(r.captions))]
        self.pool = PoolAugment(self.size, augment, self.mean, self.std) if augment else None
        self.strong = StrongViews(self.size, self.mean, self.std) if augment and augment.ss_views else None
        self._failed: set[str] = set()
        self.cache: torch.Tensor | None = None  # (N_records, 3, H, W) uint8 when cache_images()
        # MeFa: record index -> candidate hard-negative record indices (other persons); when set,
        # each item also carries ``neg_image``, one candidate drawn per sample and augmented alike.
        self.negatives: torch.Tensor | None = None  # (N_records, k) long

    def cache_images(self, threads: int = 4, progress: bool = False) -> None:
        """Decode and resize every training image once into memory (uint8).

        Worth it for small datasets on CPU: JPEG decoding and resizing are then paid once,
        not every epoch. DataLoader workers share the array copy-on-write.
        """
        from concurrent.futures import ThreadPoolExecutor

        from torchvision.transforms.functional import pil_to_tensor
        from tqdm import tqdm

        h, w = self.size
        cache = torch.zeros(len(self.records), 3, h, w, dtype=torch.uint8)
        ok = torch.ones(len(self.records), dtype=torch.bool)

        def one(i: int) -> None:
            try:
                cache[i] = pil_to_tensor(load_image(self.records[i].image, self.size))
            except (OSError, ValueError, SyntaxError) as e:
                ok[i] = False
                print(f"tbps: warning: skipping unreadable image {self.records[i].image}: {e}", file=sys.stderr)

        with ThreadPoolExecutor(threads) as pool:
            list(tqdm(pool.map(one, range(len(self.records))), total=len(self.records), desc="cache images",
                      unit="img", disable=not progress, leave=False))
        if not ok.all():
            keep = set(ok.nonzero().flatten().tolist())
            self.items = [(ri, ci) for ri, ci in self.items if ri in keep]
        self.cache = cache

    def cleaned_captions(self) -> list[str]:
        """The distinct training captions, cleaned and truncated as items carry them, sorted: what an
        objective prepares once before training (LAIP's noun phrases, MeFa's rewrites, IRRA's MLM support)."""
        return sorted({clean_caption(c, self.max_words) for r in self.records for c in r.captions})

    @property
    def num_identities(self) -> int:
        return len(self.pid_index)

    def item_pids(self) -> list[int]:
        """Contiguous person index of every item (for the P x K sampler)."""
        return [self.pid_index[self.records[ri].pid] for ri, _ in self.items]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def decode(self, ri: int) -> torch.Tensor:
        """(3, H, W) float image in [0, 1] of record ``ri``, from the cache when there is one
        (raises OSError/ValueError/SyntaxError for a file that cannot be decoded)."""
        from torchvision.transforms.functional import pil_to_tensor

        if self.cache is not None:
            return self.cache[ri].float().div_(255.0)
        return pil_to_tensor(load_image(self.records[ri].image, self.size)).float().div_(255.0)

    def record_image(self, ri: int) -> torch.Tensor:
        """:meth:`decode`, or a black image if the file cannot be read."""
        try:
            return self.decode(ri)
        except (OSError, ValueError, SyntaxError):
            return torch.zeros(3, *self.size)

    def _load(self, index: int):
        """-> (record index, caption index, (3, H, W) float image in [0, 1])."""
        # A file that passed the header check can still fail to decode: report it once, use a neighbour.
        for step in range(len(self.items)):
            ri, ci = self.items[(index + step) % len(self.items)]
            try:
                return ri, ci, self.decode(ri)
            except (OSError, ValueError, SyntaxError) as e:
                image = str(self.records[ri].image)
                if image not in self._failed:
                    self._failed.add(image)
                    print(f"tbps: warning: skipping unreadable image {image}: {e}", file=sys.stderr)
        raise RuntimeError("no readable image in the training set")

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """The items at ``indices`` (what a DataLoader asks for a batch at a time): each item's
        randomness is drawn on its own, as a function of (seed, epoch, index), and the images of
        the whole batch are then augmented together (``PoolAugment.apply``)."""
        # torchvision draws from torch's global CPU RNG: seed it per sample. In a worker process
        # that RNG is the worker's own; in the main process, fork it so dropout is undisturbed.
        # Only the CPU generator: torch.manual_seed would also seed (or, before CUDA starts, queue
        # with a captured stack trace) every accelerator's, 8 ms a sample, a quarter of a CPU step.
        # On one torch thread (a DataLoader worker has one already): a batch's augmentation is many ops
        # on a few MB; split over the training's threads, each op pays more to wake them than it gains,
        # and with OpenMP's passive waits (the ``tbps`` command's) much more.
        in_worker = torch.utils.data.get_worker_info() is not None
        with torch_threads(1):
            return self._items(indices, fork=not in_worker and self.pool is not None)

    def _items(self, indices: Sequence[int], fork: bool) -> list[dict]:
        items, images, plans, slots = [], [], [], []
        with torch.random.fork_rng(devices=[]) if fork else contextlib.nullcontext():
            for index in indices:
                ri, ci, img = self._load(index)
                rec = self.records[ri]
                rng = random.Random(_sample_seed(self.seed, self.epoch, index))
                caption = rec.captions[ci]
                if self.text_augment:
                    bt = rec.captions_bt[ci] if rec.captions_bt else None
                    caption = augment_caption(
                        caption,
                        bt,
                        rng,
                        backtranslation_prob=self.text_augment.backtranslation_prob,
                        deletion_prob=self.text_augment.deletion_prob,
                    )
                item = {"caption": clean_caption(caption, self.max_words), "pid": self.pid_index[rec.pid]}
                items.append(item)
                views = {"image": img}
                if self.negatives is not None:
                    row = self.negatives[ri].tolist()
                    views["neg_image"] = self.record_image(row[rng.randrange(len(row))])
                if self.pool is None:
                    item.update((key, normalize(x, self.mean, self.std)) for key, x in views.items())
                    continue
                if self.augment.mvs:
                    views["image_view2"] = img
                torch.default_generator.manual_seed(rng.getrandbits(63))
                for key, x in views.items():  # image, neg_image, image_view2: the order they draw in
                    images.append(x)
                    plans.append(self.pool.plan(rng))
                    slots.append((item, key))
                if self.strong is not None:
                    item["ss_view1"] = self.strong(img)
                    item["ss_view2"] = self.strong(img)
        if images:
            for (item, key), x in zip(slots, self.pool.apply(torch.stack(images), plans)):
                item[key] = x
        return items


# Captions a token cache holds at most (a row of context_length ids each: 80 MB at 131,072 x 77).
TOKEN_CACHE_LIMIT = 1 << 17


@dataclass
class Collate:
    """Stack tensors and tokenise captions: a list of items -> a batch dict."""

    tokenizer: object
    # Optional callable (batch, tokenizer) -> batch adding derived inputs (e.g. masked tokens
    # for a fusion encoder, tbps.data.masking.FusionBatchHook); runs in the workers.
    hook: object = None
    # Optional caption -> token row dict, kept by the caller across epochs: captions come back every
    # epoch (unless text augmentation rewrites them; CLIP's tokenizer then reuses its words' ids:
    # tbps.models.clip_bpe). Every tokenizer here pads each caption to the context length on its own,
    # so a cached row equals a fresh one.
    cache: dict | None = None

    def tokens(self, captions: list[str]) -> torch.Tensor:
        """(B, context_length) token ids of ``captions``, tokenising only those not in the cache."""
        if self.cache is None:
            return self.tokenizer(captions)
        new = list(dict.fromkeys(c for c in captions if c not in self.cache))
        fresh = dict(zip(new, self.tokenizer(new))) if new else {}
        if len(self.cache) + len(fresh) <= TOKEN_CACHE_LIMIT:
            self.cache.update(fresh)
        return torch.stack([self.cache[c] if c in self.cache else fresh[c] for c in captions])

    def __call__(self, items: list[dict]) -> dict:
        batch = {"tokens": self.tokens([it["caption"] for it in items]), "pid": torch.tensor([it["pid"] for it in items])}
        for key in items[0]:
            if key not in ("caption", "pid"):
                batch[key] = torch.stack([it[key] for it in items])
        batch["captions"] = [it["caption"] for it in items]
        if self.hook is not None:
            batch = self.hook(batch, self.tokenizer)
        return batch


class GalleryImages(Dataset):
    """Unique test images with the eval transform; yields (tensor, index)."""

    def __init__(self, paths: Sequence, image_size: tuple[int, int], mean, std, **resize):
        self.paths = list(paths)
        self.size, self.mean, self.std = tuple(image_size), tuple(mean), tuple(std)
        self.resize = resize  # eval_transform's resize / interpolation (a converted model's own)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from tbps.data.images import open_image

        return eval_transform(open_image(self.paths[i]), self.size, self.mean, self.std, **self.resize), i


def eval_split(records: Sequence[Record]) -> tuple[list, list[int], list[str], list[int]]:
    """Gallery (image paths, raw ids) and queries (captions, raw ids) of an evaluation split."""
    image_paths, image_ids, captions, caption_ids = [], [], [], []
    for r in records:
        image_paths.append(r.image)
        image_ids.append(r.pid)
        for c in r.captions:
            captions.append(c)
            caption_ids.append(r.pid)
    return image_paths, image_ids, captions, caption_ids
