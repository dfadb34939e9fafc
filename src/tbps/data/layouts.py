"""Annotation adapters: one per public dataset layout, all producing ``Record``s.

Layouts (``docs/data.md`` shows each with a folder tree and an example record):

=============  ==========================================  ==============  ==================
name           annotation file(s) in the dataset root       image key       images relative to
=============  ==========================================  ==============  ==================
cuhk-pedes     ``reid_raw.json``                            ``file_path``   ``imgs/``
icfg-pedes     ``ICFG-PEDES.json`` or ``ICFG_PEDES.json``   ``file_path``   ``imgs/``
rstpreid       ``data_captions.json``                       ``img_path``    ``imgs/``
tbps-clip      ``train_reid.json``, ``test_reid.json``      ``file_path``   ``imgs/``
               (optional ``val_reid.json``)
jsonl          ``annotations.jsonl`` (one object a line)    ``image``       the root itself
=============  ==========================================  ==============  ==================

The three public layouts and TBPS-CLIP's bundle keep images under ``imgs/`` as
IRRA's and TBPS-CLIP's loaders expect; ``image_root=`` overrides that folder.

Entry points: ``detect_layout(root)`` and ``load_annotations(root, layout=None, ...)``.
Every problem with an annotation file is a ``DataError`` naming the file, the
record (index, or line for JSONL) and the key; missing or unreadable images are
dropped with one summary warning, or raise with ``strict=True``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

from tbps.data.records import SPLITS, Annotations, DataError, DataWarning, Record

# Above this many distinct images, `progress=True` shows a bar while checking them.
PROGRESS_MIN_IMAGES = 500
# How many skipped images the summary warning names.
WARN_FIRST = 5


class Adapter(Protocol):
    """What ``LAYOUTS`` holds: a layout that can recognise and read a dataset folder."""

    name: str

    def detect(self, root: Path) -> bool:
        """True if ``root`` holds this layout's annotation file(s)."""

    def load(self, root: Path, image_root: Path | None = None) -> list[Record]:
        """Read every record; DataError on any problem in the annotation file(s)."""

    def looks_for(self) -> str:
        """The file(s) ``detect`` looks for, for error messages."""


# A record paired with where it came from ("<file>, record 3"), for messages about its image.
_Located = tuple[Record, str]


# ---------------------------------------------------------------------------------------------
# Shared parsing helpers: every adapter goes through these, parameterised by key names.


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark from Windows editors
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): is this really the annotation file?") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read annotation file: {e.strerror or e}") from None


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        lineno = e.lineno if line is None else line
        raise DataError(f"{path}: invalid JSON at line {lineno}, column {e.colno}: {e.msg}") from None


def _read_json_list(path: Path) -> list:
    data = _parse_json(_read_text(path), path)
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of records at the top level, got {_kind(data)}"
        )
    return data


def _kind(value: Any) -> str:
    """A JSON-ish name for a value's type, for messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _field(raw: dict, key: str, where: str) -> Any:
    if key not in raw:
        keys = ", ".join(sorted(map(str, raw))) or "none"
        raise DataError(f"{where}: missing field {key!r} (fields present: {keys})")
    return raw[key]


def _text_list(value: Any, key: str, where: str, allow_empty_items: bool = False) -> tuple[str, ...]:
    """A non-empty list of non-empty strings (``allow_empty_items`` lets items be "")."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} must be a list of strings, got {_kind(value)}")
    if not value:
        raise DataError(f"{where}: field {key!r} is an empty list (each image needs at least one caption)")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(f"{where}: field {key!r}[{i}] must be a string, got {_kind(item)}")
        if not allow_empty_items and not item.strip():
            raise DataError(f"{where}: field {key!r}[{i}] is an empty caption")
    return tuple(value)


def _pid(raw: dict, key: str, where: str) -> int:
    value = _field(raw, key, where)
    # bool is an int subclass in Python; `true` is never a person id.
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: field {key!r} must be an integer person id, got {_kind(value)} {value!r}")
    return value


def _split(value: Any, key: str, where: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise DataError(f"{where}: field {key!r} is {value!r}, expected one of {', '.join(allowed)}")
    return value


def _image_path(raw: dict, key: str, base: Path, where: str) -> Path:
    value = _field(raw, key, where)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty relative image path, got {value!r}")
    # abspath normalises "a/../b" without resolving symlinks (a dataset may be a farm of links).
    return Path(os.path.abspath(base / value))


def _make_record(
    raw: Any,
    where: str,
    *,
    base: Path,
    image_key: str,
    split: str | None,
    caption_keys: tuple[str, ...] = ("captions",),
) -> _Located:
    """Build one Record from one annotation object.

    split: the split for every record of the file (TBPS-CLIP bundle), or None to read
           the record's own ``split`` field.
    caption_keys: accepted caption fields, first present wins; a key other than
           ``captions`` may hold a single string (JSONL ``caption``).
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with fields, got {_kind(raw)}")
    image = _image_path(raw, image_key, base, where)
    where = f"{where} ({image_key}={raw[image_key]!r})"
    pid = _pid(raw, "id", where)
    if split is None:
        split = _split(_field(raw, "split", where), "split", where, SPLITS)

    key = next((k for k in caption_keys if k in raw), caption_keys[0])
    value = _field(raw, key, where)
    if key != "captions" and isinstance(value, str):
        value = [value]
    captions = _text_list(value, key, where)

    captions_bt = None
    if "captions_bt" in raw:
        bt = _text_list(raw["captions_bt"], "captions_bt", where, allow_empty_items=True)
        if len(bt) != len(captions):
            raise DataError(
                f"{where}: field 'captions_bt' has {len(bt)} entries for {len(captions)} captions "
                "(one back-translation per caption)"
            )
        # An empty back-translation means "none available": fall back to the caption itself.
        captions_bt = tuple(b if b.strip() else c for b, c in zip(bt, captions))
    return Record(image=image, captions=captions, pid=pid, split=split, captions_bt=captions_bt), where


# ---------------------------------------------------------------------------------------------
# The adapters.


@dataclass(frozen=True)
class JsonListLayout:
    """A single JSON list of records, each naming its own split (CUHK-PEDES, ICFG-PEDES, RSTPReid)."""

    name: str
    files: tuple[str, ...]  # accepted annotation file names, in order of preference
    image_key: str
    image_dir: str = "imgs"

    def annotation_files(self, root: Path) -> list[Path]:
        return [root / f for f in self.files if (root / f).is_file()]

    def detect(self, root: Path) -> bool:
        return bool(self.annotation_files(Path(root)))

    def looks_for(self) -> str:
        return " or ".join(self.files)

    def load(self, root: Path, image_root: Path | None = None) -> list[Record]:
        return [r for r, _ in self.load_located(Path(root), image_root)]

    def load_located(self, root: Path, image_root: Path | None = None) -> list[_Located]:
        found = self.annotation_files(root)
        if not found:
            raise DataError(f"{root}: no {self.looks_for()} found for layout {self.name!r}")
        path = found[0]
        if len(found) > 1:
            warnings.warn(
                f"{root}: both {' and '.join(p.name for p in found)} exist; reading {path.name}",
                DataWarning,
                stacklevel=3,
            )
        base = Path(image_root) if image_root is not None else root / self.image_dir
        raws = _read_json_list(path)
        if not raws:
            raise DataError(f"{path}: no records (the list is empty)")
        return [
            _make_record(raw, f"{path}, record {i}", base=base, image_key=self.image_key, split=None)
            for i, raw in enumerate(raws)
        ]


@dataclass(frozen=True)
class SplitFilesLayout:
    """One JSON list per split, the split taken from the file name (TBPS-CLIP's bundle).

    TBPS-CLIP reads ``<split>_reid.json`` for "train" and "test" only; a ``val_reid.json``
    is read too when present. Training records may carry ``captions_bt``.
    """

    name: str
    split_files: tuple[tuple[str, str], ...]  # (split, file name)
    required_any: tuple[str, ...]  # detect() needs at least one of these
    image_key: str = "file_path"
    image_dir: str = "imgs"

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for _, f in self.split_files)

    def detect(self, root: Path) -> bool:
        return any((Path(root) / f).is_file() for f in self.required_any)

    def looks_for(self) -> str:
        return " / ".join(self.required_any)

    def load(self, root: Path, image_root: Path | None = None) -> list[Record]:
        return [r for r, _ in self.load_located(Path(root), image_root)]

    def load_located(self, root: Path, image_root: Path | None = None) -> list[_Located]:
        if not self.detect(root):
            raise DataError(f"{root}: no {self.looks_for()} found for layout {self.name!r}")
        base = Path(image_root) if image_root is not None else root / self.image_dir
        out: list[_Located] = []
        for split, fname in self.split_files:
            path = root / fname
            if not path.is_file():
                continue
            out += [
                _make_record(raw, f"{path}, record {i}", base=base, image_key=self.image_key, split=split)
                for i, raw in enumerate(_read_json_list(path))
            ]
        if not out:
            names = ", ".join(f for f in self.files if (root / f).is_file())
            raise DataError(f"{root}: no records in {names} (the lists are empty)")
        return out


@dataclass(frozen=True)
class JsonlLayout:
    """``annotations.jsonl``: one JSON object per line, for anyone's own data.

    Each line: ``{"image": "relative/path.jpg", "captions": ["..."], "id": 7, "split": "train"}``;
    ``"caption": "..."`` (one string) may replace ``captions``; ``captions_bt`` is optional.
    Image paths are relative to the dataset root (or ``image_root``); blank lines are ignored.
    """

    name: str = "jsonl"
    file: str = "annotations.jsonl"
    image_dir: str = ""  # image paths are relative to the root itself

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file,)

    def detect(self, root: Path) -> bool:
        return (Path(root) / self.file).is_file()

    def looks_for(self) -> str:
        return self.file

    def load(self, root: Path, image_root: Path | None = None) -> list[Record]:
        return [r for r, _ in self.load_located(Path(root), image_root)]

    def load_located(self, root: Path, image_root: Path | None = None) -> list[_Located]:
        path = root / self.file
        base = Path(image_root) if image_root is not None else root
        out: list[_Located] = []
        for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            raw = _parse_json(line, path, line=lineno)
            out.append(
                _make_record(raw, f"{path}, line {lineno}", base=base, image_key="image", split=None,
                             caption_keys=("captions", "caption"))
            )
        if not out:
            raise DataError(f"{path}: no records (the file is empty)")
        return out


LAYOUTS: dict[str, Adapter] = {
    "cuhk-pedes": JsonListLayout("cuhk-pedes", ("reid_raw.json",), "file_path"),
    "icfg-pedes": JsonListLayout("icfg-pedes", ("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path"),
    "rstpreid": JsonListLayout("rstpreid", ("data_captions.json",), "img_path"),
    "tbps-clip": SplitFilesLayout(
        "tbps-clip",
        split_files=(("train", "train_reid.json"), ("val", "val_reid.json"), ("test", "test_reid.json")),
        required_any=("train_reid.json", "test_reid.json"),
    ),
    "jsonl": JsonlLayout(),
}

# Other spellings accepted for `layout=` / `--layout` (after lower-casing and "_" -> "-").
ALIASES = {"cuhk": "cuhk-pedes", "cuhkpedes": "cuhk-pedes", "icfg": "icfg-pedes", "icfgpedes": "icfg-pedes",
           "rstp": "rstpreid", "rstp-reid": "rstpreid", "tbpsclip": "tbps-clip"}


# ---------------------------------------------------------------------------------------------
# Entry points.


def _layout_name(layout: str) -> str:
    key = str(layout).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in LAYOUTS:
        raise DataError(f"unknown dataset layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    return key


def _existing_root(root: str | os.PathLike) -> tuple[Path, str | None]:
    """The dataset folder, and a layout implied when the user named an annotation file itself."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"dataset folder {path} does not exist")
    if path.is_dir():
        return Path(os.path.abspath(path)), None
    for name, adapter in LAYOUTS.items():
        if path.name in getattr(adapter, "files", ()):
            return Path(os.path.abspath(path.parent)), name
    raise DataError(f"{path} is a file, not a dataset folder (and not a known annotation file name)")


def detect_layout(root: str | os.PathLike) -> str:
    """The name of the one layout whose annotation file(s) ``root`` holds.

    DataError if ``root`` is missing, if no layout matches (the message lists what
    was looked for, and subfolders that would match), or if several match.
    """
    path, implied = _existing_root(root)
    if implied is not None:
        return implied
    found = [name for name, adapter in LAYOUTS.items() if adapter.detect(path)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DataError(
            f"{path}: ambiguous dataset layout, matches {', '.join(found)}; "
            f"choose one with layout= (--layout {found[0]})"
        )
    wanted = "; ".join(f"{a.looks_for()} ({name})" for name, a in LAYOUTS.items())
    msg = f"{path}: no known dataset layout; looked for {wanted}"
    hints = [
        f"{sub.name}/ ({name})"
        for sub in sorted(p for p in path.iterdir() if p.is_dir())
        for name, a in LAYOUTS.items()
        if a.detect(sub)
    ]
    if hints:
        msg += f". Subfolders that hold a dataset: {', '.join(hints[:5])}"
    raise DataError(msg)


def check_image(path: Path) -> str | None:
    """None if ``path`` is a file whose header PIL recognises, else the reason it is not.

    Only the header is read (``Image.open`` is lazy), so this is fast but does not catch
    an image truncated after its header.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError:
        return "missing"
    except IsADirectoryError:
        return "is a directory"
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except Image.DecompressionBombError as e:
        return f"too large: {e}"
    except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: PIL's way of saying "broken header"
        return f"unreadable: {e}"
    if width <= 0 or height <= 0:
        return f"empty image ({width}x{height})"
    return None


def _check_images(
    located: list[_Located], strict: bool, progress: bool
) -> tuple[list[_Located], list[tuple[str, str]]]:
    """Drop records whose image is missing or unreadable; (kept, skipped (path, reason))."""
    unique = list(dict.fromkeys(r.image for r, _ in located))  # each file opened once
    items: Iterable[Path] = unique
    if progress and len(unique) >= PROGRESS_MIN_IMAGES:
        from tqdm import tqdm

        items = tqdm(unique, desc="checking images", unit="img")
    bad: dict[Path, str] = {}
    first_user: dict[Path, str] = {}  # image -> the first record naming it, for strict errors
    if strict:
        for r, where in located:
            first_user.setdefault(r.image, where)
    with warnings.catch_warnings():
        # PIL warns about e.g. corrupt EXIF while reading headers; the summary below is what counts.
        warnings.simplefilter("ignore")
        for path in items:
            reason = check_image(path)
            if reason is None:
                continue
            if strict:
                raise DataError(f"{first_user[path]}: image {path}: {reason}")
            bad[path] = reason
    kept = [(r, w) for r, w in located if r.image not in bad]
    return kept, [(str(p), why) for p, why in bad.items()]


def load_annotations(
    root: str | os.PathLike,
    layout: str | None = None,
    *,
    strict: bool = False,
    check_images: bool = True,
    progress: bool = False,
    image_root: str | os.PathLike | None = None,
) -> Annotations:
    """Read the dataset at ``root`` into ``Annotations``.

    root:         the dataset folder (or its annotation file, e.g. ``.../reid_raw.json``).
    layout:       one of ``LAYOUTS`` (e.g. "cuhk-pedes"); None detects it.
    strict:       raise DataError on the first missing/unreadable image instead of
                  skipping it.
    check_images: open each image's header with PIL; skipped images are listed in
                  ``Annotations.skipped`` and summarised in one DataWarning.
    progress:     show a bar while checking images (only when there are many).
    image_root:   folder the annotation's image paths are relative to, when not the
                  layout's own (``imgs/``, or the root for JSONL); e.g. TBPS-CLIP's json
                  bundle kept apart from the images.

    A broken annotation file is always a DataError, whatever ``strict`` says.
    """
    path, implied = _existing_root(root)
    name = _layout_name(layout) if layout is not None else (implied or detect_layout(path))
    adapter = LAYOUTS[name]
    image_base = None if image_root is None else Path(os.path.abspath(Path(image_root).expanduser()))
    if image_base is not None and not image_base.is_dir():
        raise DataError(f"image folder {image_base} does not exist")

    if hasattr(adapter, "load_located"):
        located = adapter.load_located(path, image_base)
    else:  # a third-party adapter with only the Protocol's load()
        located = [(r, f"{path} ({name}), record {i}") for i, r in enumerate(adapter.load(path, image_base))]

    if not located:
        raise DataError(f"{path} ({name}): the annotation file(s) hold no records")
    skipped: list[tuple[str, str]] = []
    if check_images:
        default_dir = getattr(adapter, "image_dir", None)
        if image_base is None and default_dir and not (path / default_dir).is_dir():
            raise DataError(
                f"{path}: image folder {path / default_dir} does not exist "
                f"(layout {name!r} keeps images under {default_dir}/; pass image_root= / --image-root otherwise)"
            )
        n_images = len({r.image for r, _ in located})
        located, skipped = _check_images(located, strict, progress)
        if skipped:
            if not located:
                raise DataError(
                    f"{path} ({name}): none of the {n_images} images could be read; first: "
                    f"{skipped[0][0]} ({skipped[0][1]})"
                )
            shown = ", ".join(f"{p} ({why})" for p, why in skipped[:WARN_FIRST])
            more = f" and {len(skipped) - WARN_FIRST} more" if len(skipped) > WARN_FIRST else ""
            warnings.warn(
                f"{path} ({name}): skipped {len(skipped)} of {n_images} images (missing or unreadable): "
                f"{shown}{more}. Pass strict=True (--strict) to stop at the first one.",
                DataWarning,
                stacklevel=2,
            )
    return Annotations(root=path, layout=name, records=[r for r, _ in located], skipped=skipped)
