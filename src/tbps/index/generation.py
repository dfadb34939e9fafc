"""Writing one generation of an index: the lock, its files, fsync, and publishing the manifest.

Every write makes a new generation (layout in ``tbps.index.store``): it copies what it keeps
from the current one into new files, fsyncs them and the folder, and only then replaces
``manifest.json`` atomically, once. A writer killed at any moment (kill -9) therefore leaves
the index exactly as it was, or complete; its half-written files are removed by the next
writer. Writers take an exclusive ``flock`` on ``INDEX/.lock``, which the kernel releases if
the process dies; readers never take it.

``write_generation`` is the one way a generation is finished and published: the builders
hand it the new features, ``add_to_index`` / ``remove_from_index`` a ``FeatureEdit`` of the
previous generation's. The sqlite table is filled before, with the helpers below.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import pathlib
import re
import shutil
import sqlite3
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tbps.files import write_json
from tbps.index import ann as ann_mod
from tbps.index.errors import IndexBusyError, IndexInputError
from tbps.index.scan import CsvMetadata, ImageFile
from tbps.index.store import FORMAT, MANIFEST, VERSION, gen_files, read_manifest

_GEN_FILE = re.compile(r"^(features|ids|meta|ann)-(\d+)\.(npy|sqlite|faiss)(-journal|-wal|-shm)?$")
# The manifest's keys in the order every generation writes them (others follow).
_MANIFEST_KEYS = ("format", "version", "generation", "files", "count", "dim", "next_id", "fingerprint",
                  "checkpoint", "images_dir", "recursive", "columns", "csv_columns", "search", "created",
                  "updated")
_COPY_ROWS = 65_536  # rows per block when streaming features: 65536 x 512 x 4 B = 128 MB
_ITEM_COLUMNS = "id, path, relpath, size, mtime, sha256, width, height, mtime_ns"

Step = Callable[[str], None]  # called at named steps of a write ("before-manifest"); tests stop there


def is_generation_file(name: str) -> bool:
    """True for the name of a generation's file (``features-3.npy``, ``meta-3.sqlite-journal``...)."""
    return _GEN_FILE.match(name) is not None


class GenerationWriter:
    """Exclusive writer of one index directory: holds the lock, knows the current generation
    (``prev``, its manifest, or None) and the one being written (``gen``), and names its files.

    Opening it removes what a dead writer left behind. Use as a context manager.
    """

    def __init__(self, root: pathlib.Path, *, create: bool):
        self.root = root
        try:
            if create:
                root.mkdir(parents=True, exist_ok=True)
            elif not root.is_dir():
                read_manifest(root)  # raises the precise error
            self.lock_fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only disk, a folder the user may not write, a file in the way
            raise IndexInputError(f"cannot write index folder {str(root)!r}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            raise IndexBusyError(f"another tbps process is writing index {str(root)!r}; try again when it ends") from None
        self.prev: dict | None = read_manifest(root) if (root / MANIFEST).exists() else None
        self.gen = int(self.prev["generation"]) + 1 if self.prev else 1
        keep = {int(self.prev["generation"])} if self.prev else set()
        self._cleanup(keep | {g - 1 for g in keep})

    def path(self, kind: str) -> pathlib.Path:
        """Path of the new generation's file of ``kind`` ("features", "ids", "meta" or "ann")."""
        return self.root / gen_files(self.gen, True)[kind]

    def _cleanup(self, keep_gens: set[int]) -> None:
        """Remove generation files not in ``keep_gens`` and leftover temp files."""
        for name in os.listdir(self.root):
            m = _GEN_FILE.match(name)
            stale = (m and int(m.group(2)) not in keep_gens) or (name.startswith(".") and name.endswith(".tmp"))
            if stale:
                with contextlib.suppress(OSError):
                    os.unlink(self.root / name)

    def _publish(self, manifest: dict, on_step: Step | None) -> None:
        """Make generation ``self.gen`` the index: fsync its files, then replace the manifest."""
        for name in manifest["files"].values():
            if name:
                _fsync_file(self.root / name)
        _fsync_dir(self.root)
        if on_step is not None:
            on_step("before-manifest")
        write_json(self.root / MANIFEST, manifest)
        _fsync_dir(self.root)
        self._cleanup({self.gen, self.gen - 1})  # readers that opened gen - 1 keep their files

    def close(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            os.close(self.lock_fd)

    def __enter__(self) -> "GenerationWriter":
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


def now() -> str:
    """The manifest's timestamp: UTC, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- the sqlite table of items ---------------------------------------------------------
def create_db(path: pathlib.Path, columns: Sequence[tuple[str, str]] = ()) -> sqlite3.Connection:
    """A new, empty ``items`` table at ``path``; ``columns``: extra ``(name, SQL type)`` pairs."""
    if path.exists():
        path.unlink()
    db = sqlite3.connect(path)
    extra = "".join(f', "{c}" {t}' for c, t in columns)
    db.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, relpath TEXT, "
        "size INTEGER, mtime REAL, sha256 TEXT, width INTEGER, height INTEGER, mtime_ns INTEGER"
        f"{extra})"
    )
    return db


def copy_db(writer: GenerationWriter) -> sqlite3.Connection:
    """The previous generation's table, copied into the new generation's file, opened to edit."""
    db_path = writer.path("meta")
    shutil.copyfile(writer.root / writer.prev["files"]["meta"], db_path)
    return sqlite3.connect(db_path)


def discard_db(writer: GenerationWriter, db: sqlite3.Connection) -> None:
    """Close and delete the new generation's table: the write commits nothing."""
    db.close()
    with contextlib.suppress(OSError):
        writer.path("meta").unlink()


def insert_items(db: sqlite3.Connection, items: Sequence[tuple[int, ImageFile, dict]]) -> None:
    """Add rows for ``(id, file, info)``; info: width, height, sha256 from ``tbps.index.embed``."""
    db.executemany(
        f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(i, f.path, f.relpath, f.size, f.mtime_ns / 1e9, info["sha256"], info["width"], info["height"],
          f.mtime_ns) for i, f, info in items],
    )


def update_items(db: sqlite3.Connection, items: Sequence[tuple[int, ImageFile, dict]]) -> None:
    """Record the new state and content of re-embedded files ``(id, file, info)``."""
    db.executemany(
        "UPDATE items SET size=?, mtime=?, mtime_ns=?, sha256=?, width=?, height=? WHERE id=?",
        [(f.size, f.mtime_ns / 1e9, f.mtime_ns, info["sha256"], info["width"], info["height"], i)
         for i, f, info in items],
    )


def touch_items(db: sqlite3.Connection, items: Sequence[tuple[ImageFile, int]]) -> None:
    """Record the new mtime of files ``(file, id)`` whose content did not change."""
    db.executemany("UPDATE items SET mtime=?, mtime_ns=? WHERE id=?",
                   [(f.mtime_ns / 1e9, f.mtime_ns, i) for f, i in items])


def delete_items(db: sqlite3.Connection, ids: np.ndarray) -> None:
    """Delete the rows of ``ids``, commit, and compact the file."""
    db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])
    db.commit()
    db.execute("VACUUM")


def insert_feature_rows(db: sqlite3.Connection, paths: Sequence[str], columns: Sequence[str],
                        values: Sequence[Sequence]) -> None:
    """Rows 0..N-1 for images known only by path; ``values[j]``: the N values of ``columns[j]``
    (each column gets an sqlite index, for filters)."""
    col_sql = "".join(f', "{c}"' for c in columns)
    db.executemany(
        f"INSERT INTO items (id, path, relpath{col_sql}) VALUES (?, ?, ?{', ?' * len(columns)})",
        ((i, p, pathlib.Path(p).name, *(v[i] for v in values)) for i, p in enumerate(paths)),
    )
    for c in columns:
        db.execute(f'CREATE INDEX "idx_{c}" ON items ("{c}")')


def add_csv_columns(db: sqlite3.Connection, meta: CsvMetadata, existing: list[str]) -> list[str]:
    """ALTER TABLE to add CSV columns the index does not have yet; returns all CSV columns."""
    cols = list(existing)
    for c in meta.columns:
        if c not in cols:
            db.execute(f'ALTER TABLE items ADD COLUMN "{c}" {meta.types[c]}')
            cols.append(c)
    for c in cols:
        db.execute(f'CREATE INDEX IF NOT EXISTS "idx_{c}" ON items ("{c}")')
    return cols


def apply_csv(db: sqlite3.Connection, meta: CsvMetadata, root: pathlib.Path) -> tuple[int, list[str]]:
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


# -- features, ids, ANN and the manifest -----------------------------------------------
def _empty_rows() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class FeatureEdit:
    """The new generation's features as an edit of the previous one's (``add``/``remove``).

    Rows of the old features are kept (all, or where ``keep``), then ``replaced_rows`` of the
    result get new features, then ``appended`` rows follow with ids ``appended_ids``.
    """

    old_features: np.ndarray  # (N, D), memory-mapped
    old_ids: np.ndarray  # (N,) int64, sorted
    keep: np.ndarray | None = None  # (N,) bool; None keeps every row
    replaced_rows: np.ndarray = field(default_factory=_empty_rows)  # (R,) int64 rows re-embedded in place
    replaced: np.ndarray | None = None  # (R, D) their new features
    appended_ids: np.ndarray = field(default_factory=_empty_rows)  # (M,) int64, above every old id
    appended: np.ndarray | None = None  # (M, D)

    def write(self, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream the new (N', D) features to ``path``; returns (ids (N',), ids dropped or
        replaced, rows to add to an ANN structure (sorted))."""
        kept_ids = self.old_ids if self.keep is None else self.old_ids[self.keep]
        n_keep, dim = len(kept_ids), self.old_features.shape[1]
        n_new = n_keep + len(self.appended_ids)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_new, dim))
        w = 0
        for s in range(0, len(self.old_ids), _COPY_ROWS):  # bounded memory at any gallery size
            block = self.old_features[s : s + _COPY_ROWS]
            if self.keep is not None:
                block = block[self.keep[s : s + _COPY_ROWS]]
            out[w : w + len(block)] = block
            w += len(block)
        if len(self.replaced_rows):
            out[self.replaced_rows] = self.replaced
        if len(self.appended_ids):
            out[n_keep:] = self.appended
        out.flush()
        del out
        ids = np.concatenate([kept_ids, self.appended_ids])
        removed = kept_ids[self.replaced_rows]
        if self.keep is not None:
            removed = np.concatenate([self.old_ids[~self.keep], removed])
        added_rows = np.concatenate([self.replaced_rows, np.arange(n_keep, n_new, dtype=np.int64)])
        added_rows.sort()
        return ids, removed, added_rows


def write_npy(path: pathlib.Path, arr: np.ndarray) -> None:
    """Write ``arr`` as a ``.npy`` file (no pickles); the generation's fsync comes later."""
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def write_generation(writer: GenerationWriter, fields: dict, *, search_mode: str,
                     features: np.ndarray | None = None, edit: FeatureEdit | None = None,
                     on_step: Step | None = None) -> dict:
    """Finish generation ``writer.gen`` and publish it; returns its manifest.

    The items table (``writer.path("meta")``) must be complete and closed. Give either
    ``features`` (N, D) float32 of a fresh index (ids 0..N-1), or an ``edit`` of the previous
    generation's. Writes features and ids, makes the ANN structure for ``search_mode`` (an
    edit updates the previous one in place when the requested mode is unchanged), composes
    the manifest (the previous one for an edit, updated by ``fields``; then generation,
    files, count, search, and the time: "updated", and "created" for a fresh index), fsyncs everything, calls ``on_step("before-manifest")``
    and replaces ``manifest.json``. Generations older than the previous one are removed.
    """
    if (features is None) == (edit is None):
        raise ValueError("give write_generation either the features of a fresh index or an edit")
    prev = writer.prev if edit is not None else None
    if edit is not None:
        ids, removed, added_rows = edit.write(writer.path("features"))
        if search_mode != prev["search"].get("requested", "auto"):
            prev = None  # the user changed the mode: build from scratch
    else:
        write_npy(writer.path("features"), features)
        ids, removed, added_rows = np.arange(len(features), dtype=np.int64), _empty_rows(), None
    write_npy(writer.path("ids"), ids)
    search = _build_ann(writer, search_mode, prev, ids, removed=removed, added_rows=added_rows)
    manifest = dict(writer.prev) if edit is not None else {}
    manifest.update(fields)
    stamp = now()
    manifest.update({
        "format": FORMAT,
        "version": VERSION,
        "generation": writer.gen,
        "files": gen_files(writer.gen, search["mode"] != "exact"),
        "count": int(len(ids)),
        "search": search,
        "updated": stamp,
    })
    if edit is None:
        manifest["created"] = stamp
    ordered = {k: manifest[k] for k in _MANIFEST_KEYS if k in manifest}
    ordered.update(manifest)
    writer._publish(ordered, on_step)
    return ordered


def _build_ann(writer: GenerationWriter, requested: str, prev: dict | None, ids: np.ndarray, *,
               removed: np.ndarray, added_rows: np.ndarray | None) -> dict:
    """Make the ANN structure of the new generation; returns the manifest's "search" entry.

    Reuses ``prev``'s structure when the mode is unchanged (IVF: remove + add, retrain when
    the gallery has grown 4x since training; HNSW: append-only, rebuilt after removals),
    otherwise builds from scratch. ``removed``: ids dropped or replaced; ``added_rows``: rows
    of the new features to add (None = all, i.e. a fresh build).
    """
    n = len(ids)
    mode = ann_mod.choose_mode(n, requested)
    if mode == "exact" or n == 0:
        return {"mode": "exact", "requested": requested, "params": {}}
    feats = np.load(writer.path("features"), mmap_mode="r")
    prev_search = prev["search"] if prev else {}
    prev_ann = prev["files"].get("ann") if prev else None
    params = dict(prev_search.get("params", {}))
    reusable = (
        prev_ann is not None and prev_search.get("mode") == mode and added_rows is not None
        and (mode in ("ivf", "ivfpq") and n < 4 * int(params.get("trained_on", 0))
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
