"""Errors raised by the gallery index. All carry ``user_error = True``: the CLI prints their
message as one line (``tbps: error: ...``) and exits 2 instead of showing a traceback."""

from __future__ import annotations


class GalleryIndexError(Exception):
    """Base class of every error the gallery index raises on purpose."""

    user_error = True


class IndexFormatError(GalleryIndexError):
    """The index directory is missing, is not an index, or is corrupt."""


class IndexInputError(GalleryIndexError):
    """Bad input to build/add/remove: missing image directory, malformed metadata CSV, ..."""


class IndexBusyError(GalleryIndexError):
    """Another process is writing the same index."""


class EncoderMismatchError(GalleryIndexError):
    """The query encoder is not the one (checkpoint + preprocessing) that built the index."""


class FilterError(GalleryIndexError, ValueError):
    """A ``where`` filter expression could not be parsed or names an unknown column."""


class QueryError(GalleryIndexError, ValueError):
    """A search request is invalid (k <= 0, wrong feature dimension, empty text, ...)."""
