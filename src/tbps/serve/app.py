"""The search server: a FastAPI app assembled by ``create_app(index, encoder)``.

Routes (all but ``/health`` need the token when one is set; handlers in ``tbps.serve.routes``):

- ``POST /search``        text query -> ranked hits (ids, scores, metadata, image URLs)
- ``POST /search/image``  find by example: an uploaded image -> ranked hits
- ``GET  /images/{id}``   the original gallery image, looked up by index id only
- ``GET  /thumbs/{id}``   a small JPEG made on the fly with PIL, kept in an LRU cache
- ``GET  /health``        liveness, never authenticated
- ``GET  /stats``         gallery size, model fingerprint, index info, limits
- ``GET  /``              the web page (``static/``), no external assets

Input rules and limits: ``tbps.serve.schemas``. ``rescore: true`` asks for top-k ITM
re-scoring (``tbps.retrieval.rescore.SearchRescorer``); a server built without a
``rescorer`` answers it with a 422 saying so, and ``GET /stats`` says whether re-scoring is
available (``rescore.available``) and with which k and mode. Auth (a bearer header,
``?token=`` or the cookie that opening ``/?token=TOKEN`` sets): ``tbps.serve.auth``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tbps.serve import routes
from tbps.serve.auth import auth_responses, token_dependencies
from tbps.serve.runtime import (
    THUMB_CACHE_ITEMS,
    BodyLimit,
    HostCheck,
    LiveIndex,
    SecurityHeaders,
    TextBatcher,
    ThumbCache,
)
from tbps.serve.schemas import FILTERS_DESCRIPTION, MAX_BODY_BYTES, MAX_UPLOAD_BYTES

_DESCRIPTION = ("Text-based person search over a gallery of person crops. "
                "POST a description to `/search`; images are served by index id.")


def create_app(index, encoder, *, token: str | None = None, title: str = "tbps search",
               thumb_cache_items: int = THUMB_CACHE_ITEMS, max_batch: int = 32, reload_interval: float | None = 1.0,
               reranker=None, rerank_depth: int | None = None, rescorer=None, rescore_depth: int = 128,
               allowed_hosts=None, decode_slots: int = 2, max_image_pixels: int | None = None):
    """Build the FastAPI app that serves ``index`` (a ``GalleryIndex``) with ``encoder``.

    ``encoder`` must be the one the index was built with (check it before with
    ``index.check_encoder(encoder)``; ``tbps serve`` does). ``token``: when set, every route
    but ``/health`` requires it (see ``tbps.serve.auth`` for the three ways to send it).
    Concurrent text queries are encoded together in batches of up to ``max_batch``
    (``TextBatcher``); encoder calls never overlap, since on a CPU torch already spreads one
    call over the cores and overlapping calls only thrash. ``reload_interval``: how often
    (seconds) to look for a newer generation of the index on disk (``LiveIndex``); ``None``
    never reloads. ``reranker`` / ``rerank_depth``: passed to ``index.search`` for every
    query (the hook re-scoring recipes plug into; see ``GalleryIndex.search``). ``rescorer``:
    a ``tbps.retrieval.rescore.SearchRescorer`` sharing the encoder's model
    (``SearchRescorer.from_encoder(encoder)``); text queries that ask for it
    (``"rescore": true``) are encoded by its one text pass, which gives the stage-1 feature
    and the token maps together, and have their top ``rescore_depth`` candidates re-scored
    by its ITM head (its calls are serialised with the encoder's). Not combined with
    ``reranker``. ``app.state`` holds what the routes read (``tbps.serve.routes``), among
    them ``live`` (``live.get()`` is the current index), ``encoder``, ``thumbs`` (the
    thumbnail cache) and ``batcher``.

    Safety: ``allowed_hosts`` (names; None accepts any ``Host``) is the DNS-rebinding guard
    (``HostCheck``: IP literals and ``localhost`` are always accepted, ``tbps serve`` passes the
    names it binds). At most ``decode_slots`` images (uploads, thumbnails) decode at once;
    gallery images decode up to ``max_image_pixels`` (None: ``tbps.data.images``' default),
    uploads up to ``MAX_UPLOAD_PIXELS``. Originals are served only as checked by
    ``tbps.serve.runtime.read_gallery_file`` and typed by their content; every response
    carries ``nosniff``, ``X-Frame-Options: DENY`` and a CSP (``SecurityHeaders``).
    """
    from tbps.data.images import DEFAULT_MAX_PIXELS
    from tbps import __version__

    _check_rescoring(encoder, reranker, rescorer, rescore_depth)
    # The schema is served by a route, behind the token like every route but /health. No
    # /docs: Swagger UI loads its assets from a CDN, and this server loads nothing external.
    app = FastAPI(lifespan=_lifespan, title=title, version=__version__, description=_DESCRIPTION,
                  openapi_url=None, docs_url=None, redoc_url=None)
    state = app.state  # what the routes read
    state.live = LiveIndex(index, encoder, reload_interval)
    state.encoder = encoder
    # Optional on an encoder (tbps.retrieval.encoder.Encoder has it): how a query's unseen words were read.
    state.unknown_words = getattr(encoder, "unknown_words", None) or (lambda text: {})
    state.lock = threading.Lock()  # one encoder call at a time
    # queries are searched in the batcher's thread, right after their batch is encoded
    state.batcher = TextBatcher(encoder.encode_texts, state.lock, max_batch,
                                finish=lambda jobs: routes.search_batch(state, jobs))
    state.thumbs = ThumbCache(thumb_cache_items)
    state.token = token
    state.started = time.time()
    state.search_options = {"reranker": reranker, "rerank_depth": rerank_depth} if reranker is not None else {}
    state.rescorer, state.rescore_depth = rescorer, int(rescore_depth)
    state.rescore_info = _rescore_info(rescorer, rescore_depth)
    state.decodes = threading.BoundedSemaphore(max(1, int(decode_slots)))
    state.max_image_pixels = int(max_image_pixels or DEFAULT_MAX_PIXELS)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, limits={"/search/image": MAX_UPLOAD_BYTES + 64 * 1024})
    app.add_middleware(SecurityHeaders)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=list(allowed_hosts))  # added last: runs first
    app.add_exception_handler(RequestValidationError, routes.validation_error)
    app.add_exception_handler(StarletteHTTPException, routes.http_error)
    app.include_router(routes.public)
    app.include_router(routes.router, dependencies=token_dependencies(token), responses=auth_responses(token))
    app.openapi = _openapi_listing_columns(app, list(getattr(index, "columns", [])))
    return app


def _check_rescoring(encoder, reranker, rescorer, rescore_depth: int) -> None:
    if rescorer is not None and reranker is not None:
        raise ValueError("a reranker and a rescorer are alternatives: give one")
    if int(rescore_depth) < 1:
        raise ValueError(f"rescore_depth must be >= 1, got {rescore_depth}")
    if rescorer is not None and rescorer.model is not getattr(encoder, "model", None):
        # its text pass stands in for the encoder's: it must be the model that built the index
        raise ValueError("the rescorer must share the encoder's model: build it with "
                         "SearchRescorer.from_encoder(encoder)")


def _rescore_info(rescorer, rescore_depth: int) -> dict[str, Any]:
    """What ``GET /stats`` says about re-scoring."""
    if rescorer is None:
        return {"available": False}
    return {"available": True, "k": int(rescore_depth), "mode": rescorer.mode,
            "weight": rescorer.weight if rescorer.mode == "itm+itc" else None}


@contextlib.asynccontextmanager
async def _lifespan(app):
    yield
    app.state.batcher.close()


def _openapi_listing_columns(app: FastAPI, columns: list[str]):
    """``app.openapi`` with the index's columns (as at startup) in the filter field's description."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            field = build()["components"]["schemas"]["SearchRequest"]["properties"]["filters"]
            field["description"] = (f"{FILTERS_DESCRIPTION} Columns: {', '.join(columns) or '(none)'} "
                                    "(`GET /stats` lists the current ones).")
        return app.openapi_schema

    return openapi
