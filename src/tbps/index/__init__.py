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
``ann`` (approximate search), ``partition`` (partitioned, resumable, multi-process builds).
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

__all__ = [
    "GalleryIndex",
    "Hit",
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
