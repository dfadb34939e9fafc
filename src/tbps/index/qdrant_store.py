"""``QdrantStore``: a gallery in a Qdrant collection, through ``qdrant-client``.

One client, two engines: ``qdrant:PATH`` runs Qdrant's local engine in this process (a folder,
no server; tests and small galleries), ``qdrant://HOST:PORT/COLLECTION`` a Qdrant server or
cluster (sharding, replication and HNSW are the server's business).

Layout: one point per item, point id = item id, the unit feature as a dot-product vector, and
the record as payload (``id``, ``path``, ``relpath``, ``size``, ``mtime``, ``sha256``,
``width``, ``height``, metadata columns; internal: ``mtime_ns`` and ``tbps_dirs``, the
folders above the path, so that removing a folder is one filter). The store's manifest (the
encoder fingerprint, checkpoint, columns and their types, the next id) lives in the
collection's own metadata under ``"tbps"``.

Crash safety: a point (vector + payload) lands whole or not at all, and counts come from the
engine, so after a killed write ``count`` / ``info`` say exactly what is searchable. New ids
are reserved in the manifest before their points are written, so ids are never reused, even
after a kill (a killed write leaves a gap in the ids). Unlike the folder store, a write is not
all-or-nothing: a killed ``index add`` leaves the batches that landed, and running it again
embeds only the rest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import math
import os
import pathlib
import pickle
import sqlite3
import threading
from typing import Sequence

import numpy as np

from tbps.index.errors import (
    EncoderMismatchError, FilterError, IndexBusyError, IndexFormatError, IndexInputError, QueryError,
)
from tbps.index.filter_tree import parse_filter
from tbps.index.local_store import check_features, check_records, column_type
from tbps.index.qdrant_filter import qdrant_filter
from tbps.index.store import BUILTIN_COLUMNS, Hit, _sort_rows, check_k, check_many, check_queries, fingerprint_diff
from tbps.index.storespec import StoreSpec

FORMAT = "tbps-qdrant-store"
VERSION = 1
META_KEY = "tbps"
DIRS_KEY = "tbps_dirs"
_HIDDEN = ("id", "path", "mtime_ns", DIRS_KEY)  # payload keys that are not Hit.metadata
BUILTIN_TYPES = {"id": "INTEGER", "path": "TEXT", "relpath": "TEXT", "size": "INTEGER", "mtime": "REAL",
                 "sha256": "TEXT", "width": "INTEGER", "height": "INTEGER"}
_PAGE = 1024
_MAX_ID = 2**63


def _qdrant():
    try:
        from qdrant_client import QdrantClient, models
    except ImportError:
        raise IndexInputError("the qdrant store needs qdrant-client: pip install 'tbps[qdrant]'") from None
    return QdrantClient, models


class _PointsOnly(pickle.Unpickler):
    """Unpickles only what qdrant's local engine stores: points, lists, numbers, strings."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("qdrant_client.http.models.models", "PointStruct"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def check_local_storage(folder: str) -> None:
    """Refuse a local engine folder whose storage holds anything but plain points.

    qdrant-client's local engine keeps points as pickles and unpickles them when it opens the
    folder, so a crafted folder could run code; each pickle is read here first with an
    unpickler that builds nothing but ``PointStruct``, dicts, lists, numbers and strings."""
    for db_path in sorted(pathlib.Path(folder).glob("collection/*/storage.sqlite")):
        try:
            db = sqlite3.connect(f"file:{db_path.as_posix()}?mode=ro", uri=True)
            try:
                for (blob,) in db.execute("SELECT point FROM points"):
                    _PointsOnly(io.BytesIO(blob)).load()
            finally:
                db.close()
        except (sqlite3.Error, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise IndexFormatError(f"refusing to open qdrant store {folder!r}: {db_path.name} in "
                                   f"{db_path.parent.name!r} holds something other than points ({e})") from None


def _connect(spec: StoreSpec):
    QdrantClient, _ = _qdrant()
    if spec.path is not None:
        if os.path.exists(spec.path) and not os.path.isdir(spec.path):
            raise IndexInputError(f"{spec.path!r} exists and is not a folder")
        check_local_storage(spec.path)
        try:
            return QdrantClient(path=spec.path)
        except RuntimeError as e:
            if "already accessed" in str(e):
                raise IndexBusyError(f"another process has qdrant store {spec.text!r} open (the local engine "
                                     "allows one; use a Qdrant server for concurrent access)") from None
            raise IndexFormatError(f"cannot open qdrant store {spec.text!r}: {e}") from None
        except (ValueError, OSError, KeyError) as e:
            raise IndexFormatError(f"cannot open qdrant store {spec.text!r}: {e}") from None
    return QdrantClient(url=spec.url, api_key=os.environ.get("QDRANT_API_KEY") or None, timeout=60)


@contextlib.contextmanager
def _engine_errors(spec: StoreSpec):
    """Connection and server errors as one line naming the store."""
    from qdrant_client.http.exceptions import ApiException, ResponseHandlingException, UnexpectedResponse

    try:
        yield
    except (ResponseHandlingException, UnexpectedResponse, ApiException, ConnectionError) as e:
        raise IndexFormatError(f"qdrant store {spec.text!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_manifest(client, spec: StoreSpec) -> dict:
    with _engine_errors(spec):
        if not client.collection_exists(spec.collection):
            raise IndexFormatError(f"store {spec.text!r} does not exist (create it with `tbps index build`)")
        meta = client.get_collection(spec.collection).config.metadata or {}
    m = meta.get(META_KEY)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise IndexFormatError(f"qdrant collection {spec.collection!r} of {spec.text!r} is not a tbps store")
    if m.get("version") != VERSION:
        raise IndexFormatError(f"store {spec.text!r} has format version {m.get('version')!r}; this tbps reads {VERSION}")
    for key in ("dim", "fingerprint", "columns", "types", "next_id"):
        if key not in m:
            raise IndexFormatError(f"corrupt tbps manifest in {spec.text!r}: missing key {key!r}")
    return m


class QdrantStore:
    """A ``VectorStore`` in a Qdrant collection; open with ``QdrantStore.open(spec)``."""

    def __init__(self, spec: StoreSpec, client, manifest: dict):
        self.spec = spec
        self.collection = spec.collection
        self._client = client
        self._lock = threading.RLock()  # the local engine is not thread-safe; a server is, cheaply
        self.search_params: dict = {}
        self._use(manifest)

    def _use(self, manifest: dict) -> None:
        self.manifest = manifest
        self.fingerprint: dict = manifest["fingerprint"]
        self.columns: list[str] = list(manifest["columns"])
        self.types: dict[str, str] = dict(manifest["types"])
        self.search_mode = "qdrant-exact" if self.spec.path is not None else "qdrant-hnsw"

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, spec: StoreSpec) -> "QdrantStore":
        if spec.path is not None and not os.path.isfile(os.path.join(spec.path, "meta.json")):
            raise IndexFormatError(f"store {spec.text!r} does not exist (create it with `tbps index build`)")
        client = _connect(spec)
        try:
            return cls(spec, client, _read_manifest(client, spec))
        except BaseException:
            client.close()
            raise

    @classmethod
    def create(cls, spec: StoreSpec, *, dim: int, fingerprint: dict, checkpoint: str | None = None,
               images_dir: str | None = None, recursive: bool = False, overwrite: bool = False) -> "QdrantStore":
        """A new, empty collection; ``overwrite`` deletes an existing tbps store first (not atomic)."""
        _, models = _qdrant()
        if spec.path is not None and os.path.isdir(spec.path) and os.listdir(spec.path) \
                and not os.path.isfile(os.path.join(spec.path, "meta.json")):
            raise IndexInputError(f"{spec.path!r} is a non-empty folder that is not a qdrant store; choose another path")
        client = _connect(spec)
        try:
            with _engine_errors(spec):
                if client.collection_exists(spec.collection):
                    _read_manifest(client, spec)  # never delete a collection that is not ours
                    if not overwrite:
                        raise IndexInputError(f"store {spec.text!r} already exists; use `tbps index add` to update "
                                              "it or --overwrite to rebuild")
                    client.delete_collection(spec.collection)
                stamp = _now()
                manifest = {"format": FORMAT, "version": VERSION, "dim": int(dim), "next_id": 0,
                            "fingerprint": json_safe(fingerprint), "checkpoint": checkpoint, "images_dir": images_dir,
                            "recursive": bool(recursive), "columns": list(BUILTIN_COLUMNS), "csv_columns": [],
                            "types": dict(BUILTIN_TYPES), "created": stamp, "updated": stamp}
                client.create_collection(spec.collection, metadata={META_KEY: manifest},
                                         vectors_config=models.VectorParams(size=int(dim), distance=models.Distance.DOT))
                if spec.path is None:  # payload indexes: filters and removals stay fast on a server
                    for key, schema in (("path", "keyword"), (DIRS_KEY, "keyword"), ("id", "integer")):
                        client.create_payload_index(spec.collection, key, field_schema=schema)
            return cls(spec, client, manifest)
        except BaseException:
            client.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._client.close()

    def __enter__(self) -> "QdrantStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- description --------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def checkpoint(self) -> str | None:
        return self.manifest.get("checkpoint")

    def count(self, where=None) -> int:
        flt = self._filter(where) if where is not None else None
        with self._lock, _engine_errors(self.spec):
            return int(self._client.count(self.collection, count_filter=flt, exact=True).count)

    def __len__(self) -> int:
        return self.count()

    def info(self) -> dict:
        """What ``tbps index info`` prints: ``count`` is the engine's own count of points."""
        with self._lock, _engine_errors(self.spec):
            self._use(_read_manifest(self._client, self.spec))
            coll = self._client.get_collection(self.collection)
        m = self.manifest
        sizes = {}
        if self.spec.path is not None:
            for f in pathlib.Path(self.spec.path).glob(f"collection/{self.collection}/*"):
                sizes[f.name] = f.stat().st_size
            sizes["total"] = sum(sizes.values())
        return {
            "path": self.spec.text, "backend": "qdrant",
            "engine": "local (in-process)" if self.spec.path is not None else self.spec.url,
            "collection": self.collection, "generation": None, "count": self.count(), "dim": self.dim,
            "next_id": int(m["next_id"]), "checkpoint": m.get("checkpoint"), "fingerprint": self.fingerprint,
            "images_dir": m.get("images_dir"), "recursive": m.get("recursive"), "columns": self.columns,
            "csv_columns": m.get("csv_columns", []), "search_mode": self.search_mode,
            "search_mode_requested": "auto", "search_params": self.search_params,
            "engine_status": str(getattr(coll.status, "value", coll.status)),
            "indexed_vectors": coll.indexed_vectors_count, "sizes_bytes": sizes,
            "created": m.get("created"), "updated": m.get("updated"),
        }

    def check_encoder(self, encoder) -> None:
        got = getattr(encoder, "fingerprint", None)
        if not isinstance(got, dict):
            raise EncoderMismatchError("the encoder has no fingerprint; cannot check it against the store")
        diffs = fingerprint_diff(self.fingerprint, got)
        if diffs:
            raise EncoderMismatchError(
                f"the encoder does not match the one that built store {self.spec.text!r} "
                f"({'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}). Use the checkpoint "
                f"the store was built with ({self.checkpoint}) or rebuild it."
            )

    # -- reading ------------------------------------------------------------------------
    def _filter(self, where):
        try:
            return qdrant_filter(parse_filter(where, self.columns), self.types)
        except FilterError:
            # another process (a server's other writer) may have added a column since we read the manifest
            with self._lock:
                self._use(_read_manifest(self._client, self.spec))
            return qdrant_filter(parse_filter(where, self.columns), self.types)

    def _scroll(self, flt, fields=False) -> list:
        out, offset = [], None
        with self._lock, _engine_errors(self.spec):
            while True:
                points, offset = self._client.scroll(self.collection, scroll_filter=flt, limit=_PAGE, offset=offset,
                                                     with_payload=fields, with_vectors=False)
                out.extend(points)
                if offset is None:
                    return out

    def filter_ids(self, where) -> np.ndarray:
        ids = [int(p.id) for p in self._scroll(self._filter(where))]
        return np.asarray(sorted(ids), dtype=np.int64)

    def _retrieve(self, ids: Sequence[int], vectors: bool = False) -> list:
        ids = [int(i) for i in ids if isinstance(i, (int, np.integer)) and 0 <= int(i) < _MAX_ID]
        if not ids:
            return []
        with self._lock, _engine_errors(self.spec):
            return self._client.retrieve(self.collection, ids, with_payload=True, with_vectors=vectors)

    def get(self, item_id: int, score: float = float("nan")) -> Hit:
        points = self._retrieve([item_id])
        if not points:
            raise KeyError(f"no item with id {item_id} in store {self.spec.text!r}")
        return self._hit(points[0].payload, score)

    def image_path(self, item_id: int) -> pathlib.Path:
        return pathlib.Path(self.get(item_id).path)

    def feature(self, item_id: int) -> np.ndarray:
        points = self._retrieve([item_id], vectors=True)
        if not points:
            raise KeyError(f"no item with id {item_id} in store {self.spec.text!r}")
        return np.asarray(points[0].vector, dtype=np.float32)

    def file_states(self, under: str | None = None) -> dict[str, tuple]:
        _, models = _qdrant()
        flt = None
        if under is not None:
            flt = models.Filter(must=[models.FieldCondition(key=DIRS_KEY, match=models.MatchValue(value=str(under)))])
        fields = ["id", "path", "size", "mtime_ns", "sha256"]
        return {p.payload["path"]: (int(p.id), p.payload.get("size"), p.payload.get("mtime_ns"), p.payload.get("sha256"))
                for p in self._scroll(flt, fields)}

    def ids_under(self, path: str) -> list[int]:
        _, models = _qdrant()
        flt = models.Filter(should=[models.FieldCondition(key=k, match=models.MatchValue(value=path))
                                    for k in ("path", DIRS_KEY)])
        return sorted(int(p.id) for p in self._scroll(flt))

    def _hit(self, payload: dict, score: float) -> Hit:
        meta = {c: payload.get(c) for c in self.columns if c not in _HIDDEN}
        return Hit(id=int(payload["id"]), score=score, path=payload["path"], metadata=meta)

    # -- search ---------------------------------------------------------------------------
    def search(self, queries, k: int = 10, *, where=None, reranker=None, rerank_depth: int | None = None,
               exact: bool = False) -> list[list[Hit]]:
        """As ``GalleryIndex.search``; scores are the engine's dot products of the stored vectors."""
        _, models = _qdrant()
        q, k = check_queries(queries, self.dim), check_k(k)
        flt = self._filter(where) if where is not None else None
        depth = int(k) if reranker is None else max(int(k), int(rerank_depth) if rerank_depth else 100)
        params = models.SearchParams(exact=True) if exact else None
        reqs = [models.QueryRequest(query=row.tolist(), filter=flt, limit=depth, params=params, with_payload=True,
                                    with_vector=reranker is not None) for row in q]
        with self._lock, _engine_errors(self.spec):
            res = self._client.query_batch_points(self.collection, reqs)
        per = [sorted(r.points, key=lambda p: (-p.score, int(p.id))) for r in res]
        if reranker is not None:
            per = self._rerank(reranker, q, per)
        return [[self._hit(p.payload, float(p.score)) for p in pts[: int(k)]] for pts in per]

    def search_many(self, queries, ks) -> list[list[Hit]]:
        """As ``GalleryIndex.search_many``: each query ranked alone with its own k."""
        q, ks = check_many(queries, ks, self.dim)
        return [self.search(q[i], k)[0] for i, k in enumerate(ks)]

    def _rerank(self, reranker, q: np.ndarray, per: list) -> list:
        width = max((len(p) for p in per), default=0)
        ids = np.full((len(per), width), -1, dtype=np.int64)
        scores = np.full((len(per), width), -np.inf, dtype=np.float64)
        by_id = {}
        for r, pts in enumerate(per):
            for c, p in enumerate(pts):
                ids[r, c], scores[r, c] = int(p.id), p.score
                by_id[int(p.id)] = p
        new = np.asarray(reranker(q, ids, scores, _Candidates(self, by_id)), dtype=np.float64)
        if new.shape != scores.shape:
            raise QueryError(f"reranker returned scores of shape {new.shape}, expected {scores.shape}")
        ids, new = _sort_rows(ids, new)
        out = []
        for r in range(len(per)):
            pts = []
            for i, s in zip(ids[r], new[r]):
                if i >= 0:
                    p = by_id[int(i)]
                    pts.append(p.model_copy(update={"score": float(s)}))
            out.append(pts)
        return out

    # -- writing --------------------------------------------------------------------------
    def _save_manifest(self, **changes) -> None:
        m = dict(_read_manifest(self._client, self.spec), **changes, updated=_now())
        with _engine_errors(self.spec):
            self._client.update_collection(self.collection, metadata={META_KEY: m})
        self._use(m)

    def _column_changes(self, records: Sequence[dict], new_cols: list[str]) -> dict:
        """Manifest fields for the metadata columns ``records`` bring (new ones, widened types)."""
        m = _read_manifest(self._client, self.spec)
        types, cols, csv_cols = dict(m["types"]), list(m["columns"]), list(m.get("csv_columns", []))
        for c in new_cols:
            t = column_type(r.get(c) for r in records)
            old = types.get(c)
            if old is None:
                cols.append(c)
                csv_cols.append(c)
                types[c] = t
                if self.spec.path is None:
                    schema = {"INTEGER": "integer", "REAL": "float"}.get(t, "keyword")
                    with _engine_errors(self.spec):
                        self._client.create_payload_index(self.collection, c, field_schema=schema)
            elif old != t and any(r.get(c) is not None for r in records):
                types[c] = "REAL" if {old, t} == {"INTEGER", "REAL"} else "TEXT"
        return {"types": types, "columns": cols, "csv_columns": csv_cols}

    def add(self, features, records: Sequence[dict], *, ids: Sequence[int] | None = None) -> np.ndarray:
        _, models = _qdrant()
        feats = check_features(features, self.dim)
        new_cols = check_records(records, len(feats), need_path=ids is None)
        with self._lock, _engine_errors(self.spec):
            changes = self._column_changes(records, new_cols)
            if ids is None:
                paths = [r["path"] for r in records]
                taken = self._points_at(paths)
                if taken or len(set(paths)) != len(paths):
                    what = taken[0] if taken else "the same path twice"
                    raise IndexInputError(f"cannot add to store {self.spec.text!r}: {what} (a path already stored?)")
                first = int(_read_manifest(self._client, self.spec)["next_id"])
                given = np.arange(first, first + len(feats), dtype=np.int64)
                base = {}
                changes["next_id"] = first + len(feats)  # reserved before any point lands
            else:
                given = np.asarray(ids, dtype=np.int64)
                if len(given) != len(feats) or len(np.unique(given)) != len(given):
                    raise IndexInputError("ids must be distinct, one per feature row")
                base = {int(p.id): p.payload for p in self._retrieve(given)}
                if len(base) != len(given):
                    raise IndexInputError("add(ids=...) replaces existing items; some ids are not in the store")
            self._save_manifest(**changes)
            points = [models.PointStruct(id=int(i), vector=f.tolist(), payload=_payload(int(i), r, base.get(int(i))))
                      for i, f, r in zip(given, feats, records)]
            if points:
                self._client.upsert(self.collection, points=points, wait=True)
        return given

    def _points_at(self, paths: list[str]) -> list[str]:
        _, models = _qdrant()
        flt = models.Filter(must=[models.FieldCondition(key="path", match=models.MatchAny(any=list(paths)))])
        return [p.payload["path"] for p in self._scroll(flt, ["path"])] if paths else []

    def update(self, ids: Sequence[int], records: Sequence[dict]) -> None:
        _, models = _qdrant()
        given = [int(i) for i in ids]
        new_cols = check_records(records, len(given), need_path=False)
        with self._lock, _engine_errors(self.spec):
            if len(self._retrieve(given)) != len(set(given)):
                raise IndexInputError("update: some ids are not in the store")
            self._save_manifest(**self._column_changes(records, new_cols))
            ops = [models.SetPayloadOperation(set_payload=models.SetPayload(payload=_payload(i, r, {}, keep_id=False),
                                                                            points=[i]))
                   for i, r in zip(given, records) if r]
            for s in range(0, len(ops), _PAGE):
                self._client.batch_update_points(self.collection, ops[s : s + _PAGE], wait=True)

    def delete(self, ids: Sequence[int]) -> int:
        _, models = _qdrant()
        with self._lock, _engine_errors(self.spec):
            present = [int(p.id) for p in self._retrieve(list(dict.fromkeys(int(i) for i in ids)))]
            if present:
                self._client.delete(self.collection, points_selector=models.PointIdsList(points=present), wait=True)
                self._save_manifest()
        return len(present)


class _Candidates:
    """What a re-ranker sees of the store during one search: ``ids`` (sorted) and ``features``
    (their rows) are the call's candidates, with their vectors from the same query; anything
    else (``image_path``, ``get``...) goes to the store."""

    def __init__(self, store: QdrantStore, points: dict):
        self._store = store
        self.ids = np.asarray(sorted(points), dtype=np.int64)
        vecs = [np.asarray(points[int(i)].vector, dtype=np.float32) for i in self.ids]
        self.features = np.stack(vecs) if vecs else np.zeros((0, store.dim), np.float32)

    def __getattr__(self, name):
        return getattr(self._store, name)


def json_safe(value):
    """A record value as JSON for a payload: numpy scalars as numbers, NaN and inf as null."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _payload(item_id: int, record: dict, base: dict | None, keep_id: bool = True) -> dict:
    """A point's payload: ``base`` (the stored one) updated by ``record``, with the id and the
    folders above the path (``tbps_dirs``) filled in."""
    p = dict(base or {})
    p.update({k: json_safe(v) for k, v in record.items()})
    if keep_id:
        p["id"] = item_id
    if "path" in record:
        p.setdefault("relpath", pathlib.PurePath(record["path"]).name)
        p[DIRS_KEY] = [str(d) for d in pathlib.PurePath(record["path"]).parents]
    return p
