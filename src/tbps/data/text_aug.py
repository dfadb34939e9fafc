"""Caption augmentation (TBPS-CLIP): back-translation swap and EDA random word deletion."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class TextAugmentConfig:
    """Caption augmentation settings (``data.text_augment`` in a recipe)."""

    backtranslation_prob: float = 0.1
    deletion_prob: float = 0.05


def random_deletion(caption: str, p: float, rng: random.Random) -> str:
    """Drop each word with probability ``p`` (EDA); never returns an empty caption."""
    words = caption.split()
    if p <= 0 or len(words) <= 1:
        return caption
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept) if kept else rng.choice(words)


def augment_caption(
    caption: str,
    backtranslation: str | None,
    rng: random.Random,
    *,
    backtranslation_prob: float = 0.1,
    deletion_prob: float = 0.05,
) -> str:
    """Swap in the back-translated paraphrase with ``backtranslation_prob``, then delete words."""
    if backtranslation and rng.random() < backtranslation_prob:
        caption = backtranslation
    return random_deletion(caption, deletion_prob, rng)
