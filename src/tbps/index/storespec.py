"""The names that pick a store (``tbps.index.vectorstore``)::

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

from tbps.index.errors import IndexInputError

DEFAULT_COLLECTION = "gallery"  # the collection of a ``qdrant:PATH`` store
_COLLECTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)$")


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
