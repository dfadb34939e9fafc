"""Writing gallery indexes: ``build_index``, ``add_to_index``, ``remove_from_index``.

Every write makes a new generation (see ``tbps.index.store``): it copies what it keeps
from the current one into new files, fsyncs them, and only then replaces ``manifest.json``
atomically. A writer killed at any moment (kill -9) therefore leaves the index exactly as
it was, or complete; its half-written files are removed by the next write. Writers take an
exclusive ``flock`` on ``INDEX/.lock`` (released by the kernel if the process dies).

Images are decoded and preprocessed in a torch ``DataLoader`` with worker processes, so
decoding overlaps the model's forward pass. Unreadable, corrupt or non-image files are
reported (path and reason) and skipped; they never stop a build.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from tbps.index import ann as ann_mod
from tbps.index.errors import IndexBusyError, IndexFormatError, IndexInputError
from tbps.index.store import (
    BUILTIN_COLUMNS,
    FORMAT,
    MANIFEST,
    VERSION,
    GalleryIndex,
    gen_files,
    read_manifest,
)
from tbps.files import write_json

# Names accepted for the CSV column that gives the image path relative to the images dir.
CSV_PATH_COLUMNS = ("path", "image", "file", "filename", "image_path", "relpath")
_GEN_FILE = re.compile(r"^(features|ids|meta|ann)-(\d+)\.(npy|sqlite|faiss)(-journal|-wal|-shm)?$")
_TEST_HOOK_ENV = "TBPS_INDEX_TEST_HOOK"  # comma-separated hook names at which to stop (tests only)


# --------------------------------------------------------------------------------------
# Scanning the image directory and the metadata CSV
# --------------------------------------------------------------------------------------
@dataclass
class _File:
    path: str  # absolute, resolved
    relpath: str  # posix path relative to the images dir
    size: int
    mtime_ns: int


def scan_images(images_dir, recursive: bool = False, exclude: Iterable[str] = ()) -> list[_File]:
    """Regular, non-hidden files in ``images_dir`` (sorted); every one is tried as an image,
    so non-images are reported rather than silently ignored. ``exclude``: absolute paths
    (files or directories, e.g. the index itself or the metadata CSV) to leave out."""
    root = pathlib.Path(images_dir).expanduser()
    if not root.exists():
        raise IndexInputError(f"image directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise IndexInputError(f"{str(root)!r} is not a directory")
    root = root.resolve()
    excl = {str(pathlib.Path(e).resolve()) for e in exclude}
    out: list[_File] = []
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.join(dirpath, d) not in excl
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = os.path.join(dirpath, name)
            if p in excl:
                continue
            try:
                st = os.stat(p)
            except OSError:
                continue  # vanished or dangling link
            if not _is_regular(st):
                continue
            out.append(_File(p, pathlib.Path(p).relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    out.sort(key=lambda f: f.path)
    return out


def _is_regular(st: os.stat_result) -> bool:
    import stat

    return stat.S_ISREG(st.st_mode)


@dataclass
class _Metadata:
    columns: list[str]  # normalised CSV column names (without the path column)
    types: dict[str, str]  # column -> "INTEGER" | "REAL" | "TEXT"
    rows: dict[str, dict[str, Any]]  # relpath -> {column: value}


def _normalise_column(name: str) -> str:
    n = re.sub(r"[^0-9A-Za-z_]+", "_", name.strip()).strip("_").lower()
    if n and n[0].isdigit():
        n = "c_" + n
    return n


def _norm_relpath(p: str) -> str:
    p = p.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return pathlib.PurePosixPath(p).as_posix() if p else p


def read_metadata_csv(csv_path, images_dir) -> _Metadata:
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
            names = [_normalise_column(h) for h in header]
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
                if n in BUILTIN_COLUMNS or n == "mtime_ns":
                    raise IndexInputError(
                        f"metadata CSV {str(path)!r}: column {header[i]!r} clashes with a built-in "
                        f"column ({', '.join(BUILTIN_COLUMNS)}); rename it"
                    )
                if n in seen:
                    raise IndexInputError(f"metadata CSV {str(path)!r}: duplicate column {n!r}")
                seen.add(n)
            raw: dict[str, list[str]] = {}
            for lineno, rec in enumerate(reader, start=2):
                if not rec or all(not c.strip() for c in rec):
                    continue
                if len(rec) != len(header):
                    raise IndexInputError(
                        f"metadata CSV {str(path)!r} line {lineno}: {len(rec)} fields, header has {len(header)}"
                    )
                rel = rec[path_col].strip()
                if os.path.isabs(rel):
                    try:
                        rel = pathlib.Path(rel).resolve().relative_to(root).as_posix()
                    except ValueError:
                        raise IndexInputError(
                            f"metadata CSV {str(path)!r} line {lineno}: {rel!r} is not inside {str(root)!r}"
                        ) from None
                rel = _norm_relpath(rel)
                if not rel:
                    raise IndexInputError(f"metadata CSV {str(path)!r} line {lineno}: empty image path")
                if rel in raw:
                    raise IndexInputError(f"metadata CSV {str(path)!r} line {lineno}: duplicate row for {rel!r}")
                raw[rel] = [rec[i].strip() for i, _ in cols]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise IndexInputError(f"cannot read metadata CSV {str(path)!r}: {e}") from e
    col_names = [n for _, n in cols]
    types = {n: _infer_type([v[j] for v in raw.values()]) for j, n in enumerate(col_names)}
    rows = {
        rel: {n: _convert(v[j], types[n]) for j, n in enumerate(col_names)} for rel, v in raw.items()
    }
    return _Metadata(col_names, types, rows)


_INT = re.compile(r"^[-+]?(0|[1-9]\d*)$")


def _infer_type(values: list[str]) -> str:
    vals = [v for v in values if v != ""]
    if vals and all(_INT.match(v) for v in vals):
        return "INTEGER"
    try:
        if vals and all(np.isfinite(float(v)) for v in vals):
            return "REAL"
    except ValueError:
        pass
    return "TEXT"


def _convert(v: str, typ: str) -> Any:
    if v == "":
        return None
    return int(v) if typ == "INTEGER" else float(v) if typ == "REAL" else v


# --------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------
def default_workers() -> int:
    """Decoding workers: leave one core for the model's forward pass."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class _ImageReader:
    """torch Dataset over image files: ``(i, pixels (3, H, W) | None, info | None, error | None)``."""

    def __init__(self, paths: Sequence[str], preprocess):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
            sha = hashlib.sha256(data).hexdigest()
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # decode fully here: truncated files fail now, not inside the model
                width, height = im.size
                pixels = self.preprocess(im)
            return i, pixels, {"width": width, "height": height, "sha256": sha}, None
        except Exception as e:  # any unreadable file is reported and skipped
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if type(e).__name__ == "UnidentifiedImageError":
                reason = "not an image (PIL cannot identify the file)"
            return i, None, None, reason


def _collate(batch):
    return batch


def _worker_init(_):
    import torch

    torch.set_num_threads(1)  # workers decode; the main process owns the cores for the model


def embed_files(paths: Sequence[str], encoder, *, batch_size: int = 64, workers: int | None = None,
                progress: bool = True, desc: str = "embedding") -> Iterator[tuple[list[int], np.ndarray, list[dict], list[tuple[int, str]]]]:
    """Embed images in batches; yields ``(indices, feats (B, D), infos, failures)`` per batch.

    ``indices`` index into ``paths``; ``failures`` are ``(index, reason)`` for skipped files.
    """
    import torch
    from torch.utils.data import DataLoader

    if batch_size <= 0:
        raise IndexInputError(f"batch size must be positive, got {batch_size}")
    workers = default_workers() if workers is None else int(workers)
    if not paths:
        return
    loader = DataLoader(
        _ImageReader(paths, encoder.preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )
    from tqdm import tqdm

    dim = int(encoder.embed_dim)
    bar = tqdm(total=len(paths), unit="img", desc=desc, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for batch in loader:
            good = [b for b in batch if b[1] is not None]
            failures = [(b[0], b[3]) for b in batch if b[1] is None]
            if good:
                with torch.inference_mode():
                    feats = encoder.encode_images(torch.stack([b[1] for b in good]))
                feats = np.asarray(feats, dtype=np.float32)
                if feats.shape != (len(good), dim):
                    raise RuntimeError(f"encoder returned features of shape {feats.shape}, expected {(len(good), dim)}")
                # Guard against non-normalised output: the index stores unit vectors.
                norms = np.linalg.norm(feats, axis=1, keepdims=True)
                feats = feats / np.maximum(norms, 1e-12)
            else:
                feats = np.zeros((0, dim), dtype=np.float32)
            yield [b[0] for b in good], feats, [b[2] for b in good], failures
            bar.update(len(batch))
            _test_hook("embedding")
    finally:
        bar.close()


def _test_hook(name: str) -> None:
    """Tests stop a writer at a named point (env TBPS_INDEX_TEST_HOOK) to kill it there."""
    hooks = os.environ.get(_TEST_HOOK_ENV, "")
    if hooks and name in hooks.split(","):
        print(f"tbps-index-hook {name}", file=sys.stderr, flush=True)
        time.sleep(3600)


# --------------------------------------------------------------------------------------
# Generations: lock, cleanup, commit
# --------------------------------------------------------------------------------------
class _Writer:
    """Exclusive writer of one index directory; knows the current and the next generation."""

    def __init__(self, root: pathlib.Path, *, create: bool):
        self.root = root
        if create:
            root.mkdir(parents=True, exist_ok=True)
        elif not root.is_dir():
            read_manifest(root)  # raises the precise error
        self.lock_fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            raise IndexBusyError(f"another tbps process is writing index {str(root)!r}; try again when it ends") from None
        self.prev = read_manifest(root) if (root / MANIFEST).exists() else None
        self.gen = int(self.prev["generation"]) + 1 if self.prev else 1
        keep = {int(self.prev["generation"])} if self.prev else set()
        self.cleanup(keep | {g - 1 for g in keep})

    def cleanup(self, keep_gens: set[int]) -> None:
        """Remove generation files not in ``keep_gens`` and leftover temp files."""
        for name in os.listdir(self.root):
            m = _GEN_FILE.match(name)
            stale = (m and int(m.group(2)) not in keep_gens) or (name.startswith(".") and name.endswith(".tmp"))
            if stale:
                with contextlib.suppress(OSError):
                    os.unlink(self.root / name)

    def path(self, kind: str, with_ann: bool = True) -> pathlib.Path:
        return self.root / gen_files(self.gen, with_ann)[kind]

    def commit(self, manifest: dict) -> None:
        """Publish generation ``self.gen``: fsync its files, then replace the manifest."""
        for name in manifest["files"].values():
            if name:
                _fsync_file(self.root / name)
        _fsync_dir(self.root)
        _test_hook("before-manifest")
        write_json(self.root / MANIFEST, manifest)
        _fsync_dir(self.root)
        self.cleanup({self.gen, self.gen - 1})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            os.close(self.lock_fd)

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_file(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        _fsync_file(path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _create_db(path: pathlib.Path, meta: _Metadata | None) -> sqlite3.Connection:
    if path.exists():
        path.unlink()
    db = sqlite3.connect(path)
    extra = "".join(f', "{c}" {meta.types[c]}' for c in meta.columns) if meta else ""
    db.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, relpath TEXT, "
        "size INTEGER, mtime REAL, sha256 TEXT, width INTEGER, height INTEGER, mtime_ns INTEGER"
        f"{extra})"
    )
    return db


def _ensure_csv_columns(db: sqlite3.Connection, meta: _Metadata, existing: list[str]) -> list[str]:
    """ALTER TABLE to add CSV columns the index does not have yet; returns all CSV columns."""
    cols = list(existing)
    for c in meta.columns:
        if c not in cols:
            db.execute(f'ALTER TABLE items ADD COLUMN "{c}" {meta.types[c]}')
            cols.append(c)
    for c in cols:
        db.execute(f'CREATE INDEX IF NOT EXISTS "idx_{c}" ON items ("{c}")')
    return cols


def _apply_csv(db: sqlite3.Connection, meta: _Metadata, root: pathlib.Path) -> tuple[int, list[str]]:
    """Set CSV column values on every indexed item under ``root`` that the CSV names.

    Returns (matched rows, CSV paths with no indexed image)."""
    matched, unmatched = 0, []
    sets = ", ".join(f'"{c}" = ?' for c in meta.columns)
    for rel, values in meta.rows.items():
        path = str((root / rel).resolve())
        if not sets:
            continue
        cur = db.execute(f"UPDATE items SET {sets} WHERE path = ?", [values[c] for c in meta.columns] + [path])
        if cur.rowcount:
            matched += 1
        else:
            unmatched.append(rel)
    return matched, unmatched


def _write_npy(path: pathlib.Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def _build_ann(writer: _Writer, requested: str, prev: dict | None, features_path: pathlib.Path,
               ids: np.ndarray, *, removed: np.ndarray, added_rows: np.ndarray | None) -> dict:
    """Make the ANN structure of the new generation; returns the manifest's "search" entry.

    Reuses the previous generation's structure when the mode is unchanged (IVF: remove +
    add, retrain when the gallery has grown 4x since training; HNSW: append-only, rebuilt
    after removals), otherwise builds from scratch. ``removed``: ids dropped or replaced;
    ``added_rows``: rows of the new features to add (None = all, i.e. a fresh build).
    """
    n = len(ids)
    mode = ann_mod.choose_mode(n, requested)
    if mode == "exact" or n == 0:
        return {"mode": "exact", "requested": requested, "params": {}}
    feats = np.load(features_path, mmap_mode="r")
    prev_search = prev["search"] if prev else {}
    prev_ann = prev["files"].get("ann") if prev else None
    index = None
    params = dict(prev_search.get("params", {}))
    reusable = (
        prev_ann is not None and prev_search.get("mode") == mode and added_rows is not None
        and (mode == "ivf" and n < 4 * int(params.get("trained_on", 0))
             or mode == "hnsw" and len(removed) == 0)
    )
    if reusable and mode == "hnsw":
        # HNSW labels are rows: only a pure append (rows n_old..n-1, nothing replaced) is reusable.
        reusable = len(added_rows) == 0 or (
            int(added_rows[0]) == n - len(added_rows) and bool(np.all(np.diff(added_rows) == 1))
        )
    if reusable:
        index = ann_mod.read(writer.root / prev_ann)
        if len(removed):
            ann_mod.remove(index, removed)
        ann_mod.add(index, feats[added_rows] if len(added_rows) else feats[:0], ids[added_rows])
    else:
        params = ann_mod.default_params(mode, n)
        index = ann_mod.build(mode, feats, ids, params)
    ann_mod.write(index, writer.path("ann"))
    return {"mode": mode, "requested": requested, "params": params}


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def build_index(path, encoder, images_dir, *, recursive: bool = False, metadata_csv=None,
                batch_size: int = 64, workers: int | None = None, progress: bool = True,
                search_mode: str = "auto", checkpoint: str | os.PathLike | None = None,
                overwrite: bool = False) -> dict:
    """Embed every image under ``images_dir`` and write a new index at ``path`` (a directory).

    encoder: an object with ``fingerprint``, ``embed_dim``, ``preprocess`` and
    ``encode_images`` (``tbps.retrieval.encoder.Encoder``). metadata_csv: optional CSV of per-image
    columns (see ``read_metadata_csv``). search_mode: "auto" (by gallery size), "exact",
    "ivf" or "hnsw". checkpoint: recorded so that ``tbps search`` can load the same model.
    overwrite: replace an existing index (atomically) instead of refusing.
    Returns stats: counts, skipped files with reasons, images/s.
    """
    t0 = time.perf_counter()
    root = pathlib.Path(path).expanduser().resolve()
    ann_mod.choose_mode(0, search_mode)  # validate early
    if root.exists() and not root.is_dir():
        raise IndexInputError(f"{str(root)!r} exists and is not a directory")
    if (root / MANIFEST).exists() and not overwrite:
        raise IndexInputError(
            f"index {str(root)!r} already exists; use `tbps index add` to update it or --overwrite to rebuild"
        )
    if root.is_dir() and not (root / MANIFEST).exists():
        foreign = [n for n in os.listdir(root) if not (_GEN_FILE.match(n) or n.startswith("."))]
        if foreign:
            raise IndexInputError(
                f"{str(root)!r} is a non-empty directory that is not an index ({foreign[0]!r}, ...); choose another path"
            )
    meta = read_metadata_csv(metadata_csv, images_dir) if metadata_csv else None
    files = scan_images(images_dir, recursive, exclude=[root] + ([metadata_csv] if metadata_csv else []))
    images_root = pathlib.Path(images_dir).expanduser().resolve()
    fingerprint = json.loads(json.dumps(encoder.fingerprint, default=str))
    dim = int(encoder.embed_dim)

    with _Writer(root, create=True) as writer:
        db = _create_db(writer.path("meta"), None)  # CSV columns added below
        feats_parts: list[np.ndarray] = []
        skipped: list[dict] = []
        next_id = 0
        t_embed = time.perf_counter()
        for idx, feats, infos, failures in embed_files(
            [f.path for f in files], encoder, batch_size=batch_size, workers=workers, progress=progress
        ):
            rows = []
            for i, info in zip(idx, infos):
                f = files[i]
                rows.append((next_id, f.path, f.relpath, f.size, f.mtime_ns / 1e9, info["sha256"],
                             info["width"], info["height"], f.mtime_ns))
                next_id += 1
            db.executemany("INSERT INTO items (id, path, relpath, size, mtime, sha256, width, height, mtime_ns) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            feats_parts.append(feats)
            skipped.extend({"path": files[i].path, "reason": r} for i, r in failures)
        embed_s = time.perf_counter() - t_embed
        csv_cols: list[str] = []
        matched, unmatched = 0, []
        if meta:
            csv_cols = _ensure_csv_columns(db, meta, [])
            matched, unmatched = _apply_csv(db, meta, images_root)
        db.commit()
        db.close()
        features = np.concatenate(feats_parts) if feats_parts else np.zeros((0, dim), np.float32)
        ids = np.arange(next_id, dtype=np.int64)
        _write_npy(writer.path("features"), features)
        _write_npy(writer.path("ids"), ids)
        search = _build_ann(writer, search_mode, None, writer.path("features"), ids,
                            removed=np.zeros(0, np.int64), added_rows=None)
        now = _now()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "generation": writer.gen,
            "files": gen_files(writer.gen, search["mode"] != "exact"),
            "count": int(len(ids)),
            "dim": dim,
            "next_id": next_id,
            "fingerprint": fingerprint,
            "checkpoint": _checkpoint_of(encoder, checkpoint),
            "images_dir": str(images_root),
            "recursive": bool(recursive),
            "columns": list(BUILTIN_COLUMNS) + csv_cols,
            "csv_columns": csv_cols,
            "search": search,
            "created": now,
            "updated": now,
        }
        writer.commit(manifest)
    n = int(len(ids))
    return {
        "index": str(root),
        "generation": manifest["generation"],
        "count": n,
        "scanned": len(files),
        "added": n,
        "updated": 0,
        "skipped_count": len(skipped),
        "skipped": skipped,
        "metadata_rows_matched": matched,
        "metadata_rows_unmatched": len(unmatched),
        "search_mode": search["mode"],
        "embed_seconds": round(embed_s, 3),
        "images_per_s": round(n / embed_s, 2) if embed_s > 0 and n else 0.0,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def build_index_from_features(path, features: np.ndarray, paths: Sequence[str], *, fingerprint: dict,
                              metadata: dict[str, Sequence[Any]] | None = None, search_mode: str = "auto",
                              checkpoint: str | None = None, overwrite: bool = False) -> dict:
    """Write an index from precomputed features (benchmarks, features computed elsewhere).

    features: (N, D) float32, L2-normalised; paths: N image paths (not opened or checked);
    metadata: optional ``{column: N values}`` stored like CSV columns (usable in filters).
    Files added later with ``add_to_index`` are compared by size/mtime, which these items
    lack, so use ``add_to_index`` only with images that are not already listed here.
    """
    t0 = time.perf_counter()
    root = pathlib.Path(path).expanduser().resolve()
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2 or len(feats) != len(paths):
        raise IndexInputError(f"features must be (N, D) with N = len(paths) = {len(paths)}, got {feats.shape}")
    if (root / MANIFEST).exists() and not overwrite:
        raise IndexInputError(f"index {str(root)!r} already exists (pass overwrite=True to replace it)")
    metadata = dict(metadata or {})
    cols = [_normalise_column(c) for c in metadata]
    for c, vals in zip(cols, metadata.values()):
        if c in BUILTIN_COLUMNS or c == "mtime_ns" or not c:
            raise IndexInputError(f"metadata column {c!r} clashes with a built-in column")
        if len(vals) != len(paths):
            raise IndexInputError(f"metadata column {c!r} has {len(vals)} values for {len(paths)} paths")
    types = {c: _infer_type([str(v) for v in vals if v is not None]) for c, vals in zip(cols, metadata.values())}
    n, dim = feats.shape
    with _Writer(root, create=True) as writer:
        db = _create_db(writer.path("meta"), _Metadata(cols, types, {}))
        abs_paths = [str(pathlib.Path(p).expanduser().absolute()) for p in paths]
        col_sql = "".join(f', "{c}"' for c in cols)
        db.executemany(
            f"INSERT INTO items (id, path, relpath{col_sql}) VALUES (?, ?, ?{', ?' * len(cols)})",
            ((i, p, pathlib.Path(p).name, *(v[i] for v in metadata.values())) for i, p in enumerate(abs_paths)),
        )
        for c in cols:
            db.execute(f'CREATE INDEX "idx_{c}" ON items ("{c}")')
        db.commit()
        db.close()
        ids = np.arange(n, dtype=np.int64)
        _write_npy(writer.path("features"), feats)
        _write_npy(writer.path("ids"), ids)
        search = _build_ann(writer, search_mode, None, writer.path("features"), ids,
                            removed=np.zeros(0, np.int64), added_rows=None)
        now = _now()
        manifest = {
            "format": FORMAT, "version": VERSION, "generation": writer.gen,
            "files": gen_files(writer.gen, search["mode"] != "exact"),
            "count": int(n), "dim": int(dim), "next_id": int(n),
            "fingerprint": json.loads(json.dumps(fingerprint, default=str)),
            "checkpoint": checkpoint, "images_dir": None, "recursive": False,
            "columns": list(BUILTIN_COLUMNS) + cols, "csv_columns": cols,
            "search": search, "created": now, "updated": now,
        }
        writer.commit(manifest)
    return {"index": str(root), "generation": manifest["generation"], "count": int(n),
            "search_mode": search["mode"], "seconds": round(time.perf_counter() - t0, 3)}


def _checkpoint_of(encoder, checkpoint) -> str | None:
    ckpt = checkpoint or getattr(encoder, "checkpoint", None) or getattr(encoder, "checkpoint_path", None)
    if not isinstance(ckpt, (str, os.PathLike)):
        return None
    return str(pathlib.Path(ckpt).expanduser().resolve()) if ckpt else None


def add_to_index(path, encoder, images_dir, *, recursive: bool = False, metadata_csv=None,
                 batch_size: int = 64, workers: int | None = None, progress: bool = True,
                 search_mode: str | None = None) -> dict:
    """Embed only new or changed images under ``images_dir`` into the existing index ``path``.

    A file is unchanged when its size and modification time match the index; when they
    differ, its SHA-256 decides (same content: only the recorded mtime is updated). Changed
    files keep their item id. Files that disappeared are counted (``missing``) but kept:
    drop them with ``remove_from_index``. A changed file that is now unreadable is reported
    and keeps its old entry. metadata_csv: (re)applies CSV columns to the matching items.
    search_mode: change the recorded mode ("auto", "exact", "ivf", "hnsw"); None keeps it.
    """
    t0 = time.perf_counter()
    root = pathlib.Path(path).expanduser().resolve()
    read_manifest(root)
    with _Writer(root, create=False) as writer:
        prev = writer.prev
        if prev is None:
            raise IndexFormatError(f"{str(root)!r} is not a tbps index; create it with `tbps index build`")
        requested = search_mode or prev["search"].get("requested", "auto")
        ann_mod.choose_mode(0, requested)
        with GalleryIndex.open(root) as old:
            old.check_encoder(encoder)
            meta = read_metadata_csv(metadata_csv, images_dir) if metadata_csv else None
            images_root = pathlib.Path(images_dir).expanduser().resolve()
            files = scan_images(images_dir, recursive, exclude=[root] + ([metadata_csv] if metadata_csv else []))
            with old._db_lock:
                known = {
                    p: (i, size, mns, sha)
                    for i, p, size, mns, sha in old._db.execute("SELECT id, path, size, mtime_ns, sha256 FROM items")
                }
            new_files, changed, touched = [], [], []
            for f in files:
                rec = known.get(f.path)
                if rec is None:
                    new_files.append(f)
                elif (rec[1], rec[2]) != (f.size, f.mtime_ns):
                    if _sha256_file(f.path) == rec[3]:
                        touched.append((f, rec[0]))
                    else:
                        changed.append((f, rec[0]))
            on_disk = {f.path for f in files}
            prefix = str(images_root) + os.sep
            missing = sum(1 for p in known if p.startswith(prefix) and p not in on_disk
                          and (recursive or os.sep not in p[len(prefix):]))
            if not new_files and not changed and not touched and meta is None and requested == prev["search"].get("requested", "auto"):
                return _add_stats(root, prev, files, 0, 0, 0, [], missing, 0, [], 0.0, t0, prev["search"]["mode"])

            db_path = writer.path("meta")
            shutil.copyfile(root / prev["files"]["meta"], db_path)
            db = sqlite3.connect(db_path)
            work = [f for f, _ in changed] + new_files
            change_ids = [i for _, i in changed]
            next_id = int(prev["next_id"])
            new_feats: list[np.ndarray] = []
            new_ids: list[int] = []
            repl_rows: list[int] = []
            repl_feats: list[np.ndarray] = []
            skipped: list[dict] = []
            t_embed = time.perf_counter()
            n_changed = 0
            for idx, feats, infos, failures in embed_files(
                [f.path for f in work], encoder, batch_size=batch_size, workers=workers, progress=progress
            ):
                for j, i in enumerate(idx):
                    f, info = work[i], infos[j]
                    if i < len(changed):
                        item = change_ids[i]
                        db.execute("UPDATE items SET size=?, mtime=?, mtime_ns=?, sha256=?, width=?, height=? WHERE id=?",
                                   (f.size, f.mtime_ns / 1e9, f.mtime_ns, info["sha256"], info["width"], info["height"], item))
                        repl_rows.append(int(np.searchsorted(old.ids, item)))
                        repl_feats.append(feats[j])
                        n_changed += 1
                    else:
                        db.execute("INSERT INTO items (id, path, relpath, size, mtime, sha256, width, height, mtime_ns) "
                                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                   (next_id, f.path, f.relpath, f.size, f.mtime_ns / 1e9, info["sha256"],
                                    info["width"], info["height"], f.mtime_ns))
                        new_ids.append(next_id)
                        new_feats.append(feats[j])
                        next_id += 1
                skipped.extend({"path": work[i].path, "reason": r} for i, r in failures)
            embed_s = time.perf_counter() - t_embed
            if not (n_changed or new_ids or touched or meta is not None
                    or requested != prev["search"].get("requested", "auto")):
                # Only unreadable files were "new": nothing to commit, keep the generation.
                db.close()
                with contextlib.suppress(OSError):
                    db_path.unlink()
                return _add_stats(root, prev, files, 0, 0, 0, skipped, missing, 0, [], embed_s, t0,
                                  prev["search"]["mode"])
            for f, item in touched:
                db.execute("UPDATE items SET mtime=?, mtime_ns=? WHERE id=?", (f.mtime_ns / 1e9, f.mtime_ns, item))
            csv_cols = list(prev.get("csv_columns", []))
            matched, unmatched = 0, []
            if meta:
                csv_cols = _ensure_csv_columns(db, meta, csv_cols)
                matched, unmatched = _apply_csv(db, meta, images_root)
            db.commit()
            db.close()

            # Features of the new generation: old rows (some replaced) + appended rows.
            n_old, dim = old.features.shape
            n_new = n_old + len(new_ids)
            out = np.lib.format.open_memmap(writer.path("features"), mode="w+", dtype=np.float32, shape=(n_new, dim))
            for s in range(0, n_old, 65536):
                e = min(s + 65536, n_old)
                out[s:e] = old.features[s:e]
            if repl_rows:
                out[np.asarray(repl_rows)] = np.stack(repl_feats)
            if new_ids:
                out[n_old:] = np.stack(new_feats)
            out.flush()
            del out
            ids = np.concatenate([old.ids, np.asarray(new_ids, dtype=np.int64)])
            _write_npy(writer.path("ids"), ids)
            replaced = old.ids[np.asarray(repl_rows, dtype=np.int64)]  # ids re-embedded in place
            added_rows = np.concatenate([np.asarray(repl_rows, dtype=np.int64),
                                         np.arange(n_old, n_new, dtype=np.int64)])
            added_rows.sort()
            if requested != prev["search"].get("requested", "auto"):
                prev_for_ann = None  # the user changed the mode: build from scratch
            else:
                prev_for_ann = prev
            search = _build_ann(writer, requested, prev_for_ann, writer.path("features"), ids,
                                removed=replaced, added_rows=added_rows)
        manifest = dict(prev)
        manifest.update({
            "generation": writer.gen,
            "files": gen_files(writer.gen, search["mode"] != "exact"),
            "count": int(n_new),
            "next_id": next_id,
            "columns": list(BUILTIN_COLUMNS) + csv_cols,
            "csv_columns": csv_cols,
            "search": search,
            "updated": _now(),
        })
        writer.commit(manifest)
    return _add_stats(root, manifest, files, len(new_ids), n_changed, len(touched), skipped, missing,
                      matched, unmatched, embed_s, t0, search["mode"])


def _add_stats(root, manifest, files, added, updated, touched, skipped, missing, matched, unmatched,
               embed_s, t0, mode) -> dict:
    n = added + updated
    return {
        "index": str(root),
        "generation": manifest["generation"],
        "count": int(manifest["count"]),
        "scanned": len(files),
        "added": added,
        "updated": updated,
        "touched": touched,
        "unchanged": len(files) - added - updated - touched - len(skipped),
        "missing": missing,
        "skipped_count": len(skipped),
        "skipped": skipped,
        "metadata_rows_matched": matched,
        "metadata_rows_unmatched": len(unmatched),
        "search_mode": mode,
        "embed_seconds": round(embed_s, 3),
        "images_per_s": round(n / embed_s, 2) if embed_s > 0 and n else 0.0,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _sha256_file(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def remove_from_index(path, paths: Sequence[str | os.PathLike]) -> dict:
    """Drop the items whose image path is in ``paths`` (a directory drops everything under it).

    Each entry is matched as given (relative to the current directory) and, failing that,
    relative to the index's images directory. Returns stats with ``removed`` and ``not_found``.
    """
    t0 = time.perf_counter()
    root = pathlib.Path(path).expanduser().resolve()
    read_manifest(root)
    if not paths:
        raise IndexInputError("no paths given to remove")
    with _Writer(root, create=False) as writer:
        prev = writer.prev
        if prev is None:
            raise IndexFormatError(f"{str(root)!r} is not a tbps index")
        images_root = pathlib.Path(prev.get("images_dir") or ".")
        with GalleryIndex.open(root) as old:
            drop: set[int] = set()
            not_found: list[str] = []
            with old._db_lock:
                for p in paths:
                    found = False
                    cands = [pathlib.Path(p).expanduser().absolute()]
                    if not pathlib.Path(p).is_absolute():
                        cands.append(images_root / p)
                    for cand in cands:
                        for c in {str(cand), os.path.normpath(str(cand)), str(cand.resolve())}:
                            c = c.rstrip(os.sep) or os.sep
                            rows = old._db.execute(
                                "SELECT id FROM items WHERE path = ? OR substr(path, 1, ?) = ?",
                                (c, len(c) + 1, c + os.sep),
                            ).fetchall()
                            if rows:
                                drop.update(r[0] for r in rows)
                                found = True
                    if not found:
                        not_found.append(str(p))
            if not drop:
                return {"index": str(root), "generation": prev["generation"], "count": len(old),
                        "removed": 0, "not_found": not_found, "search_mode": prev["search"]["mode"],
                        "seconds": round(time.perf_counter() - t0, 3)}
            dropped = np.asarray(sorted(drop), dtype=np.int64)
            keep = ~np.isin(old.ids, dropped)
            db_path = writer.path("meta")
            shutil.copyfile(root / prev["files"]["meta"], db_path)
            db = sqlite3.connect(db_path)
            db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in dropped])
            db.commit()
            db.execute("VACUUM")
            db.close()
            n_new = int(keep.sum())
            out = np.lib.format.open_memmap(writer.path("features"), mode="w+", dtype=np.float32,
                                            shape=(n_new, old.dim))
            w = 0
            for s in range(0, len(old.ids), 65536):
                block = old.features[s : s + 65536][keep[s : s + 65536]]
                out[w : w + len(block)] = block
                w += len(block)
            out.flush()
            del out
            ids = old.ids[keep]
            _write_npy(writer.path("ids"), ids)
            search = _build_ann(writer, prev["search"].get("requested", "auto"), prev, writer.path("features"),
                                ids, removed=dropped, added_rows=np.zeros(0, np.int64))
        manifest = dict(prev)
        manifest.update({
            "generation": writer.gen,
            "files": gen_files(writer.gen, search["mode"] != "exact"),
            "count": n_new,
            "search": search,
            "updated": _now(),
        })
        writer.commit(manifest)
    return {"index": str(root), "generation": manifest["generation"], "count": n_new,
            "removed": int(len(dropped)), "not_found": not_found, "search_mode": search["mode"],
            "seconds": round(time.perf_counter() - t0, 3)}
