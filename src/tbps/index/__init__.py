"""Persistent gallery index: embed a folder of person crops once, search it by text or image.

    from tbps.index import GalleryIndex, build_index
    stats = build_index("gallery.idx", encoder, "crops/", metadata_csv="crops.csv")
    index = GalleryIndex.open("gallery.idx")
    index.check_encoder(encoder)
    hits = index.search(encoder.encode_texts(["a man in a black jacket"]), k=10,
                        where="camera = 'c3'")[0]

Modules, from the top: ``build`` (the four write operations), ``scan`` (image folder, metadata
CSV), ``embed`` (decode and encode in batches), ``generation`` (lock, files, fsync, publishing:
crash safety), ``store`` (on-disk layout and ``GalleryIndex``), ``filters`` (filter grammar),
``ann`` (approximate search). ``vectorstore`` is the interface over where the vectors live:
``local_store`` (this folder, the default) or ``qdrant_store`` (a Qdrant collection, local
engine or server; filters via ``filter_tree`` and ``qdrant_filter``); ``ingest`` writes any
store batch by batch.
"""

from tbps.index.build import (
    add_to_index,
    build_index,
    build_index_from_features,
    read_metadata_csv,
    remove_from_index,
)
from tbps.index.errors import (
    EncoderMismatchError,
    FilterError,
    GalleryIndexError,
    IndexBusyError,
    IndexFormatError,
    IndexInputError,
    QueryError,
)
from tbps.index.filters import compile_filter
from tbps.index.store import GalleryIndex, Hit
from tbps.index.vectorstore import VectorStore, create_store, open_store

__all__ = [
    "GalleryIndex",
    "Hit",
    "VectorStore",
    "open_store",
    "create_store",
    "build_index",
    "add_to_index",
    "build_index_from_features",
    "remove_from_index",
    "read_metadata_csv",
    "compile_filter",
    "GalleryIndexError",
    "IndexFormatError",
    "IndexInputError",
    "IndexBusyError",
    "EncoderMismatchError",
    "FilterError",
    "QueryError",
]
