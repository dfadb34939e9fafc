"""Partitioned gallery builds: embed a file list in fixed slices that survive a crash and
split across processes, then publish one index generation from all of them.

The sorted file list is cut into partitions of ``partition_size`` files. Partition ``p`` is
embedded on its own and written atomically to ``WORK/part-<p>.npz`` (features, the file
positions that embedded, their width/height/SHA-256, the files that failed and why, and a
*key*: the SHA-256 of the encoder fingerprint and of the slice's paths, sizes and mtimes).
A partition file is therefore complete or absent, and it is reused only when its key
matches: a killed run resumes from the partitions already written, and a partition of
another file list, another slicing or another encoder is embedded again.

With ``world`` processes (torchrun), process ``rank`` embeds partitions ``rank, rank +
world, ...``; after a barrier rank 0 checks that every partition is there and publishes the
generation, with the ids (0, 1, ... in file-list order, unreadable files skipped), rows and
features ``build_index`` gives the same files. The library takes ``rank``, ``world`` and a
``barrier`` callable; joining the process group is the CLI's business.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tbps.files import atomic_write
from tbps.index import ann as ann_mod
from tbps.index.embed import embed_files
from tbps.index.errors import IndexInputError
from tbps.index.generation import GenerationWriter, add_csv_columns, apply_csv, create_db, insert_items, write_generation
from tbps.index.scan import ImageFile, read_metadata_csv, require_files, scan_images
from tbps.index.store import BUILTIN_COLUMNS, MANIFEST

__all__ = ["build_index_partitioned", "read_file_list", "partition_key", "DEFAULT_PARTITION_SIZE"]

DEFAULT_PARTITION_SIZE = 4096
_KILL_ENV = "TBPS_PARTITION_TEST_KILL_AFTER"  # tests: SIGKILL this process after writing K partitions


@dataclass
class Partition:
    """What one partition's file holds, read back."""

    positions: np.ndarray  # (m,) int64: positions in the file list of the files that embedded
    features: np.ndarray  # (m, D) float32
    width: np.ndarray  # (m,) int64
    height: np.ndarray  # (m,) int64
    sha256: np.ndarray  # (m,) str
    failed: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)


def read_file_list(list_file, root=None) -> tuple[list[ImageFile], pathlib.Path]:
    """The files named in ``list_file`` (one path per line; blank lines and ``#`` comments
    skipped), sorted and de-duplicated; relative paths are taken from ``root`` (default: the
    list file's folder), which is also what ``relpath`` is relative to. Returns (files, root).
    A path that does not name a regular file is an ``IndexInputError`` naming its line."""
    lpath = pathlib.Path(list_file).expanduser()
    try:
        lines = lpath.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise IndexInputError(f"cannot read file list {str(lpath)!r}: {e}") from e
    base = pathlib.Path(root).expanduser().resolve() if root else lpath.resolve().parent
    seen: dict[str, ImageFile] = {}
    for lineno, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = (base / entry).resolve()
        try:
            st = os.stat(p)
        except OSError:
            raise IndexInputError(f"file list {str(lpath)!r} line {lineno}: {entry!r} does not exist") from None
        if not p.is_file():
            raise IndexInputError(f"file list {str(lpath)!r} line {lineno}: {entry!r} is not a regular file")
        rel = p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix()
        seen[str(p)] = ImageFile(str(p), rel, st.st_size, st.st_mtime_ns)
    require_files(seen, lpath)
    return sorted(seen.values(), key=lambda f: f.path), base


def partition_key(fingerprint: dict, files: Sequence[ImageFile]) -> str:
    """SHA-256 naming what a partition holds: the encoder and its slice of files (path, size, mtime)."""
    h = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode())
    for f in files:
        h.update(f"\0{f.path}\0{f.size}\0{f.mtime_ns}".encode())
    return h.hexdigest()


def _part_path(work: pathlib.Path, p: int) -> pathlib.Path:
    return work / f"part-{p:06d}.npz"


def _write_partition(path: pathlib.Path, key: str, part: Partition) -> None:
    """One ``.npz`` written atomically (temp file, fsync, rename): complete or absent."""
    fail_pos = np.asarray([i for i, _ in part.failed], dtype=np.int64)
    fail_why = np.asarray([r for _, r in part.failed], dtype=str)
    with atomic_write(path) as f:
        np.savez(f, key=np.asarray(key), positions=part.positions, features=part.features, width=part.width,
                 height=part.height, sha256=np.asarray(part.sha256, dtype=str), fail_pos=fail_pos, fail_why=fail_why)


def _read_partition(path: pathlib.Path, key: str, dim: int) -> Partition | None:
    """The partition at ``path`` if it is readable and holds ``key``; None otherwise (missing,
    torn, foreign, other encoder or file slice: it gets embedded again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            part = Partition(z["positions"].astype(np.int64), z["features"], z["width"], z["height"], z["sha256"],
                             list(zip(z["fail_pos"].tolist(), z["fail_why"].tolist())))
    except Exception:  # missing, torn or damaged (OSError, BadZipFile, KeyError...): not a partition
        return None
    if part.features.dtype != np.float32 or part.features.shape != (len(part.positions), dim):
        return None
    return part


def _embed_partition(files: Sequence[ImageFile], offset: int, encoder, *, batch_size: int, workers: int | None,
                     progress: bool, desc: str) -> Partition:
    feats, pos, width, height, sha, failed = [], [], [], [], [], []
    for batch in embed_files([f.path for f in files], encoder, batch_size=batch_size, workers=workers,
                             progress=progress, desc=desc):
        feats.append(batch.features)
        pos += [offset + i for i in batch.indices]
        width += [info["width"] for info in batch.infos]
        height += [info["height"] for info in batch.infos]
        sha += [info["sha256"] for info in batch.infos]
        failed += [(offset + i, r) for i, r in batch.failures]
    dim = int(encoder.embed_dim)
    return Partition(np.asarray(pos, dtype=np.int64),
                     np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
                     np.asarray(width, dtype=np.int64), np.asarray(height, dtype=np.int64),
                     np.asarray(sha, dtype=str), failed)


def _kill_hook() -> Callable[[], None]:
    """Tests: after ``$TBPS_PARTITION_TEST_KILL_AFTER`` partitions written, SIGKILL ourselves."""
    limit = int(os.environ.get(_KILL_ENV, "0") or 0)
    written = [0]

    def after_write() -> None:
        written[0] += 1
        if limit and written[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return after_write


def embed_partitions(files: Sequence[ImageFile], encoder, work: pathlib.Path, *, partition_size: int,
                     rank: int = 0, world: int = 1, batch_size: int = 64, workers: int | None = None,
                     progress: bool = True) -> dict:
    """Embed this rank's partitions that are not already in ``work``; returns counts."""
    if partition_size <= 0:
        raise IndexInputError(f"partition size must be positive, got {partition_size}")
    work.mkdir(parents=True, exist_ok=True)
    fp, dim = encoder.fingerprint, int(encoder.embed_dim)
    n_parts = (len(files) + partition_size - 1) // partition_size
    after_write = _kill_hook()
    done = reused = 0
    t0 = time.perf_counter()
    for p in range(rank, n_parts, world):
        lo = p * partition_size
        chunk = files[lo:lo + partition_size]
        key = partition_key(fp, chunk)
        if _read_partition(_part_path(work, p), key, dim) is not None:
            reused += 1
            continue
        part = _embed_partition(chunk, lo, encoder, batch_size=batch_size, workers=workers, progress=progress,
                                desc=f"partition {p + 1}/{n_parts}" + (f" (rank {rank})" if world > 1 else ""))
        _write_partition(_part_path(work, p), key, part)
        done += 1
        after_write()
    return {"partitions": n_parts, "embedded_partitions": done, "reused_partitions": reused,
            "embed_seconds": round(time.perf_counter() - t0, 3)}


def _gather(db, files: Sequence[ImageFile], encoder, work: pathlib.Path, partition_size: int,
            features_out: pathlib.Path) -> tuple[int, list[dict]]:
    """Read every partition (all must be present and match) in order, insert its rows into
    ``db`` and its features into the memory-mapped ``features_out``: (item count, skipped files)."""
    fp, dim = encoder.fingerprint, int(encoder.embed_dim)
    n_parts = (len(files) + partition_size - 1) // partition_size
    counts = []
    for p in range(n_parts):  # first pass: every partition is there (and how many items each holds)
        chunk = files[p * partition_size:(p + 1) * partition_size]
        part = _read_partition(_part_path(work, p), partition_key(fp, chunk), dim)
        if part is None:
            raise IndexInputError(f"partition {p} is missing or does not match in {str(work)!r}; run the build again")
        counts.append(len(part.positions))
    out = np.lib.format.open_memmap(features_out, mode="w+", dtype=np.float32, shape=(sum(counts), dim))
    skipped, w = [], 0
    for p in range(n_parts):  # second pass: one partition in memory at a time
        pt = _read_partition(_part_path(work, p), partition_key(fp, files[p * partition_size:(p + 1) * partition_size]), dim)
        out[w:w + len(pt.positions)] = pt.features
        insert_items(db, [(w + j, files[pos], {"width": int(pt.width[j]), "height": int(pt.height[j]),
                                               "sha256": str(pt.sha256[j])})
                          for j, pos in enumerate(pt.positions.tolist())])
        w += len(pt.positions)
        skipped += [{"path": files[i].path, "reason": r} for i, r in pt.failed]
    out.flush()
    del out
    return w, skipped


def build_index_partitioned(path, encoder, files: Sequence[ImageFile], images_root, *, work_dir=None,
                            partition_size: int = DEFAULT_PARTITION_SIZE, rank: int = 0, world: int = 1,
                            barrier: Callable[[], None] | None = None, metadata_csv=None, batch_size: int = 64,
                            workers: int | None = None, progress: bool = True, search_mode: str = "auto",
                            checkpoint: str | None = None, recursive: bool = False, keep_parts: bool = False,
                            overwrite: bool = False) -> dict:
    """Build a new index at ``path`` from ``files`` (``scan_images`` or ``read_file_list``) in
    partitions of ``partition_size`` kept in ``work_dir`` (default ``PATH.parts``).

    rank/world/barrier: this process's share when several run (torchrun); ``barrier()`` must
    return once every rank has called it. Rank 0 publishes and returns the build's stats;
    other ranks return their own counts. The work folder is removed after publishing unless
    ``keep_parts``. An existing index at ``path`` is refused unless ``overwrite`` (then
    replaced atomically).
    """
    t0 = time.perf_counter()
    root = pathlib.Path(path).expanduser().resolve()
    if index_exists(root) and not overwrite:
        raise IndexInputError(f"index {str(root)!r} already exists; use `tbps index add` to update it or --overwrite to rebuild")
    if root.exists() and not root.is_dir():
        raise IndexInputError(f"{str(root)!r} exists and is not a directory")
    ann_mod.choose_mode(0, search_mode)
    require_files(files, images_root)
    work = pathlib.Path(work_dir).expanduser().resolve() if work_dir else root.with_name(root.name + ".parts")
    images_root = pathlib.Path(images_root).expanduser().resolve()
    meta = read_metadata_csv(metadata_csv, images_root) if metadata_csv else None
    counts = embed_partitions(files, encoder, work, partition_size=partition_size, rank=rank, world=world,
                              batch_size=batch_size, workers=workers, progress=progress)
    if barrier is not None:
        barrier()
    if rank != 0:
        return {"rank": rank, **counts}
    stats = _publish(root, encoder, files, images_root, work, partition_size, meta, search_mode=search_mode,
                     checkpoint=checkpoint, recursive=recursive)
    if not keep_parts:
        _remove_parts(work)
    stats.update(counts, scanned=len(files), seconds=round(time.perf_counter() - t0, 3))
    return stats


def _publish(root: pathlib.Path, encoder, files, images_root, work, partition_size, meta, *, search_mode: str,
             checkpoint, recursive: bool) -> dict:
    """Rank 0: one generation from every partition, published as ``build_index`` publishes."""
    fields = {"dim": int(encoder.embed_dim), "fingerprint": json.loads(json.dumps(encoder.fingerprint, default=str)),
              "checkpoint": checkpoint, "images_dir": str(images_root), "recursive": bool(recursive)}
    with GenerationWriter(root, create=True) as writer:
        db = create_db(writer.path("meta"))
        n, skipped = _gather(db, files, encoder, work, partition_size, work / "features.npy")
        matched = unmatched = 0
        csv_cols: list[str] = []
        if meta is not None:
            csv_cols = add_csv_columns(db, meta, [])
            matched, unmatched_paths = apply_csv(db, meta, images_root)
            unmatched = len(unmatched_paths)
        db.commit()
        db.close()
        features = np.load(work / "features.npy", mmap_mode="r")
        fields.update(next_id=n, columns=list(BUILTIN_COLUMNS) + csv_cols, csv_columns=csv_cols)
        manifest = write_generation(writer, fields, search_mode=search_mode, features=features)
        del features
    return {"index": str(root), "generation": manifest["generation"], "count": int(manifest["count"]),
            "added": int(manifest["count"]), "updated": 0, "skipped_count": len(skipped), "skipped": skipped,
            "metadata_rows_matched": matched, "metadata_rows_unmatched": unmatched,
            "search_mode": manifest["search"]["mode"]}


def _remove_parts(work: pathlib.Path) -> None:
    for f in work.glob("part-*.npz"):
        f.unlink(missing_ok=True)
    (work / "features.npy").unlink(missing_ok=True)
    try:
        work.rmdir()
    except OSError as e:  # something else lives there: leave it
        print(f"tbps: note: kept {str(work)!r} ({e.strerror})", file=sys.stderr)


def scan_for_partitions(images_dir, recursive: bool, index_path, metadata_csv=None) -> list[ImageFile]:
    """``scan_images`` leaving out the index, its work folder and the metadata CSV."""
    root = pathlib.Path(index_path).expanduser().resolve()
    exclude = [root, root.with_name(root.name + ".parts")] + ([metadata_csv] if metadata_csv else [])
    return scan_images(images_dir, recursive, exclude=exclude)


def index_exists(path) -> bool:
    return (pathlib.Path(path).expanduser() / MANIFEST).exists()
