"""The search server and its web page: ``create_app(index, encoder, token=...)``.

``app`` assembles the FastAPI app from ``routes`` (the handlers), ``schemas`` (limits and
request/response models), ``auth`` (the token check) and ``runtime`` (text batcher, live
index, thumbnail cache, body limit). FastAPI and pydantic (the ``[serve]`` extra) are
imported only when a name that needs them is first used: ``import tbps.serve`` stays light.
"""

import importlib

_EXPORTS = {  # name -> the module that defines it
    "create_app": "tbps.serve.app",
    "MAX_K": "tbps.serve.schemas",
    "MAX_QUERY_CHARS": "tbps.serve.schemas",
    "ThumbCache": "tbps.serve.runtime",
    "make_thumbnail": "tbps.serve.runtime",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tbps.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
