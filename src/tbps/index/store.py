"""The on-disk gallery index and its reader, ``GalleryIndex``.

Layout: INDEX is a directory. Each committed state is a *generation* ``g`` made of

    features-<g>.npy   (N, D) float32, L2-normalised image features, row i <-> ids[i]
    ids-<g>.npy        (N,) int64, stable item ids, strictly increasing
    meta-<g>.sqlite    table ``items``: id + path, size, mtime, sha256, width, height + CSV columns
    ann-<g>.faiss      optional faiss structure (IVF/HNSW) labelled by item id

named by ``manifest.json``, which is replaced atomically as the very last step of a write.
Readers only follow the manifest, so a writer killed at any moment leaves the previous
generation (or the complete new one) in force. Committed files are never modified again.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from tbps.index import ann as ann_mod
from tbps.index.errors import EncoderMismatchError, IndexFormatError, QueryError
from tbps.index.filters import compile_where

FORMAT = "tbps-gallery-index"
VERSION = 1
MANIFEST = "manifest.json"
# Columns every item has; CSV columns come after these.
BUILTIN_COLUMNS = ("id", "path", "relpath", "size", "mtime", "sha256", "width", "height")
# Internal columns (change detection), not shown in metadata nor usable in filters.
INTERNAL_COLUMNS = ("mtime_ns",)
# Fingerprint keys that do not change what the features mean.
_IGNORED_FINGERPRINT_KEYS = {"device", "checkpoint_path"}
# With a filter that keeps at most this many items, search them exactly instead of via ANN.
EXACT_SUBSET_MAX = 50_000
_CHUNK_ROWS = 32_768  # rows per block of exact search: 32768 x 512 x 4 B = 64 MB

Reranker = Callable[[np.ndarray, np.ndarray, np.ndarray, "GalleryIndex"], np.ndarray]


@dataclass
class Hit:
    """One search result."""

    id: int  # stable integer id of the gallery item inside this index
    score: float
    path: str  # absolute image path
    metadata: dict = field(default_factory=dict)  # width, height, mtime, sha256, size, relpath + CSV columns

    def to_dict(self) -> dict:
        return {"id": self.id, "score": self.score, "path": self.path, "metadata": self.metadata}


def gen_files(gen: int, with_ann: bool) -> dict[str, str | None]:
    return {
        "features": f"features-{gen}.npy",
        "ids": f"ids-{gen}.npy",
        "meta": f"meta-{gen}.sqlite",
        "ann": f"ann-{gen}.faiss" if with_ann else None,
    }


def read_manifest(root: pathlib.Path) -> dict:
    """Read and validate ``root/manifest.json``; ``IndexFormatError`` names what is wrong."""
    if not root.exists():
        raise IndexFormatError(f"index {str(root)!r} does not exist (create it with `tbps index build`)")
    if not root.is_dir():
        raise IndexFormatError(f"{str(root)!r} is not an index directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise IndexFormatError(
            f"{str(root)!r} is not a tbps index (no {MANIFEST}); create it with `tbps index build`"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"corrupt index manifest {str(mpath)!r}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{str(mpath)!r} is not a tbps gallery index manifest")
    if manifest.get("version") != VERSION:
        raise IndexFormatError(
            f"index {str(root)!r} has format version {manifest.get('version')!r}; "
            f"this tbps reads version {VERSION}"
        )
    for key in ("generation", "files", "count", "dim", "fingerprint", "columns", "search"):
        if key not in manifest:
            raise IndexFormatError(f"corrupt index manifest {str(mpath)!r}: missing key {key!r}")
    _check_file_names(root, mpath, manifest["files"])
    return manifest


def _check_file_names(root: pathlib.Path, mpath: pathlib.Path, files: Any) -> None:
    """Every file a manifest names is a plain name of a file inside ``root``: no folder part, no
    ``..``, no absolute path, no symlink that leads out (a received index must not make tbps read,
    copy or delete files elsewhere)."""
    if not isinstance(files, dict) or not all(isinstance(k, str) for k in files):
        raise IndexFormatError(f"corrupt index manifest {str(mpath)!r}: 'files' is not a table of file names")
    real_root = root.resolve()
    for kind, name in files.items():
        if name is None and kind == "ann":
            continue
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
                or os.path.isabs(name)):
            raise IndexFormatError(f"unsafe index manifest {str(mpath)!r}: file {kind!r} is {name!r}, "
                                   "not a plain file name inside the index folder")
        target = root / name
        if target.is_symlink() and real_root not in target.resolve().parents:
            raise IndexFormatError(f"unsafe index manifest {str(mpath)!r}: file {kind!r} ({name}) is a symlink "
                                   "that leads outside the index folder")


def fingerprint_diff(expected: dict, got: dict) -> list[str]:
    """Human-readable differences between two encoder fingerprints (ignoring device etc.)."""
    keys = (set(expected) | set(got)) - _IGNORED_FINGERPRINT_KEYS
    diffs = []
    for key in sorted(keys):
        a, b = expected.get(key, "<missing>"), got.get(key, "<missing>")
        if _norm(a) != _norm(b):
            diffs.append(f"{key}: index has {a!r}, encoder has {b!r}")
    return diffs


def _norm(v: Any) -> Any:
    # JSON round trips turn tuples into lists and may change float repr; compare canonically.
    return json.loads(json.dumps(v, sort_keys=True, default=str))


class GalleryIndex:
    """A read-only view of one committed generation of a gallery index.

    Open with ``GalleryIndex.open(path)``. Features are memory-mapped, so opening a
    million-item index is instant and its pages are shared between processes.
    Thread-safe for concurrent ``search``/``get`` calls.
    """

    def __init__(self, root: pathlib.Path, manifest: dict, features: np.ndarray, ids: np.ndarray,
                 db: sqlite3.Connection, ann_index: Any | None):
        self.root = root
        self.manifest = manifest
        self.features = features  # (N, D) float32, memory-mapped
        self.ids = ids  # (N,) int64 sorted
        self._db = db
        self._db_lock = threading.Lock()
        self._ann = ann_index
        self.fingerprint: dict = manifest["fingerprint"]
        self.columns: list[str] = list(manifest["columns"])
        self.search_mode: str = manifest["search"]["mode"]
        self.search_params: dict = dict(manifest["search"].get("params", {}))
        self.generation: int = int(manifest["generation"])

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path, *, mmap: bool = True) -> "GalleryIndex":
        """Open the index directory ``path``; ``IndexFormatError`` if missing, foreign or corrupt.

        mmap: memory-map the features (default; instant open, pages shared between
        processes) or read them into memory. The ANN structure, if any, is always read
        into memory. The view stays on the generation it opened: open again to see writes.
        """
        root = pathlib.Path(path).expanduser().resolve()
        for attempt in range(3):
            manifest = read_manifest(root)
            try:
                return cls._open_generation(root, manifest, mmap)
            except FileNotFoundError as e:
                # A writer may have replaced the manifest and cleaned up between our reads.
                if attempt == 2 or read_manifest(root)["generation"] == manifest["generation"]:
                    raise IndexFormatError(f"corrupt index {str(root)!r}: missing file {e.filename!r}") from e
        raise AssertionError("unreachable")

    @classmethod
    def _open_generation(cls, root: pathlib.Path, manifest: dict, mmap: bool) -> "GalleryIndex":
        files = manifest["files"]
        n, d = int(manifest["count"]), int(manifest["dim"])
        fpath, ipath, mpath = root / files["features"], root / files["ids"], root / files["meta"]
        for p in (fpath, ipath, mpath):
            if not p.is_file():
                raise FileNotFoundError(2, "missing", str(p))
        try:
            features = np.load(fpath, mmap_mode="r" if mmap else None, allow_pickle=False)
            ids = np.load(ipath, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise IndexFormatError(f"corrupt index file {str(fpath)!r} or {str(ipath)!r}: {e}") from e
        if features.dtype != np.float32 or features.shape != (n, d):
            raise IndexFormatError(
                f"corrupt index {str(root)!r}: features are {features.dtype}{features.shape}, "
                f"manifest says float32({n}, {d})"
            )
        if ids.dtype != np.int64 or ids.shape != (n,) or (n > 1 and not np.all(ids[1:] > ids[:-1])):
            raise IndexFormatError(f"corrupt index {str(root)!r}: ids file does not match the features")
        # The committed sqlite file never changes: immutable=1 skips locking entirely.
        uri = "file:" + pathlib.Path(mpath).as_posix().replace("?", "%3f").replace("#", "%23") + "?mode=ro&immutable=1"
        try:
            db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            (count,) = db.execute("SELECT COUNT(*) FROM items").fetchone()
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(f"corrupt index metadata {str(mpath)!r}: {e}") from e
        if count != n:
            db.close()
            raise IndexFormatError(f"corrupt index {str(root)!r}: {count} metadata rows for {n} features")
        ann_index = None
        if files.get("ann"):
            apath = root / files["ann"]
            if not apath.is_file():
                raise FileNotFoundError(2, "missing", str(apath))
            try:
                ann_index = ann_mod.read(apath)
            except RuntimeError as e:
                raise IndexFormatError(f"corrupt ANN index {str(apath)!r}: {e}") from e
            if ann_index.ntotal != n:
                raise IndexFormatError(f"corrupt index {str(root)!r}: ANN holds {ann_index.ntotal} of {n} items")
        return cls(root, manifest, features, ids, db, ann_index)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "GalleryIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- description --------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def checkpoint(self) -> str | None:
        """Path of the checkpoint the index was built with (as recorded at build time)."""
        return self.manifest.get("checkpoint")

    def info(self) -> dict:
        """Counts, model fingerprint, sizes on disk and search mode, as a JSON-able dict."""
        sizes = {}
        for kind, name in self.manifest["files"].items():
            if name:
                try:
                    sizes[kind] = (self.root / name).stat().st_size
                except FileNotFoundError:
                    sizes[kind] = None
        sizes["total"] = sum(v for v in sizes.values() if v)
        m = self.manifest
        return {
            "path": str(self.root),
            "generation": self.generation,
            "count": len(self),
            "dim": self.dim,
            "checkpoint": m.get("checkpoint"),
            "fingerprint": self.fingerprint,
            "images_dir": m.get("images_dir"),
            "recursive": m.get("recursive"),
            "columns": self.columns,
            "csv_columns": m.get("csv_columns", []),
            "search_mode": self.search_mode,
            "search_mode_requested": m["search"].get("requested", "auto"),
            "search_params": self.search_params,
            "sizes_bytes": sizes,
            "created": m.get("created"),
            "updated": m.get("updated"),
        }

    def check_encoder(self, encoder) -> None:
        """Raise ``EncoderMismatchError`` unless ``encoder.fingerprint`` matches the index's."""
        got = getattr(encoder, "fingerprint", None)
        if not isinstance(got, dict):
            raise EncoderMismatchError("the encoder has no fingerprint; cannot check it against the index")
        diffs = fingerprint_diff(self.fingerprint, got)
        if any(d.startswith("checkpoint_sha256:") for d in diffs) and self._same_checkpoint_path(encoder):
            raise EncoderMismatchError(self._changed_checkpoint_message())
        if diffs:
            raise EncoderMismatchError(
                f"the encoder does not match the one that built index {str(self.root)!r} "
                f"({'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}). Use the checkpoint "
                f"the index was built with ({self.checkpoint}) or rebuild the index."
            )

    def _same_checkpoint_path(self, encoder) -> bool:
        """Whether ``encoder`` was loaded from the path this index records (then the file changed)."""
        ours, theirs = self.checkpoint, getattr(encoder, "checkpoint", None)
        if not ours or not isinstance(theirs, (str, os.PathLike)):
            return False
        with contextlib.suppress(OSError):
            return os.path.samefile(ours, theirs)
        return os.path.abspath(ours) == os.path.abspath(theirs)

    def _changed_checkpoint_message(self) -> str:
        import datetime as dt

        try:
            mtime = dt.datetime.fromtimestamp(os.stat(self.checkpoint).st_mtime, dt.timezone.utc)
            when = f"the file was last modified {mtime.isoformat(timespec='seconds')}"
        except OSError:
            when = "the file cannot be read now"
        return (f"the checkpoint {self.checkpoint} has changed since index {str(self.root)!r} was built with it "
                f"(built {self.manifest.get('created') or 'at an unknown time'}; {when}), e.g. a new "
                "training run wrote over it. Rebuild the index (`tbps index build --overwrite`) or pass "
                "--checkpoint with a copy of the checkpoint it was built with.")

    # -- rows, for writers (tbps.index.build) ---------------------------------------------
    def file_states(self) -> dict[str, tuple[int, int | None, int | None, str | None]]:
        """What the index recorded of every item's file: ``{path: (id, size, mtime_ns, sha256)}``.

        ``add_to_index`` compares these with the files on disk; items written by
        ``build_index_from_features`` have None for size, mtime_ns and sha256.
        """
        with self._db_lock:
            rows = self._db.execute("SELECT id, path, size, mtime_ns, sha256 FROM items").fetchall()
        return {p: (i, size, mns, sha) for i, p, size, mns, sha in rows}

    def ids_under(self, path: str) -> list[int]:
        """Ids of the item whose image path is exactly ``path`` and of every item below the
        folder ``path`` (compared as text: give it absolute, without a trailing separator)."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT id FROM items WHERE path = ? OR substr(path, 1, ?) = ?",
                (path, len(path) + 1, path + os.sep),
            ).fetchall()
        return [r[0] for r in rows]

    # -- lookup -------------------------------------------------------------------------
    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, ids)

    def _fetch(self, ids: Sequence[int]) -> dict[int, dict]:
        """Metadata rows for ``ids``, as ``{id: {column: value}}``."""
        out: dict[int, dict] = {}
        ids = [int(i) for i in ids]
        with self._db_lock:
            for s in range(0, len(ids), 900):  # SQLite caps bound parameters per statement
                part = ids[s : s + 900]
                cur = self._db.execute(
                    f"SELECT * FROM items WHERE id IN ({', '.join('?' * len(part))})", part
                )
                names = [c[0] for c in cur.description]
                for row in cur:
                    rec = dict(zip(names, row))
                    for k in INTERNAL_COLUMNS:
                        rec.pop(k, None)
                    out[int(rec["id"])] = rec
        return out

    def get(self, item_id: int, score: float = float("nan")) -> Hit:
        """The item with id ``item_id`` as a ``Hit`` (score NaN unless given); ``KeyError`` if unknown."""
        rec = self._fetch([item_id]).get(int(item_id))
        if rec is None:
            raise KeyError(f"no item with id {item_id} in index {str(self.root)!r}")
        return _hit(rec, score)

    def image_path(self, item_id: int) -> pathlib.Path:
        """Absolute path of item ``item_id``'s image; ``KeyError`` if unknown."""
        return pathlib.Path(self.get(item_id).path)

    def feature(self, item_id: int) -> np.ndarray:
        """The stored (D,) feature of item ``item_id``; ``KeyError`` if unknown."""
        row = int(self._rows_of(np.asarray([item_id]))[0])
        if row >= len(self.ids) or self.ids[row] != item_id:
            raise KeyError(f"no item with id {item_id} in index {str(self.root)!r}")
        return np.asarray(self.features[row])

    def filter_ids(self, where: str | dict[str, object]) -> np.ndarray:
        """Sorted int64 ids of the items matching ``where``: a filter expression, or a
        ``{column: value}`` dict whose pairs must all match (see ``tbps.index.filters``)."""
        sql, params = compile_where(where, self.columns)
        with self._db_lock:
            try:
                rows = self._db.execute(f"SELECT id FROM items WHERE {sql} ORDER BY id", params).fetchall()
            except (sqlite3.Error, OverflowError) as e:  # e.g. too many parameters, an integer over 64 bits
                raise QueryError(f"cannot evaluate filter {where!r}: {e}") from e
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    # -- search -------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10, *, where: str | dict[str, object] | None = None,
               reranker: Reranker | None = None, rerank_depth: int | None = None,
               exact: bool = False) -> list[list[Hit]]:
        """Top-``k`` gallery items for each query, best first.

        queries: (D,) or (Q, D) L2-normalised float32 features (text or image embeddings of
        the encoder that built the index). k larger than the gallery (or the filtered subset)
        returns all of it. where: filter expression over ``self.columns``, or a ``{column:
        value}`` dict whose pairs must all match (see ``tbps.index.filters``). reranker: ``callable(query_feats (Q, D), cand_ids (Q, K'),
        cand_scores (Q, K'), index) -> new scores (Q, K')`` applied to the top K' =
        max(k, rerank_depth or 100) candidates; results are re-sorted by the new scores.
        exact: force exact search even when the index has an ANN structure.
        Returns one list of ``Hit`` per query.
        """
        q = check_queries(queries, self.dim)
        k = check_k(k)
        allowed = self.filter_ids(where) if where is not None else None
        n_avail = len(self) if allowed is None else len(allowed)
        if n_avail == 0:
            return [[] for _ in range(len(q))]
        depth = k
        if reranker is not None:
            depth = max(k, int(rerank_depth) if rerank_depth else 100)
        depth = min(depth, n_avail)
        cand_ids, cand_scores = self._candidates(q, depth, allowed, exact)
        if reranker is not None:
            new = np.asarray(reranker(q, cand_ids, cand_scores, self), dtype=np.float64)
            if new.shape != cand_scores.shape:
                raise QueryError(f"reranker returned scores of shape {new.shape}, expected {cand_scores.shape}")
            cand_scores = new
            cand_ids, cand_scores = _sort_rows(cand_ids, cand_scores)
        return self._hits(zip(cand_ids[:, :k], cand_scores[:, :k]))

    def search_many(self, queries: np.ndarray, ks: Sequence[int]) -> list[list[Hit]]:
        """``[search(queries[i], k=ks[i])[0] for i in ...]``: the same hits, each query ranked
        alone as ``search`` ranks it, at less cost per query (one BLAS thread limit and one
        metadata read for all). No filter, no reranker: a server's batch of plain text queries."""
        q, ks = check_many(queries, ks, self.dim)
        if len(self) == 0:
            return [[] for _ in ks]
        with _blas_threads(1):
            cands = [self._candidates(q[i : i + 1], min(k, len(self)), None, False) for i, k in enumerate(ks)]
        return self._hits((ids[0], sc[0]) for ids, sc in cands)

    def _hits(self, ranked) -> list[list[Hit]]:
        """One list of ``Hit`` per ``(ids (K,), scores (K,))`` row of ``ranked`` (-1 ids pad),
        with one metadata read for all rows."""
        ranked = list(ranked)
        every = np.concatenate([np.ravel(ids) for ids, _ in ranked]) if ranked else np.zeros(0, np.int64)
        recs = self._fetch(np.unique(every[every >= 0]))
        return [[_hit(recs[int(i)], float(s)) for i, s in zip(ids, sc) if i >= 0] for ids, sc in ranked]

    def _candidates(self, q: np.ndarray, depth: int, allowed: np.ndarray | None,
                    exact: bool) -> tuple[np.ndarray, np.ndarray]:
        """Top-``depth`` (ids, exact scores), each (Q, depth), sorted by score desc then id."""
        use_ann = (
            self._ann is not None and not exact
            and (allowed is None or len(allowed) > EXACT_SUBSET_MAX)
        )
        if not use_ann:
            rows = None if allowed is None else self._rows_of(allowed)
            return exact_topk(self.features, self.ids, q, depth, rows)
        # ANN proposes candidates; rescore them exactly against the stored features.
        n_avail = len(self) if allowed is None else len(allowed)
        # extra candidates absorb the codes' rounding (8-bit IVF: 3x; PQ: more, see ann.candidates)
        n_cand = min(ann_mod.candidates(self.search_mode, depth, self.search_params), n_avail)
        by_row = ann_mod.LABELS[self.search_mode] == "row"
        if allowed is not None and by_row:
            allowed = self._rows_of(allowed)
        labels = ann_mod.search(self._ann, self.search_mode, q, n_cand, self.search_params, allowed)
        out_ids = np.full((len(q), depth), -1, dtype=np.int64)
        out_sc = np.full((len(q), depth), -np.inf, dtype=np.float64)
        for i in range(len(q)):
            lab = labels[i][labels[i] >= 0]
            if len(lab) == 0:
                continue
            rows = np.sort(lab if by_row else self._rows_of(lab))
            sc = np.asarray(self.features[rows], dtype=np.float32) @ q[i]
            lab = self.ids[rows]
            order = np.lexsort((lab, -sc))[:depth]
            out_ids[i, : len(order)] = lab[order]
            out_sc[i, : len(order)] = sc[order]
        return out_ids, out_sc


def check_queries(queries, dim: int) -> np.ndarray:
    """Query features as a (Q, D) float32 array; a wrong shape, no query or a NaN raises :class:`QueryError`."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise QueryError(f"queries must have shape (D,) or (Q, D) with D={dim}, got {np.shape(queries)}")
    if len(q) == 0:
        raise QueryError("no queries given")
    if not np.all(np.isfinite(q)):
        raise QueryError("queries contain NaN or infinite values")
    return q


def check_k(k) -> int:
    """``k`` as an int, or ``QueryError`` unless it is a positive integer."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise QueryError(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_many(queries, ks: Sequence[int], dim: int) -> tuple[np.ndarray, list[int]]:
    """``search_many``'s arguments checked: (Q, D) queries and one positive k per query."""
    q = check_queries(queries, dim)
    ks = [check_k(k) for k in ks]
    if len(ks) != len(q):
        raise QueryError(f"{len(ks)} values of k for {len(q)} queries")
    return q, ks


def exact_topk(features: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int,
               rows: np.ndarray | None = None, chunk: int = _CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product of ``q`` (Q, D) against ``features`` (N, D).

    rows: optional sorted subset of rows to consider. Streams over the (memory-mapped)
    features in blocks of ``chunk`` rows, so memory stays bounded at any gallery size.
    Returns (ids, scores), each (Q, k'), k' = min(k, candidates), sorted by score desc, id asc.
    """
    with _blas_threads(1 if len(q) <= 4 else None):
        return _exact_topk(features, ids, q, k, rows, chunk)


_BLAS = None
_BLAS_DEPTH = threading.local()  # .depth: limits this thread is inside now


def _blas_threads(limit: int | None):
    """Limit BLAS threads for a block (a few queries are a memory-bound matrix-vector
    product: extra threads only contend, badly so on a busy machine). Needs the optional
    threadpoolctl; without it, or with ``limit=None``, a no-op. A block inside another one of
    the same thread (``search_many``'s queries) keeps the outer limit, at no cost: setting and
    restoring the limit costs more than searching a small gallery."""
    global _BLAS
    if limit is None:
        return contextlib.nullcontext()
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except Exception:  # not installed, or no BLAS found
            _BLAS = False
    if _BLAS is False:
        return contextlib.nullcontext()
    return _outer_blas_limit(_BLAS, limit)


@contextlib.contextmanager
def _outer_blas_limit(controller, limit: int):
    depth = getattr(_BLAS_DEPTH, "depth", 0)
    _BLAS_DEPTH.depth = depth + 1
    try:
        if depth:
            yield
        else:
            with controller.limit(limits=limit, user_api="blas"):
                yield
    finally:
        _BLAS_DEPTH.depth = depth


def _exact_topk(features, ids, q, k, rows, chunk):
    n = len(features) if rows is None else len(rows)
    k = min(k, n)
    nq = len(q)
    best_ids = np.empty((nq, 0), dtype=np.int64)
    best_sc = np.empty((nq, 0), dtype=np.float32)
    qt = np.ascontiguousarray(q.T)  # (D, Q)
    for s in range(0, n, chunk):
        if rows is None:
            block = features[s : s + chunk]
            block_ids = ids[s : s + chunk]
        else:
            r = rows[s : s + chunk]
            block = features[r]
            block_ids = ids[r]
        sc = (block @ qt).T  # (Q, b)
        if sc.shape[1] > k:
            part = np.argpartition(-sc, k - 1, axis=1)[:, :k]  # (Q, k)
            sc = np.take_along_axis(sc, part, axis=1)
            cid = block_ids[part]
        else:
            cid = np.broadcast_to(block_ids, sc.shape)
        best_sc = np.concatenate([best_sc, sc], axis=1)
        best_ids = np.concatenate([best_ids, cid], axis=1)
        if best_sc.shape[1] > k:
            part = np.argpartition(-best_sc, k - 1, axis=1)[:, :k]
            best_sc = np.take_along_axis(best_sc, part, axis=1)
            best_ids = np.take_along_axis(best_ids, part, axis=1)
    return _sort_rows(best_ids, best_sc.astype(np.float64))


def _sort_rows(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score descending, ties by id ascending (deterministic output)."""
    ids = np.asarray(ids)
    scores = np.asarray(scores)
    out_i = np.empty_like(ids)
    out_s = np.empty_like(scores)
    for r in range(len(ids)):
        order = np.lexsort((ids[r], -scores[r]))
        out_i[r] = ids[r][order]
        out_s[r] = scores[r][order]
    return out_i, out_s


def _hit(rec: dict, score: float) -> Hit:
    meta = {k: v for k, v in rec.items() if k not in ("id", "path")}
    return Hit(id=int(rec["id"]), score=score, path=rec["path"], metadata=meta)
