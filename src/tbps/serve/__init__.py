"""The search server and its web page: ``create_app(index, encoder, token=...)``.

FastAPI and uvicorn (the ``[serve]`` extra) are imported only when an app is built.
"""

from tbps.serve.app import (
    MAX_K,
    MAX_QUERY_CHARS,
    ThumbCache,
    create_app,
    filters_to_where,
    make_thumbnail,
)

__all__ = ["MAX_K", "MAX_QUERY_CHARS", "ThumbCache", "create_app", "filters_to_where", "make_thumbnail"]
