"""The four ways to write an index: ``build_index``, ``add_to_index``, ``remove_from_index`` and
``build_index_from_features``.

Each one reads its inputs (``tbps.index.scan``), embeds what is new (``tbps.index.embed``),
fills the new generation's items table and publishes the generation with
``tbps.index.generation.write_generation``, holding the writer's lock throughout. The
on-disk layout is in ``tbps.index.store``, crash safety in ``tbps.index.generation``.
Unreadable, corrupt or non-image files are reported (path and reason) and skipped; they
never stop a write.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from tbps.index import ann as ann_mod
from tbps.index.embed import embed_files
from tbps.index.errors import IndexFormatError, IndexInputError
from tbps.index.generation import (
    FeatureEdit,
    GenerationWriter,
    Step,
    add_csv_columns,
    apply_csv,
    copy_db,
    create_db,
    delete_items,
    discard_db,
    insert_feature_rows,
    insert_items,
    is_generation_file,
    touch_items,
    update_items,
    write_generation,
)
from tbps.index.scan import (
    require_files,
    CsvMetadata,
    ImageFile,
    infer_type,
    is_reserved_column,
    normalise_column,
    read_metadata_csv,
    scan_images,
    sha256_file,
)
from tbps.index.store import BUILTIN_COLUMNS, MANIFEST, GalleryIndex, read_manifest

__all__ = ["build_index", "add_to_index", "remove_from_index", "build_index_from_features",
           "read_metadata_csv"]

_TEST_HOOK_ENV = "TBPS_INDEX_TEST_HOOK"  # comma-separated step names at which to stop (tests only)


def _test_hooks() -> Step:
    """The writers' step callback: it stops this process at the steps named in
    ``$TBPS_INDEX_TEST_HOOK`` ("embedding" after each batch, "before-manifest"), so that
    ``tests/test_index_crash.py`` can kill it there; otherwise it does nothing."""
    names = os.environ.get(_TEST_HOOK_ENV, "")
    stops = set(names.split(",")) if names else set()

    def step(name: str) -> None:
        if name in stops:
            print(f"tbps-index-hook {name}", file=sys.stderr, flush=True)
            time.sleep(3600)

    return step


@dataclass
class _Embedded:
    """What embedding a list of files produced; their rows are already in the items table."""

    next_id: int  # the id the next new item gets
    new_ids: list[int] = field(default_factory=list)
    new_feats: list[np.ndarray] = field(default_factory=list)  # (B_i, D) blocks, in id order
    replaced_ids: list[int] = field(default_factory=list)  # items re-embedded under their id
    replaced_feats: list[np.ndarray] = field(default_factory=list)  # (B_i, D) blocks, same order
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} of unreadable files
    seconds: float = 0.0


def _embed(db: sqlite3.Connection, work: list[ImageFile], encoder, *, next_id: int, existing_ids: Sequence[int] = (),
           batch_size: int, workers: int | None, progress: bool, step: Step) -> _Embedded:
    """Embed ``work`` and write its rows: the first ``len(existing_ids)`` files are re-embedded
    under those ids, the others become new items numbered from ``next_id``."""
    out = _Embedded(next_id=next_id)
    t0 = time.perf_counter()
    for batch in embed_files([f.path for f in work], encoder, batch_size=batch_size, workers=workers,
                             progress=progress):
        is_old = np.asarray(batch.indices, dtype=np.int64) < len(existing_ids)  # (B,) re-embedded in place
        updates, inserts = [], []
        for i, info, again in zip(batch.indices, batch.infos, is_old):
            if again:
                updates.append((existing_ids[i], work[i], info))
            else:
                inserts.append((out.next_id, work[i], info))
                out.next_id += 1
        update_items(db, updates)
        insert_items(db, inserts)
        out.replaced_ids += [u[0] for u in updates]
        out.replaced_feats.append(batch.features[is_old])
        out.new_ids += [r[0] for r in inserts]
        out.new_feats.append(batch.features[~is_old])
        out.skipped.extend({"path": work[i].path, "reason": r} for i, r in batch.failures)
        step("embedding")
    out.seconds = time.perf_counter() - t0
    return out


def _apply_metadata(db: sqlite3.Connection, meta: CsvMetadata | None, csv_cols: list[str],
                    images_root: pathlib.Path) -> tuple[list[str], int, list[str]]:
    """Add the CSV's columns and values to the table: (all CSV columns, rows matched, CSV paths unmatched)."""
    if meta is None:
        return list(csv_cols), 0, []
    cols = add_csv_columns(db, meta, csv_cols)
    matched, unmatched = apply_csv(db, meta, images_root)
    return cols, matched, unmatched


def _excluded(root: pathlib.Path, metadata_csv) -> list:
    """What a scan of the images must leave out: the index itself and its metadata CSV."""
    return [root] + ([metadata_csv] if metadata_csv else [])


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 and n else 0.0


# --------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------
def build_index(path, encoder, images_dir, *, recursive: bool = False, metadata_csv=None,
                batch_size: int = 64, workers: int | None = None, progress: bool = True,
                search_mode: str = "auto", checkpoint: str | os.PathLike | None = None,
                overwrite: bool = False) -> dict:
    """Embed every image under ``images_dir`` and write a new index at ``path`` (a directory).

    encoder: an object with ``fingerprint``, ``embed_dim``, ``preprocess`` and
    ``encode_images`` (``tbps.retrieval.encoder.Encoder``). metadata_csv: optional CSV of per-image
    columns (see ``read_metadata_csv``). search_mode: "auto" (by gallery size), "exact",
    "ivf", "ivfpq" or "hnsw". checkpoint: recorded so that ``tbps search`` can load the same model.
    overwrite: replace an existing index (atomically) instead of refusing.
    Returns stats: counts, skipped files with reasons, images/s.
    """
    t0 = time.perf_counter()
    root = pathlib.Path(path).expanduser().resolve()
    ann_mod.choose_mode(0, search_mode)  # validate early
    _check_workers(workers, batch_size)
    _check_build_target(root, overwrite)
    meta = read_metadata_csv(metadata_csv, images_dir) if metadata_csv else None
    unreadable: list[dict] = []
    files = scan_images(images_dir, recursive, exclude=_excluded(root, metadata_csv), unreadable=unreadable)
    images_root = pathlib.Path(images_dir).expanduser().resolve()
    require_files(files, images_root, recursive)
    fields = {"dim": int(encoder.embed_dim), "fingerprint": _jsonable(encoder.fingerprint),
              "checkpoint": _checkpoint_of(encoder, checkpoint), "images_dir": str(images_root),
              "recursive": bool(recursive)}
    step = _test_hooks()
    with _removed_on_failure(root), GenerationWriter(root, create=True) as writer:
        db = create_db(writer.path("meta"))  # CSV columns are added after the rows
        run = _embed(db, files, encoder, next_id=0, batch_size=batch_size, workers=workers,
                     progress=progress, step=step)
        if not run.new_ids:
            db.close()
            raise IndexInputError(f"none of the {len(files)} file(s) in {str(images_root)!r} is a readable image "
                                  f"(first: {run.skipped[0]['path']}: {run.skipped[0]['reason']})")
        csv_cols, matched, unmatched = _apply_metadata(db, meta, [], images_root)
        db.commit()
        db.close()
        features = np.concatenate(run.new_feats) if run.new_feats else np.zeros((0, fields["dim"]), np.float32)
        fields.update(next_id=run.next_id, columns=list(BUILTIN_COLUMNS) + csv_cols, csv_columns=csv_cols)
        manifest = write_generation(writer, fields, search_mode=search_mode, features=features, on_step=step)
    n = int(manifest["count"])
    return {
        "index": str(root),
        "generation": manifest["generation"],
        "count": n,
        "scanned": len(files),
        "added": n,
        "updated": 0,
        "skipped_count": len(run.skipped),
        "skipped": run.skipped,
        "unreadable_folders": unreadable,
        "metadata_rows_matched": matched,
        "metadata_rows_unmatched": len(unmatched),
        "search_mode": manifest["search"]["mode"],
        "embed_seconds": round(run.seconds, 3),
        "images_per_s": _rate(n, run.seconds),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _check_workers(workers: int | None, batch_size: int) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise IndexInputError(f"workers must be an integer >= 0 (0: decode in this process), got {workers!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise IndexInputError(f"batch size must be a positive integer, got {batch_size!r}")


@contextlib.contextmanager
def _removed_on_failure(root: pathlib.Path):
    """A build that fails leaves nothing: the folders it created are removed, and in a folder
    that existed (empty, or an index being overwritten) the files of its unpublished
    generation (the previous generation, if any, stays intact)."""
    created = None
    for p in [root, *root.parents]:
        if p.exists():
            break
        created = p
    had_index = (root / MANIFEST).exists()
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif root.is_dir():
            keep = set(read_manifest(root)["files"].values()) if (root / MANIFEST).exists() else set()
            for name in os.listdir(root):
                if (is_generation_file(name) and name not in keep) or (name == ".lock" and not had_index):
                    with contextlib.suppress(OSError):
                        os.unlink(root / name)
        raise


def _check_build_target(root: pathlib.Path, overwrite: bool) -> None:
    """Refuse to build over a file, over an index (unless ``overwrite``) or into a foreign folder."""
    if root.exists() and not root.is_dir():
        raise IndexInputError(f"{str(root)!r} exists and is not a directory")
    if (root / MANIFEST).exists() and not overwrite:
        raise IndexInputError(
            f"index {str(root)!r} already exists; use `tbps index add` to update it or --overwrite to rebuild"
        )
    if root.is_dir() and not (root / MANIFEST).exists():
        foreign = [n for n in os.listdir(root) if not (is_generation_file(n) or n.startswith("."))]
        if foreign:
            raise IndexInputError(
                f"{str(root)!r} is a non-empty directory that is not an index ({foreign[0]!r}, ...); choose another path"
            )


def _checkpoint_of(encoder, checkpoint) -> str | None:
    ckpt = checkpoint or getattr(encoder, "checkpoint", None) or getattr(encoder, "checkpoint_path", None)
    if not isinstance(ckpt, (str, os.PathLike)):
        return None
    return str(pathlib.Path(ckpt).expanduser().resolve()) if ckpt else None


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
    cols = [normalise_column(c) for c in metadata]
    for c, vals in zip(cols, metadata.values()):
        if is_reserved_column(c) or not c:
            raise IndexInputError(f"metadata column {c!r} clashes with a built-in column")
        if len(vals) != len(paths):
            raise IndexInputError(f"metadata column {c!r} has {len(vals)} values for {len(paths)} paths")
    types = {c: infer_type([str(v) for v in vals if v is not None]) for c, vals in zip(cols, metadata.values())}
    n, dim = feats.shape
    fields = {"dim": int(dim), "next_id": int(n), "fingerprint": _jsonable(fingerprint), "checkpoint": checkpoint,
              "images_dir": None, "recursive": False, "columns": list(BUILTIN_COLUMNS) + cols, "csv_columns": cols}
    with GenerationWriter(root, create=True) as writer:
        db = create_db(writer.path("meta"), [(c, types[c]) for c in cols])
        insert_feature_rows(db, [str(pathlib.Path(p).expanduser().absolute()) for p in paths], cols,
                            list(metadata.values()))
        db.commit()
        db.close()
        manifest = write_generation(writer, fields, search_mode=search_mode, features=feats, on_step=_test_hooks())
    return {"index": str(root), "generation": manifest["generation"], "count": int(n),
            "search_mode": manifest["search"]["mode"], "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------------------
# add
# --------------------------------------------------------------------------------------
@dataclass
class _AddPlan:
    """The scanned files sorted against what the index recorded of them."""

    files: list[ImageFile]  # everything scanned
    new: list[ImageFile]  # not in the index
    changed: list[tuple[ImageFile, int]]  # (file, id): new content
    touched: list[tuple[ImageFile, int]]  # (file, id): size or mtime differ, same content
    missing: int  # indexed files below the images dir that are no longer there
    unreadable: list[dict] = field(default_factory=list)  # {"path", "reason"} of folders that cannot be listed


def _plan_add(files: list[ImageFile], known: dict[str, tuple], images_root: pathlib.Path,
              recursive: bool, unreadable: list[dict] | None = None) -> _AddPlan:
    new, changed, touched = [], [], []
    for f in files:
        rec = known.get(f.path)  # (id, size, mtime_ns, sha256)
        if rec is None:
            new.append(f)
        elif (rec[1], rec[2]) != (f.size, f.mtime_ns):
            (touched if sha256_file(f.path) == rec[3] else changed).append((f, rec[0]))
    on_disk = {f.path for f in files}
    prefix = str(images_root) + os.sep
    missing = sum(1 for p in known if p.startswith(prefix) and p not in on_disk
                  and (recursive or os.sep not in p[len(prefix):]))
    return _AddPlan(files, new, changed, touched, missing, list(unreadable or []))


def add_to_index(path, encoder, images_dir, *, recursive: bool = False, metadata_csv=None,
                 batch_size: int = 64, workers: int | None = None, progress: bool = True,
                 search_mode: str | None = None) -> dict:
    """Embed only new or changed images under ``images_dir`` into the existing index ``path``.

    A file is unchanged when its size and modification time match the index; when they
    differ, its SHA-256 decides (same content: only the recorded mtime is updated). Changed
    files keep their item id. Files that disappeared are counted (``missing``) but kept:
    drop them with ``remove_from_index``. A changed file that is now unreadable is reported
    and keeps its old entry. metadata_csv: (re)applies CSV columns to the matching items.
    search_mode: change the recorded mode ("auto", "exact", "ivf", "ivfpq", "hnsw"); None keeps it.
    """
    t0 = time.perf_counter()
    root = pathlib.Path(path).expanduser().resolve()
    read_manifest(root)
    _check_workers(workers, batch_size)
    step = _test_hooks()
    with GenerationWriter(root, create=False) as writer:
        prev = _previous(writer, f"{str(root)!r} is not a tbps index; create it with `tbps index build`")
        requested = search_mode or prev["search"].get("requested", "auto")
        ann_mod.choose_mode(0, requested)
        mode_changed = requested != prev["search"].get("requested", "auto")
        with GalleryIndex.open(root) as old:
            old.check_encoder(encoder)
            meta = read_metadata_csv(metadata_csv, images_dir) if metadata_csv else None
            images_root = pathlib.Path(images_dir).expanduser().resolve()
            unreadable: list[dict] = []
            files = scan_images(images_dir, recursive, exclude=_excluded(root, metadata_csv), unreadable=unreadable)
            plan = _plan_add(files, old.file_states(), images_root, recursive, unreadable)
            if not (plan.new or plan.changed or plan.touched or meta is not None or mode_changed):
                return _add_stats(root, prev, plan, None, 0, [], t0)
            db = copy_db(writer)
            run = _embed(db, [f for f, _ in plan.changed] + plan.new, encoder, next_id=int(prev["next_id"]),
                         existing_ids=[i for _, i in plan.changed], batch_size=batch_size, workers=workers,
                         progress=progress, step=step)
            if not (run.replaced_ids or run.new_ids or plan.touched or meta is not None or mode_changed):
                discard_db(writer, db)  # only unreadable files were "new": keep the generation
                return _add_stats(root, prev, plan, run, 0, [], t0)
            touch_items(db, plan.touched)
            csv_cols, matched, unmatched = _apply_metadata(db, meta, list(prev.get("csv_columns", [])), images_root)
            db.commit()
            db.close()
            edit = FeatureEdit(
                old.features, old.ids,
                replaced_rows=np.searchsorted(old.ids, np.asarray(run.replaced_ids, dtype=np.int64)),
                replaced=np.concatenate(run.replaced_feats) if run.replaced_ids else None,
                appended_ids=np.asarray(run.new_ids, dtype=np.int64),
                appended=np.concatenate(run.new_feats) if run.new_ids else None,
            )
            fields = {"next_id": run.next_id, "columns": list(BUILTIN_COLUMNS) + csv_cols, "csv_columns": csv_cols}
            manifest = write_generation(writer, fields, search_mode=requested, edit=edit, on_step=step)
    return _add_stats(root, manifest, plan, run, matched, unmatched, t0)


def _previous(writer: GenerationWriter, message: str) -> dict:
    """The manifest of the generation a write starts from; ``IndexFormatError(message)`` if none."""
    if writer.prev is None:
        raise IndexFormatError(message)
    return writer.prev


def _add_stats(root: pathlib.Path, manifest: dict, plan: _AddPlan, run: _Embedded | None, matched: int,
               unmatched: list[str], t0: float) -> dict:
    """``add_to_index``'s result; ``run`` None when nothing needed embedding."""
    run = run or _Embedded(next_id=0)
    added, updated, touched = len(run.new_ids), len(run.replaced_ids), len(plan.touched)
    return {
        "index": str(root),
        "generation": manifest["generation"],
        "count": int(manifest["count"]),
        "scanned": len(plan.files),
        "added": added,
        "updated": updated,
        "touched": touched,
        "unchanged": len(plan.files) - added - updated - touched - len(run.skipped),
        "missing": plan.missing,
        "skipped_count": len(run.skipped),
        "skipped": run.skipped,
        "unreadable_folders": plan.unreadable,
        "metadata_rows_matched": matched,
        "metadata_rows_unmatched": len(unmatched),
        "search_mode": manifest["search"]["mode"],
        "embed_seconds": round(run.seconds, 3),
        "images_per_s": _rate(added + updated, run.seconds),
        "seconds": round(time.perf_counter() - t0, 3),
    }


# --------------------------------------------------------------------------------------
# remove
# --------------------------------------------------------------------------------------
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
    step = _test_hooks()
    with GenerationWriter(root, create=False) as writer:
        prev = _previous(writer, f"{str(root)!r} is not a tbps index")
        with GalleryIndex.open(root) as old:
            drop, not_found = _match_paths(old, paths, pathlib.Path(prev.get("images_dir") or "."))
            if not drop:
                return _remove_stats(root, prev, 0, not_found, t0)
            dropped = np.asarray(sorted(drop), dtype=np.int64)
            db = copy_db(writer)
            delete_items(db, dropped)
            db.close()
            edit = FeatureEdit(old.features, old.ids, keep=~np.isin(old.ids, dropped))
            manifest = write_generation(writer, {}, search_mode=prev["search"].get("requested", "auto"),
                                        edit=edit, on_step=step)
    return _remove_stats(root, manifest, len(dropped), not_found, t0)


def _match_paths(old: GalleryIndex, paths: Sequence[str | os.PathLike],
                 images_root: pathlib.Path) -> tuple[set[int], list[str]]:
    """(ids of the items at or below ``paths``, the entries of ``paths`` that matched nothing)."""
    drop: set[int] = set()
    not_found: list[str] = []
    for p in paths:
        found = False
        cands = [pathlib.Path(p).expanduser().absolute()]
        if not pathlib.Path(p).is_absolute():
            cands.append(images_root / p)
        for cand in cands:
            for c in {str(cand), os.path.normpath(str(cand)), str(cand.resolve())}:
                ids = old.ids_under(c.rstrip(os.sep) or os.sep)
                if ids:
                    drop.update(ids)
                    found = True
        if not found:
            not_found.append(str(p))
    return drop, not_found


def _remove_stats(root: pathlib.Path, manifest: dict, removed: int, not_found: list[str], t0: float) -> dict:
    return {"index": str(root), "generation": manifest["generation"], "count": int(manifest["count"]),
            "removed": removed, "not_found": not_found, "search_mode": manifest["search"]["mode"],
            "seconds": round(time.perf_counter() - t0, 3)}
