"""The records every annotation layout is read into, and the data errors.

One ``Record`` is one image with its captions, whatever layout it came from
(see ``tbps.data.layouts``). ``Annotations`` is the whole dataset as loaded:
records of every split plus the images that were dropped because they were
missing or unreadable.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

# The split names a record may carry, in the order they are listed.
SPLITS = ("train", "val", "test")


class DataError(Exception):
    """A dataset the user pointed at cannot be read as asked.

    The message names the file and, where relevant, the record (index or line)
    and the offending key, so it can be fixed without a debugger.
    """

    user_error = True  # tbps.cli.main prints "tbps: error: <message>" and exits 2


class DataWarning(UserWarning):
    """Something in a dataset was dropped or ignored (e.g. missing images)."""


@dataclass(frozen=True)
class Record:
    """One image and its captions.

    image:       absolute path of the image file.
    captions:    raw captions (at least one), as in the annotation file.
    pid:         raw person id from the annotation (not remapped; CUHK-PEDES starts at 1).
    split:       "train", "val" or "test".
    captions_bt: back-translated paraphrases aligned one-to-one with ``captions``
                 (TBPS-CLIP bundle), else None.
    """

    image: pathlib.Path
    captions: tuple[str, ...]
    pid: int
    split: str
    captions_bt: tuple[str, ...] | None = None

    def __post_init__(self):
        # Accept lists from callers that build records by hand (synthetic data, tests).
        if not isinstance(self.image, pathlib.Path):
            object.__setattr__(self, "image", pathlib.Path(self.image))
        if not isinstance(self.captions, tuple):
            object.__setattr__(self, "captions", tuple(self.captions))
        if self.captions_bt is not None and not isinstance(self.captions_bt, tuple):
            object.__setattr__(self, "captions_bt", tuple(self.captions_bt))
        if not self.captions:
            raise ValueError(f"Record for {self.image} has no captions")
        if self.split not in SPLITS:
            raise ValueError(f"Record for {self.image}: split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.captions_bt is not None and len(self.captions_bt) != len(self.captions):
            raise ValueError(
                f"Record for {self.image}: {len(self.captions_bt)} back-translations "
                f"for {len(self.captions)} captions"
            )


@dataclass
class Annotations:
    """A loaded dataset: records of all splits, and the images skipped while loading.

    root:    the dataset folder.
    layout:  "cuhk-pedes" | "icfg-pedes" | "rstpreid" | "tbps-clip" | "jsonl".
    records: every kept record, in file order.
    skipped: (image path, reason) for each image dropped as missing or unreadable
             (only when loaded with ``strict=False``).
    """

    root: pathlib.Path
    layout: str
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def splits(self) -> list[str]:
        """The splits that hold at least one record, in train/val/test order."""
        present = {r.split for r in self.records}
        return [s for s in SPLITS if s in present]

    def split(self, name: str) -> list[Record]:
        """The records of split ``name``; DataError naming the available splits if it has none."""
        records = [r for r in self.records if r.split == name]
        if not records:
            counts = ", ".join(f"{s} ({sum(r.split == s for r in self.records)} images)" for s in self.splits())
            why = "unknown split" if name not in SPLITS else "no records in split"
            raise DataError(
                f"{self.root} ({self.layout}): {why} {name!r}; available: {counts or 'none'}"
            )
        return records

    def __len__(self) -> int:
        return len(self.records)
