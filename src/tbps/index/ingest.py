"""Build, add to and remove from any ``VectorStore`` (``tbps.index.vectorstore``), batch by batch.

``tbps index build|add|remove`` use these for stores other than the local index folder (which
keeps its one-generation-per-command writers in ``tbps.index.build``). The steps are the
folder's: scan the images (``tbps.index.scan``), compare them with what the store recorded
(size and mtime, then SHA-256), embed new and changed files (``tbps.index.embed``) and hand
each batch to ``store.add`` with its CSV values, so a point lands with its metadata. A command
killed midway leaves the batches written before it, searchable and counted; running it again
embeds only what is missing.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Sequence

import numpy as np

from tbps.index.build import _excluded, _match_paths, _plan_add
from tbps.index.embed import embed_files
from tbps.index.errors import IndexInputError
from tbps.index.scan import CsvMetadata, ImageFile, read_metadata_csv, require_files, scan_images
from tbps.index.vectorstore import VectorStore, create_store, open_store, parse_store

_TEST_HOOK_ENV = "TBPS_STORE_TEST_HOOK"  # "batch:N": stop after N batches landed (tests kill the process there)


def _hook():
    spec = os.environ.get(_TEST_HOOK_ENV, "")
    stop = int(spec.split(":", 1)[1]) if spec.startswith("batch:") else None

    def landed(n_batches: int) -> None:
        if stop is not None and n_batches == stop:
            print(f"tbps-store-hook batch {n_batches}", file=sys.stderr, flush=True)
            time.sleep(3600)

    return landed


def _record(f: ImageFile, info: dict, csv_row: dict | None) -> dict:
    rec = {"path": f.path, "relpath": f.relpath, "size": f.size, "mtime": f.mtime_ns / 1e9, "mtime_ns": f.mtime_ns,
           "sha256": info["sha256"], "width": info["width"], "height": info["height"]}
    rec.update(csv_row or {})
    return rec


def _embed_into(store: VectorStore, work: list[ImageFile], replace_ids: Sequence[int], encoder, meta: CsvMetadata | None,
                *, batch_size: int, workers: int | None, progress: bool) -> dict:
    """Embed ``work`` into ``store``: its first ``len(replace_ids)`` files replace those items."""
    rows = meta.rows if meta is not None else {}
    landed = _hook()
    out = {"added": 0, "updated": 0, "skipped": [], "seconds": 0.0}
    t0 = time.perf_counter()
    for n, batch in enumerate(embed_files([f.path for f in work], encoder, batch_size=batch_size, workers=workers,
                                          progress=progress), start=1):
        old = np.asarray(batch.indices, dtype=np.int64) < len(replace_ids)
        recs = [_record(work[i], info, rows.get(work[i].relpath)) for i, info in zip(batch.indices, batch.infos)]
        if old.any():
            store.add(batch.features[old], [r for r, o in zip(recs, old) if o],
                      ids=[replace_ids[i] for i, o in zip(batch.indices, old) if o])
        if (~old).any():
            store.add(batch.features[~old], [r for r, o in zip(recs, old) if not o])
        out["updated"] += int(old.sum())
        out["added"] += int((~old).sum())
        out["skipped"] += [{"path": work[i].path, "reason": r} for i, r in batch.failures]
        landed(n)
    out["seconds"] = time.perf_counter() - t0
    return out


def build_store(spec, encoder, images_dir, *, recursive: bool = False, metadata_csv=None, batch_size: int = 64,
                workers: int | None = None, progress: bool = True, checkpoint=None, overwrite: bool = False) -> dict:
    """``build_index`` for any store: a new store of every image under ``images_dir``."""
    t0 = time.perf_counter()
    s = parse_store(spec)
    local = pathlib.Path(s.path) if s.path else None
    meta = read_metadata_csv(metadata_csv, images_dir) if metadata_csv else None
    files = scan_images(images_dir, recursive, exclude=_excluded(local, metadata_csv) if local else
                        ([metadata_csv] if metadata_csv else []))
    images_root = str(pathlib.Path(images_dir).expanduser().resolve())
    require_files(files, images_root, recursive)
    ckpt = str(pathlib.Path(checkpoint).expanduser().resolve()) if checkpoint else None
    with create_store(s, dim=int(encoder.embed_dim), fingerprint=dict(encoder.fingerprint), checkpoint=ckpt,
                      images_dir=images_root, recursive=recursive, overwrite=overwrite) as store:
        run = _embed_into(store, files, [], encoder, meta, batch_size=batch_size, workers=workers, progress=progress)
        return _stats(store, s.text, files, run, meta, t0)


def add_to_store(spec, encoder, images_dir, *, recursive: bool = False, metadata_csv=None, batch_size: int = 64,
                 workers: int | None = None, progress: bool = True) -> dict:
    """``add_to_index`` for any store: embed only new or changed images; (re)apply CSV values."""
    t0 = time.perf_counter()
    s = parse_store(spec)
    with open_store(s) as store:
        store.check_encoder(encoder)
        meta = read_metadata_csv(metadata_csv, images_dir) if metadata_csv else None
        root = pathlib.Path(images_dir).expanduser().resolve()
        local = pathlib.Path(s.path) if s.path else None
        files = scan_images(images_dir, recursive, exclude=_excluded(local, metadata_csv) if local else
                            ([metadata_csv] if metadata_csv else []))
        known = store.file_states(under=str(root))
        plan = _plan_add(files, known, root, recursive)
        if plan.touched:
            store.update([i for _, i in plan.touched],
                         [{"mtime": f.mtime_ns / 1e9, "mtime_ns": f.mtime_ns} for f, _ in plan.touched])
        run = _embed_into(store, [f for f, _ in plan.changed] + plan.new, [i for _, i in plan.changed], encoder, meta,
                          batch_size=batch_size, workers=workers, progress=progress)
        if meta is not None:  # items not embedded now get their CSV values too
            again = {f.path for f, _ in plan.changed} | {f.path for f in plan.new}
            pairs = [(known[str(root / rel)][0], vals) for rel, vals in meta.rows.items()
                     if str(root / rel) in known and str(root / rel) not in again]
            if pairs:
                store.update([i for i, _ in pairs], [v for _, v in pairs])
        stats = _stats(store, s.text, files, run, meta, t0)
    stats.update(touched=len(plan.touched), missing=plan.missing,
                 unchanged=len(files) - run["added"] - run["updated"] - len(plan.touched) - len(run["skipped"]))
    return stats


def remove_from_store(spec, paths: Sequence[str | os.PathLike]) -> dict:
    """``remove_from_index`` for any store: drop the items at or below ``paths``."""
    t0 = time.perf_counter()
    if not paths:
        raise IndexInputError("no paths given to remove")
    s = parse_store(spec)
    with open_store(s) as store:
        images_root = pathlib.Path(store.info().get("images_dir") or ".")
        drop, not_found = _match_paths(store, paths, images_root)
        removed = store.delete(sorted(drop)) if drop else 0
        return {"index": s.text, "generation": None, "count": len(store), "removed": removed, "not_found": not_found,
                "search_mode": store.search_mode, "seconds": round(time.perf_counter() - t0, 3)}


def _stats(store: VectorStore, name: str, files: list, run: dict, meta: CsvMetadata | None, t0: float) -> dict:
    n_emb = run["added"] + run["updated"]
    matched = 0
    if meta is not None:
        matched = sum(1 for f in files if f.relpath in meta.rows)
    return {"index": name, "generation": None, "count": len(store), "scanned": len(files), "added": run["added"],
            "updated": run["updated"], "skipped_count": len(run["skipped"]), "skipped": run["skipped"],
            "metadata_rows_matched": matched,
            "metadata_rows_unmatched": (len(meta.rows) - matched) if meta is not None else 0,
            "search_mode": store.search_mode, "embed_seconds": round(run["seconds"], 3),
            "images_per_s": round(n_emb / run["seconds"], 2) if run["seconds"] > 0 and n_emb else 0.0,
            "seconds": round(time.perf_counter() - t0, 3)}
