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

A store is named by one string (``parse_store``)::

    gallery.idx                          the local index folder (faiss + SQLite), as always
    qdrant:PATH                          Qdrant's local engine in folder PATH (collection "gallery")
    qdrant://HOST[:PORT]/COLLECTION      a Qdrant server or cluster (HTTP, port 6333 by default)
    qdrants://HOST[:PORT]/COLLECTION     the same over HTTPS

A server's API key is read from ``$QDRANT_API_KEY`` (never from the command line).
"""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from tbps.index.errors import IndexInputError
from tbps.index.store import Hit

Reranker = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], np.ndarray]

DEFAULT_COLLECTION = "gallery"  # the collection of a ``qdrant:PATH`` store
_COLLECTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)$")


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

    def info(self) -> dict:
        """Counts, model fingerprint, columns, search mode and backend details, JSON-able."""

    def check_encoder(self, encoder) -> None:
        """``EncoderMismatchError`` unless ``encoder.fingerprint`` is the store's."""

    def search(self, queries: np.ndarray, k: int = 10, *, where: str | dict | None = None,
               reranker: Reranker | None = None, rerank_depth: int | None = None,
               exact: bool = False) -> list[list[Hit]]:
        """Top-``k`` items per query (rows of (Q, D) or one (D,)), best first, ties by id;
        ``where``: a filter expression or ``{column: value}`` dict (``tbps.index.filters``)."""

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


@dataclass(frozen=True)
class StoreSpec:
    """A parsed store name: ``backend`` "local" (faiss folder) or "qdrant"."""

    text: str
    backend: str
    path: str | None = None  # the local index folder, or the Qdrant local engine's folder
    url: str | None = None  # a Qdrant server's base URL
    collection: str | None = None

    @property
    def is_local_index(self) -> bool:
        return self.backend == "local"


def parse_store(spec: str | os.PathLike | StoreSpec) -> StoreSpec:
    """Read a store name (see the module docstring); ``IndexInputError`` for a malformed one."""
    if isinstance(spec, StoreSpec):
        return spec
    text = os.fspath(spec)
    if not isinstance(text, str) or not text:
        raise IndexInputError("empty store name")
    m = re.match(r"^(qdrants?)://([^/?#]*)/([^/?#]*)$", text)
    if m:
        scheme, netloc, coll = m.groups()
        host, port = netloc, "6333"
        if re.search(r":\d+$", netloc):
            host, port = netloc.rsplit(":", 1)
        if not host or not _HOST.match(host) or not 0 < int(port) < 65536:
            raise IndexInputError(f"bad Qdrant address in {text!r}: give {scheme}://HOST[:PORT]/COLLECTION")
        if not _COLLECTION.match(coll):
            raise IndexInputError(f"bad Qdrant collection name {coll!r} in {text!r} (letters, digits, _ . -)")
        http = "https" if scheme == "qdrants" else "http"
        return StoreSpec(text, "qdrant", url=f"{http}://{host}:{port}", collection=coll)
    if text.startswith(("qdrant://", "qdrants://")):
        raise IndexInputError(f"bad Qdrant store {text!r}: give qdrant://HOST[:PORT]/COLLECTION")
    if text.startswith("qdrant:"):
        path = text[len("qdrant:"):]
        if not path:
            raise IndexInputError("qdrant: needs a folder, e.g. qdrant:gallery.qdrant")
        return StoreSpec(text, "qdrant", path=str(pathlib.Path(path).expanduser().resolve()),
                         collection=DEFAULT_COLLECTION)
    return StoreSpec(text, "local", path=text)


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
