"""What goes into an index: the image files of a folder and the typed columns of a metadata CSV.

Nothing here opens an image or touches an index; ``tbps.index.embed`` decodes the files and
``tbps.index.build`` decides which of them to embed.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pathlib
import re
import stat
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from tbps.index.errors import IndexInputError
from tbps.index.store import BUILTIN_COLUMNS, INTERNAL_COLUMNS

# Names accepted for the CSV column that gives the image path relative to the images dir.
CSV_PATH_COLUMNS = ("path", "image", "file", "filename", "image_path", "relpath")
_INT = re.compile(r"^[-+]?(0|[1-9]\d*)$")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass
class ImageFile:
    """One candidate image, as found on disk (its content is not read)."""

    path: str  # absolute, resolved
    relpath: str  # posix path relative to the images dir
    size: int
    mtime_ns: int


@dataclass
class CsvMetadata:
    """A metadata CSV, typed: what ``read_metadata_csv`` returns."""

    columns: list[str]  # normalised CSV column names (without the path column)
    types: dict[str, str]  # column -> "INTEGER" | "REAL" | "TEXT"
    rows: dict[str, dict[str, Any]]  # relpath -> {column: value}


def scan_images(images_dir, recursive: bool = False, exclude: Iterable[str] = (),
                unreadable: list[dict] | None = None) -> list[ImageFile]:
    """Regular, non-hidden files in ``images_dir`` (sorted); every one is tried as an image,
    so non-images are reported rather than silently ignored. ``exclude``: absolute paths
    (files or directories, e.g. the index itself or the metadata CSV) to leave out.
    unreadable: a list that gets ``{"path", "reason"}`` for each subfolder that cannot be
    listed (``os.walk`` would skip it without a word); an unreadable ``images_dir`` itself
    is an ``IndexInputError``."""
    root = pathlib.Path(images_dir).expanduser()
    if not root.exists():
        raise IndexInputError(f"image directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise IndexInputError(f"{str(root)!r} is not a directory")
    root = root.resolve()
    excl = {str(pathlib.Path(e).resolve()) for e in exclude}
    out: list[ImageFile] = []
    try:
        top = os.listdir(root)
    except OSError as e:
        raise IndexInputError(f"cannot read image directory {str(root)!r}: {e.strerror or e}") from None

    def report(err: OSError) -> None:
        if unreadable is not None:
            unreadable.append({"path": str(err.filename), "reason": f"unreadable folder ({err.strerror or err})"})

    walker = os.walk(root, onerror=report) if recursive else [(str(root), [], top)]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.join(dirpath, d) not in excl
        )
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if name.startswith(".") or p in excl:
                continue
            st = _regular_stat(p)
            if st is not None:
                out.append(ImageFile(p, pathlib.Path(p).relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    out.sort(key=lambda f: f.path)
    return out


def _regular_stat(path: str) -> os.stat_result | None:
    """``os.stat`` of a regular file; None for anything else, a vanished file or a dangling link."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def sha256_file(path: str) -> str | None:
    """Hex SHA-256 of a file's content, read in 1 MiB blocks; None if it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def normalise_column(name: str) -> str:
    """A metadata column name as stored: lower_snake_case, never starting with a digit."""
    n = re.sub(r"[^0-9A-Za-z_]+", "_", name.strip()).strip("_").lower()
    if n and n[0].isdigit():
        n = "c_" + n
    return n


def is_reserved_column(name: str) -> bool:
    """True for the names of built-in and internal columns, which metadata may not reuse."""
    return name in BUILTIN_COLUMNS or name in INTERNAL_COLUMNS


def infer_type(values: list[str]) -> str:
    """SQL type of a column from its text cells: INTEGER, REAL or TEXT (empty cells ignored)."""
    vals = [v for v in values if v != ""]
    if vals and all(_INT.match(v) for v in vals):
        # SQLite integers are 64-bit: a longer one (an id of 20+ digits) is kept exactly, as text
        return "INTEGER" if all(_fits_int64(v) for v in vals) else "TEXT"
    try:
        if vals and all(np.isfinite(float(v)) for v in vals):
            return "REAL"
    except ValueError:
        pass
    return "TEXT"


def _fits_int64(v: str) -> bool:
    return len(v.lstrip("+-")) <= 19 and _INT64_MIN <= int(v) <= _INT64_MAX  # no int() of 5000 digits


def _convert(v: str, typ: str) -> Any:
    if v == "":
        return None
    return int(v) if typ == "INTEGER" else float(v) if typ == "REAL" else v


def read_metadata_csv(csv_path, images_dir) -> CsvMetadata:
    """Read the per-image metadata CSV.

    The file has a header row. One column gives the image path relative to ``images_dir``
    (named ``path``, ``image``, ``file``, ``filename``, ``image_path`` or ``relpath``); every
    other column (camera, time, person id, ...) becomes a metadata column usable in search
    filters. Column names are normalised to lower_snake_case ("Person ID" -> ``person_id``).
    A column whose non-empty values are all integers is stored as INTEGER, all numbers as
    REAL, otherwise TEXT (so ``time >= '2024-01-01'`` compares ISO dates as text). Empty
    cells are NULL.
    """
    path = pathlib.Path(csv_path).expanduser()
    if not path.is_file():
        raise IndexInputError(f"metadata CSV {str(path)!r} does not exist")
    root = pathlib.Path(images_dir).expanduser().resolve()
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise IndexInputError(f"metadata CSV {str(path)!r} is empty (it needs a header row)")
            path_col, cols = _header_columns(path, header)
            raw = _read_rows(path, reader, header, path_col, cols, root)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise IndexInputError(f"cannot read metadata CSV {str(path)!r}: {e}") from e
    col_names = [n for _, n in cols]
    types = {n: infer_type([v[j] for v in raw.values()]) for j, n in enumerate(col_names)}
    rows = {
        rel: {n: _convert(v[j], types[n]) for j, n in enumerate(col_names)} for rel, v in raw.items()
    }
    return CsvMetadata(col_names, types, rows)


def _header_columns(path: pathlib.Path, header: list[str]) -> tuple[int, list[tuple[int, str]]]:
    """(index of the path column, [(index, normalised name)] of the metadata columns)."""
    names = [normalise_column(h) for h in header]
    try:
        path_col = next(i for i, n in enumerate(names) if n in CSV_PATH_COLUMNS)
    except StopIteration:
        raise IndexInputError(
            f"metadata CSV {str(path)!r} has no image path column; name one of: "
            + ", ".join(CSV_PATH_COLUMNS) + f" (header is {header})"
        ) from None
    cols = [(i, n) for i, n in enumerate(names) if i != path_col]
    seen: set[str] = set()
    for i, n in cols:
        if not n:
            raise IndexInputError(f"metadata CSV {str(path)!r}: column {i + 1} has an empty name")
        if is_reserved_column(n):
            raise IndexInputError(
                f"metadata CSV {str(path)!r}: column {header[i]!r} clashes with a built-in "
                f"column ({', '.join(BUILTIN_COLUMNS)}); rename it"
            )
        if n in seen:
            raise IndexInputError(f"metadata CSV {str(path)!r}: duplicate column {n!r}")
        seen.add(n)
    return path_col, cols


def _read_rows(path: pathlib.Path, reader, header: list[str], path_col: int, cols: list[tuple[int, str]],
               root: pathlib.Path) -> dict[str, list[str]]:
    """The CSV's data rows as ``{relpath: [stripped cells of the metadata columns]}``."""
    raw: dict[str, list[str]] = {}
    for lineno, rec in enumerate(reader, start=2):
        if not rec or all(not c.strip() for c in rec):
            continue
        where = f"metadata CSV {str(path)!r} line {lineno}"
        if len(rec) != len(header):
            raise IndexInputError(f"{where}: {len(rec)} fields, header has {len(header)}")
        rel = rec[path_col].strip()
        if os.path.isabs(rel):
            try:
                rel = pathlib.Path(rel).resolve().relative_to(root).as_posix()
            except ValueError:
                raise IndexInputError(f"{where}: {rel!r} is not inside {str(root)!r}") from None
        rel = _norm_relpath(rel)
        if not rel:
            raise IndexInputError(f"{where}: empty image path")
        if rel in raw:
            raise IndexInputError(f"{where}: duplicate row for {rel!r}")
        raw[rel] = [rec[i].strip() for i, _ in cols]
    return raw


def _norm_relpath(p: str) -> str:
    p = p.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return pathlib.PurePosixPath(p).as_posix() if p else p


def require_files(files, where, recursive: bool = True) -> None:
    """Refuse an empty gallery (a folder, or a list file, with no image) before anything is written."""
    if not files:
        raise IndexInputError(f"no files in {str(where)!r}" + ("" if recursive else " (add --recursive to "
                              "scan subfolders)") + "; an index needs at least one image")
