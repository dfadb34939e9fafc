"""One interface for where a gallery's vectors live, and the names that pick a backend.

``VectorStore`` is what ``tbps search``, ``tbps serve`` and the index CLI need of a store:
search with k and a metadata filter, add, delete, update, count, info, open and close. Two
backends implement it:

* ``LocalStore`` (``tbps.index.local_store``), the default: today's index folder, faiss and
  SQLite generations published atomically (``GalleryIndex`` plus the write methods). The CLI
  still writes it with ``build_index`` / ``add_to_index`` / ``remove_from_index``, one
  generation per command.
* ``QdrantStore`` (``tbps.index.qdrant_store``): a Qdrant collection, either Qdrant's local
  engine in a folder (in-process, no server) or a Qdrant server or cluster over HTTP; the
  same client and the same code talk to both.

A store is named by one string, ``gallery.idx`` (the folder), ``qdrant:PATH`` or
``qdrant://HOST[:PORT]/COLLECTION`` (``tbps.index.storespec.parse_store``).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from tbps.index.store import Hit
from tbps.index.storespec import StoreSpec, parse_store

__all__ = ["VectorStore", "StoreSpec", "parse_store", "open_store", "create_store"]

Reranker = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], np.ndarray]


@runtime_checkable
class VectorStore(Protocol):
    """A gallery's unit vectors with one metadata record each, searchable by inner product.

    Items have stable integer ids, never reused after a delete. A record is a dict with at
    least ``path`` (the absolute image path) and optionally ``relpath``, ``size``, ``mtime``,
    ``mtime_ns``, ``sha256``, ``width``, ``height`` and metadata columns (lower_snake_case
    names; ``tbps.index.scan.normalise_column``).
    """

    fingerprint: dict  # the encoder that made the vectors (``check_encoder`` compares)
    columns: list[str]  # what filters may name
    search_mode: str

    @property
    def dim(self) -> int: ...

    @property
    def checkpoint(self) -> str | None: ...

    def __len__(self) -> int:
        """How many items a search can return now (the engine's own count)."""

    def count(self, where: str | dict | None = None) -> int:
        """Items matching ``where`` (all of them without)."""

    def info(self) -> dict:
        """Counts, model fingerprint, columns, search mode and backend details, JSON-able."""

    def check_encoder(self, encoder) -> None:
        """``EncoderMismatchError`` unless ``encoder.fingerprint`` is the store's."""

    def search(self, queries: np.ndarray, k: int = 10, *, where: str | dict | None = None,
               reranker: Reranker | None = None, rerank_depth: int | None = None,
               exact: bool = False) -> list[list[Hit]]:
        """Top-``k`` items per query (rows of (Q, D) or one (D,)), best first, ties by id;
        ``where``: a filter expression or ``{column: value}`` dict (``tbps.index.filters``)."""

    def search_many(self, queries: np.ndarray, ks: Sequence[int]) -> list[list[Hit]]:
        """``[search(queries[i], k=ks[i])[0] for i ...]`` (no filter, no reranker), at less cost
        per query where the backend can: a server's batch of plain text queries."""

    def filter_ids(self, where: str | dict) -> np.ndarray:
        """Sorted int64 ids of the items matching ``where``."""

    def get(self, item_id: int, score: float = float("nan")) -> Hit:
        """The item ``item_id`` (``KeyError`` if unknown)."""

    def image_path(self, item_id: int) -> pathlib.Path: ...

    def feature(self, item_id: int) -> np.ndarray: ...

    def file_states(self, under: str | None = None) -> dict[str, tuple]:
        """``{path: (id, size, mtime_ns, sha256)}`` of the items (below folder ``under``)."""

    def ids_under(self, path: str) -> list[int]:
        """Ids of the item at ``path`` and of every item below the folder ``path``."""

    def add(self, features: np.ndarray, records: Sequence[dict], *,
            ids: Sequence[int] | None = None) -> np.ndarray:
        """Store (N, D) unit ``features`` with their ``records``; returns their ids. Without
        ``ids`` the items are new (fresh ids; a path already stored is refused); with ``ids``
        they replace those existing items' vectors and the given record fields."""

    def update(self, ids: Sequence[int], records: Sequence[dict]) -> None:
        """Set the given record fields of existing items (vectors unchanged)."""

    def delete(self, ids: Sequence[int]) -> int:
        """Delete the items ``ids`` (unknown ids are ignored); returns how many were deleted."""

    def close(self) -> None: ...


def open_store(spec: str | os.PathLike | StoreSpec) -> VectorStore:
    """Open an existing store for search and updates (``IndexFormatError`` if there is none)."""
    s = parse_store(spec)
    if s.is_local_index:
        from tbps.index.local_store import LocalStore

        return LocalStore.open(s.path)
    from tbps.index.qdrant_store import QdrantStore

    return QdrantStore.open(s)


def create_store(spec: str | os.PathLike | StoreSpec, *, dim: int, fingerprint: dict,
                 checkpoint: str | None = None, images_dir: str | None = None, recursive: bool = False,
                 overwrite: bool = False) -> VectorStore:
    """Create an empty store (``overwrite``: replace an existing one) and open it."""
    s = parse_store(spec)
    fields = {"dim": int(dim), "fingerprint": fingerprint, "checkpoint": checkpoint, "images_dir": images_dir,
              "recursive": bool(recursive)}
    if s.is_local_index:
        from tbps.index.local_store import LocalStore

        return LocalStore.create(s.path, overwrite=overwrite, **fields)
    from tbps.index.qdrant_store import QdrantStore

    return QdrantStore.create(s, overwrite=overwrite, **fields)
