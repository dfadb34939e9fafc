"""The default ``VectorStore``: today's index folder (faiss + SQLite generations) with write methods.

``LocalStore`` is a ``GalleryIndex`` (every read is the same code, at the same speed) whose
``add`` / ``update`` / ``delete`` each write one new generation through
``tbps.index.generation`` (lock, copy, fsync, atomic manifest), then move the view to it. A
write killed at any moment leaves the previous generation, as for every index write. The CLI
keeps writing folders with ``build_index`` / ``add_to_index`` / ``remove_from_index`` (one
generation per command, however many batches it embeds); these methods serve the Python
interface and the backend-neutral code in ``tbps.index.ingest``.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
from typing import Sequence

import numpy as np

from tbps.index.build import build_index_from_features
from tbps.index.errors import IndexInputError
from tbps.index.generation import FeatureEdit, GenerationWriter, copy_db, delete_items, write_generation
from tbps.index.scan import normalise_column
from tbps.index.store import BUILTIN_COLUMNS, INTERNAL_COLUMNS, GalleryIndex

_FILE_FIELDS = ("path", "relpath", "size", "mtime", "sha256", "width", "height", "mtime_ns")


def column_type(values) -> str:
    """SQL type of a new metadata column from Python values: INTEGER, REAL or TEXT."""
    vals = [v for v in values if v is not None]
    if vals and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        return "INTEGER"
    if vals and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in vals):
        return "REAL"
    return "TEXT"


def check_records(records: Sequence[dict], n: int, *, need_path: bool) -> list[str]:
    """Validate records; returns the metadata (non-built-in) column names they use, in order."""
    if len(records) != n:
        raise IndexInputError(f"{len(records)} records for {n} items")
    cols: list[str] = []
    for rec in records:
        if need_path and not isinstance(rec.get("path"), str):
            raise IndexInputError("every new item's record needs its image 'path' (a string)")
        for key in rec:
            if key == "id":
                raise IndexInputError("a record may not set 'id': the store assigns ids")
            if key in _FILE_FIELDS or key in cols:
                continue
            if not isinstance(key, str) or normalise_column(key) != key or key in INTERNAL_COLUMNS:
                raise IndexInputError(f"bad metadata column name {key!r}: use lower_snake_case")
            cols.append(key)
    return cols


def check_features(features, dim: int) -> np.ndarray:
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise IndexInputError(f"features must be (N, {dim}), got {feats.shape}")
    if not np.all(np.isfinite(feats)):
        raise IndexInputError("features contain NaN or infinite values")
    return feats


class LocalStore(GalleryIndex):
    """``GalleryIndex`` + ``add`` / ``update`` / ``delete``: the faiss + SQLite ``VectorStore``."""

    @classmethod
    def create(cls, path, *, dim: int, fingerprint: dict, checkpoint: str | None = None,
               images_dir: str | None = None, recursive: bool = False, overwrite: bool = False) -> "LocalStore":
        """An empty index at ``path`` (``overwrite``: replace one, atomically)."""
        build_index_from_features(path, np.zeros((0, int(dim)), np.float32), [], fingerprint=fingerprint,
                                  checkpoint=checkpoint, overwrite=overwrite)
        store = cls.open(path)
        if images_dir is not None:  # recorded for `index add` / `remove` (relative paths)
            store._write(lambda writer, old, db: None, fields={"images_dir": str(images_dir),
                                                                 "recursive": bool(recursive)})
        return store

    def count(self, where=None) -> int:
        """Items in this generation (matching ``where``)."""
        return len(self) if where is None else len(self.filter_ids(where))

    def file_states(self, under: str | None = None) -> dict[str, tuple]:
        states = super().file_states()
        if under is None:
            return states
        prefix = str(under).rstrip(os.sep) + os.sep
        return {p: s for p, s in states.items() if p.startswith(prefix)}

    def add(self, features, records: Sequence[dict], *, ids: Sequence[int] | None = None) -> np.ndarray:
        feats = check_features(features, self.dim)
        new_cols = check_records(records, len(feats), need_path=ids is None)
        out: list[np.ndarray] = []

        def edit(writer, old, db) -> FeatureEdit:
            self._add_columns(db, new_cols, records)
            if ids is None:
                first = int(writer.prev["next_id"])
                given = np.arange(first, first + len(feats), dtype=np.int64)
                try:
                    _insert(db, given, records)
                except sqlite3.IntegrityError as e:
                    raise IndexInputError(f"cannot add to index {str(self.root)!r}: {e} (a path already stored?)") from None
                out.append(given)
                return FeatureEdit(old.features, old.ids, appended_ids=given, appended=feats)
            given = np.asarray(ids, dtype=np.int64)
            if len(given) != len(feats) or len(np.unique(given)) != len(given):
                raise IndexInputError("ids must be distinct, one per feature row")
            rows = np.searchsorted(old.ids, given)
            if len(given) and (np.any(rows >= len(old.ids)) or np.any(old.ids[np.minimum(rows, len(old.ids) - 1)] != given)):
                raise IndexInputError("add(ids=...) replaces existing items; some ids are not in the index")
            _update(db, given, records)
            out.append(given)
            return FeatureEdit(old.features, old.ids, replaced_rows=rows, replaced=feats)

        self._write(edit, next_id_after=lambda prev: int(prev["next_id"]) + (len(feats) if ids is None else 0))
        return out[0]

    def update(self, ids: Sequence[int], records: Sequence[dict]) -> None:
        given = np.asarray(ids, dtype=np.int64)
        new_cols = check_records(records, len(given), need_path=False)

        def edit(writer, old, db):
            self._add_columns(db, new_cols, records)
            _update(db, given, records)
            return FeatureEdit(old.features, old.ids)

        self._write(edit)

    def delete(self, ids: Sequence[int]) -> int:
        given = np.unique(np.asarray(ids, dtype=np.int64))
        present = given[np.isin(given, self.ids)]
        if len(present) == 0:
            return 0
        done: list[int] = []

        def edit(writer, old, db):
            drop = given[np.isin(given, old.ids)]
            delete_items(db, drop)
            done.append(len(drop))
            return FeatureEdit(old.features, old.ids, keep=~np.isin(old.ids, drop))

        self._write(edit)
        return done[0]

    # -- one write = one generation ---------------------------------------------------------
    def _add_columns(self, db: sqlite3.Connection, new_cols: list[str], records: Sequence[dict]) -> None:
        known = {c[0] for c in db.execute("SELECT * FROM items LIMIT 0").description}
        for c in new_cols:
            if c not in known:
                db.execute(f'ALTER TABLE items ADD COLUMN "{c}" {column_type(r.get(c) for r in records)}')
                db.execute(f'CREATE INDEX IF NOT EXISTS "idx_{c}" ON items ("{c}")')
                self._pending_cols.append(c)

    def _write(self, edit, fields: dict | None = None, next_id_after=None) -> None:
        """Run ``edit(writer, current, db) -> FeatureEdit | None`` inside a new generation and publish it."""
        self._pending_cols: list[str] = []
        with GenerationWriter(self.root, create=False) as writer:
            prev = writer.prev
            with GalleryIndex.open(self.root) as old:
                db = copy_db(writer)
                try:
                    fe = edit(writer, old, db) or FeatureEdit(old.features, old.ids)
                    db.commit()
                finally:
                    db.close()
                csv_cols = list(prev.get("csv_columns", [])) + self._pending_cols
                new_fields = {"columns": list(BUILTIN_COLUMNS) + csv_cols, "csv_columns": csv_cols, **(fields or {})}
                if next_id_after is not None:
                    new_fields["next_id"] = next_id_after(prev)
                write_generation(writer, new_fields, search_mode=prev["search"].get("requested", "auto"), edit=fe)
        fresh = GalleryIndex.open(self.root)
        old_db = self._db
        self.__dict__.update({k: v for k, v in fresh.__dict__.items()})
        old_db.close()


def _insert(db: sqlite3.Connection, ids: np.ndarray, records: Sequence[dict]) -> None:
    for i, rec in zip(ids, records):
        rec = dict(rec)
        path = rec["path"]
        rec.setdefault("relpath", pathlib.PurePath(path).name)
        cols = ["id", *rec]
        names = ", ".join(f'"{c}"' for c in cols)
        db.execute(f"INSERT INTO items ({names}) VALUES ({', '.join('?' * len(cols))})",
                   [int(i), *(_sql_value(v) for v in rec.values())])


def _update(db: sqlite3.Connection, ids: np.ndarray, records: Sequence[dict]) -> None:
    for i, rec in zip(ids, records):
        if not rec:
            continue
        sets = ", ".join(f'"{c}" = ?' for c in rec)
        db.execute(f"UPDATE items SET {sets} WHERE id = ?", [*(_sql_value(v) for v in rec.values()), int(i)])


def _sql_value(v):
    if isinstance(v, np.generic):
        return v.item()
    return v
