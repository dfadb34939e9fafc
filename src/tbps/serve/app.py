"""The search server: a FastAPI app built by ``create_app(index, encoder)``.

Routes (all but ``/health`` need the token when one is set):

- ``POST /search``        text query -> ranked hits (ids, scores, metadata, image URLs)
- ``POST /search/image``  find by example: an uploaded image -> ranked hits
- ``GET  /images/{id}``   the original gallery image, looked up by index id only
- ``GET  /thumbs/{id}``   a small JPEG made on the fly with PIL, kept in an LRU cache
- ``GET  /health``        liveness, never authenticated
- ``GET  /stats``         gallery size, model fingerprint, index info, limits
- ``GET  /``              the web page (``static/``), no external assets

Input rules, chosen so that bad input always gets a clear 4xx and never a 500:

- ``text`` must hold a non-space character and at most ``MAX_QUERY_CHARS`` characters
  (longer -> 422 rather than a silent cut; within the cap, the tokenizer still keeps only
  the model's context length, 77 tokens for CLIP, as in training).
- ``k`` must be in ``1..MAX_K`` (else 422); a ``k`` above the gallery size is clamped to it,
  and the response's ``k`` says how many were asked of the index.
- ``rescore: true`` asks for top-k ITM re-scoring (``tbps.retrieval.rescore.SearchRescorer``); a server
  built without a ``rescorer`` answers it with a 422 saying so. ``GET /stats`` says whether
  re-scoring is available (``rescore.available``) and with which k and mode.
- ``filters`` is a ``where`` expression string (parsed by the index, never pasted into SQL)
  or a ``{column: value}`` object turned into ``column = 'value' AND ...`` with quoting done
  here; an unknown column or a malformed expression -> 422 naming the problem.

Auth: with ``token`` set, a request is accepted when it carries ``Authorization: Bearer
TOKEN``, or ``?token=TOKEN``, or the ``tbps_token`` cookie. Opening the page as
``/?token=TOKEN`` sets that cookie (HttpOnly, SameSite=Strict), so the page's own requests and
``<img>`` tags authenticate without the token ever appearing in image URLs; the page then
drops ``token`` from its address bar so that shared links never carry it. Tokens are compared
with ``hmac.compare_digest``.

FastAPI is imported inside ``create_app`` (the ``[serve]`` extra). The pydantic models are
built there too: they need pydantic, and the filter schema lists the index's columns. (No
``from __future__ import annotations`` here: FastAPI must resolve the annotations of those
locally defined models, which string annotations would hide from it.)
"""

import contextlib
import hmac
import io
import json
import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np

MAX_QUERY_CHARS = 1000  # a long description is ~300 characters; CLIP reads 77 tokens
MAX_FILTER_CHARS = 2000
MAX_K = 1000
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_BODY_BYTES = 1024 * 1024  # any other request body; a 1,000-character query is ~4 KB
THUMB_BOX = (160, 320)  # (W, H) bounding box; person crops are tall
THUMB_CACHE_ITEMS = 2048  # ~8 KB each -> ~16 MB at most
TOKEN_COOKIE = "tbps_token"
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {  # the only files the page may load: name -> media type
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_MAX_ID = 2**62  # ids above this cannot exist; refuse before numpy sees them


class ThumbCache:
    """A thread-safe LRU of encoded thumbnails: ``get(key, make)`` returns bytes.

    ``make`` runs outside the lock, so two threads may build the same thumbnail once each;
    that is cheaper than serialising every miss.
    """

    def __init__(self, capacity: int = THUMB_CACHE_ITEMS):
        self.capacity = int(capacity)
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        data = make()
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return data

    def __len__(self) -> int:
        return len(self._items)


class TextBatcher:
    """Encode concurrent text queries together: ``__call__(text) -> (D,)`` blocks until done.

    One worker thread takes whatever queries are waiting (up to ``max_batch``) and encodes
    them in one ``encode_texts`` call, so under load the model sees batches, and an idle
    server adds no delay (a lone query is encoded at once). Encoder calls never overlap:
    ``lock`` is shared with the image-search path.
    """

    def __init__(self, encode_texts: Callable[[list[str]], np.ndarray], lock: threading.Lock, max_batch: int = 32):
        self.encode_texts = encode_texts
        self.lock = lock
        self.max_batch = int(max_batch)
        self.batches = 0
        self.queries = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def __call__(self, text: str) -> np.ndarray:
        from concurrent.futures import Future

        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="tbps-text-batcher", daemon=True)
                self._thread.start()
        fut: Future = Future()
        self._queue.put((text, fut))
        return fut.result()

    def close(self) -> None:
        """Stop the worker thread (queries already queued are answered first)."""
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(None)
                self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                with self.lock:
                    feats = self.encode_texts([t for t, _ in batch])  # (B, D)
                self.batches += 1
                self.queries += len(batch)
                for i, (_, fut) in enumerate(batch):
                    fut.set_result(feats[i])
            except BaseException as e:  # noqa: BLE001 - handed to every waiting request, which re-raises it
                for _, fut in batch:
                    fut.set_exception(e)


class LiveIndex:
    """The served index, reopened when another process commits a new generation.

    ``tbps index add/remove`` replace ``INDEX/manifest.json`` atomically as their last step;
    ``get()`` looks at that file at most every ``interval`` seconds and, when it changed,
    opens the new generation and checks it against the encoder. If that fails (a foreign
    model, a damaged file) the old generation keeps being served and ``error`` says why.
    Item ids are stable across generations, so ids and thumbnails stay valid. Indexes
    without a ``root`` on disk (or ``interval=None``) are served as they are.
    """

    def __init__(self, index, encoder, interval: float | None = 1.0):
        self.index = index
        self.encoder = encoder
        self.interval = interval
        root = getattr(index, "root", None)
        can_reopen = root is not None and hasattr(type(index), "open") and interval is not None
        self.manifest = Path(root) / "manifest.json" if can_reopen else None
        self.stamp = self._stamp()
        self.next_check = 0.0
        self.reloads = 0
        self.error: str | None = None
        self._lock = threading.Lock()

    def _stamp(self):
        try:
            st = self.manifest.stat()
        except (OSError, AttributeError):
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def get(self):
        """The current index (one call per request, so a request sees one generation)."""
        if self.manifest is None or time.monotonic() < self.next_check:
            return self.index
        with self._lock:
            now = time.monotonic()
            if now < self.next_check:
                return self.index
            self.next_check = now + self.interval
            stamp = self._stamp()
            if stamp is None or stamp == self.stamp:
                return self.index
            self.stamp = stamp  # retry only when the manifest changes again
            try:
                new = type(self.index).open(self.index.root)
                new.check_encoder(self.encoder)
            except Exception as e:  # noqa: BLE001 - any failure: keep serving the generation we have
                self.error = f"{type(e).__name__}: {e}"
                logging.getLogger("tbps.serve").warning("index not reloaded, still serving the old one: %s", self.error)
                return self.index
            self.index, self.error = new, None
            self.reloads += 1
            logging.getLogger("tbps.serve").info("index reloaded: %d items", len(new))
            return new


class BodyLimit:
    """ASGI middleware: refuse request bodies over a size before anyone buffers them.

    A declared ``Content-Length`` over the limit gets a 413 at once. A chunked body that
    grows past it is cut off: reading it raises, which FastAPI answers with a 400. Either
    way memory and temporary files stay bounded (Starlette would otherwise spool a whole
    multipart upload to disk before the handler could look at its size).
    """

    def __init__(self, app, limit: int, limits: dict[str, int] | None = None):
        self.app = app
        self.limit = int(limit)
        self.limits = dict(limits or {})  # path -> its own limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope.get("path", ""), self.limit)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > limit):
            body = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ValueError(f"request body larger than {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


def make_thumbnail(path: str | os.PathLike, box: tuple[int, int] = THUMB_BOX, quality: int = 85) -> bytes:
    """Return a JPEG of the image at ``path`` shrunk to fit ``box`` (W, H), aspect kept."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im.draft("RGB", box)  # JPEG decoders can downscale while reading
        im = im.convert("RGB")
        im.thumbnail(box, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def filters_to_where(filters: dict[str, Any], columns: list[str]) -> str | None:
    """Turn ``{column: value}`` into ``col = 'value' AND ...``, quoting values safely.

    Strings are single-quoted with embedded quotes doubled; numbers are written as numbers;
    booleans as ``'true'``/``'false'`` strings. Raises ``ValueError`` naming an unknown column.
    """
    parts = []
    for column, value in filters.items():
        if column not in columns:
            known = ", ".join(columns) or "(none)"
            raise ValueError(f"unknown filter column {column!r}; known columns: {known}")
        if isinstance(value, bool):
            literal = "'true'" if value else "'false'"
        elif isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ValueError(f"filter value for {column!r} must be a finite number")
            literal = repr(value)
        else:
            literal = "'" + str(value).replace("'", "''") + "'"
        parts.append(f"{column} = {literal}")
    return " AND ".join(parts) or None


def _jsonable(value: Any) -> Any:
    """Make index metadata safe for strict JSON (numpy scalars, NaN, paths, bytes)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _index_errors() -> tuple[type[Exception], ...]:
    """The index's errors about a request (bad ``where``, bad query), mapped to 422, not 500."""
    try:
        from tbps.index.errors import FilterError, QueryError
    except ImportError:  # an index package without these: nothing to map
        return ()
    return (FilterError, QueryError)


def create_app(
    index,
    encoder,
    *,
    token: str | None = None,
    title: str = "tbps search",
    thumb_cache_items: int = THUMB_CACHE_ITEMS,
    max_batch: int = 32,
    reload_interval: float | None = 1.0,
    reranker=None,
    rerank_depth: int | None = None,
    rescorer=None,
    rescore_depth: int = 128,
):
    """Build the FastAPI app that serves ``index`` (a ``GalleryIndex``) with ``encoder``.

    ``encoder`` must be the one the index was built with (check it before with
    ``index.check_encoder(encoder)``; ``tbps serve`` does). ``token``: when set, every route
    but ``/health`` requires it (see the module docstring for the three ways to send it).
    Concurrent text queries are encoded together in batches of up to ``max_batch``
    (``TextBatcher``); encoder calls never overlap, since on a CPU torch already spreads one
    call over the cores and overlapping calls only thrash. ``reload_interval``: how often
    (seconds) to look for a newer generation of the index on disk (``LiveIndex``); ``None``
    never reloads. ``reranker`` / ``rerank_depth``: passed to ``index.search`` for every
    query (the hook re-scoring recipes plug into; see ``GalleryIndex.search``). ``rescorer``:
    a ``tbps.retrieval.rescore.SearchRescorer``; text queries that ask for it (``"rescore": true``) have
    their top ``rescore_depth`` candidates re-scored by its ITM head (its calls are serialised
    with the encoder's: they share the model). Not combined with ``reranker``.
    ``app.state`` holds ``live`` (``live.get()`` is the current index),
    ``encoder``, ``thumbs`` (the thumbnail cache) and ``batcher``.
    """
    from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from fastapi.security import (
        APIKeyCookie,
        APIKeyQuery,
        HTTPAuthorizationCredentials,
        HTTPBearer,
    )
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from tbps import __version__

    if rescorer is not None and reranker is not None:
        raise ValueError("a reranker and a rescorer are alternatives: give one")
    if int(rescore_depth) < 1:
        raise ValueError(f"rescore_depth must be >= 1, got {rescore_depth}")
    filter_errors = _index_errors()
    live = LiveIndex(index, encoder, reload_interval)
    search_options = {"reranker": reranker, "rerank_depth": rerank_depth} if reranker is not None else {}
    columns = list(getattr(index, "columns", []))  # as at startup: for the schema's docs
    lock = threading.Lock()  # one encoder call at a time
    batcher = TextBatcher(encoder.encode_texts, lock, max_batch)
    thumbs = ThumbCache(thumb_cache_items)
    started = time.time()
    rescore_info: dict[str, Any] = {"available": False}
    if rescorer is not None:
        rescore_info = {"available": True, "k": int(rescore_depth), "mode": rescorer.mode,
                        "weight": rescorer.weight if rescorer.mode == "itm+itc" else None}

    # ---- models: these are the OpenAPI schema -------------------------------------------
    class SearchRequest(BaseModel):
        """A text query."""

        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "examples": [{"text": "a woman in a red coat with a black backpack", "k": 10}]
            },
        )
        text: str = Field(
            ...,
            min_length=1,
            max_length=MAX_QUERY_CHARS,
            pattern=r"\S",
            description=f"Description of the person, in natural language; at most "
            f"{MAX_QUERY_CHARS} characters and not only spaces.",
        )
        k: int = Field(
            10,
            ge=1,
            le=MAX_K,
            description=f"How many results to return (1..{MAX_K}); "
            "a k above the gallery size is clamped to the gallery size.",
        )
        filters: str | dict[str, str | int | float | bool] | None = Field(
            None,
            description="Metadata filter: either a `where` expression such as "
            "`camera = 'c3' AND time >= '2024-01-01'`, or an object of column -> value "
            "that must all match (turned into such an expression with safe quoting). "
            f"Columns: {', '.join(columns) or '(none)'} (`GET /stats` lists the current ones).",
            examples=["camera = 'c3'", {"camera": "c3"}],
        )
        rescore: StrictBool = Field(
            False,
            description="Re-score the top candidates with the checkpoint's fusion encoder (ITM head) "
            "before returning the k best. Only on servers started with `--rescore` "
            "(`GET /stats` -> `rescore.available`); elsewhere a 422.",
        )

        @field_validator("filters")
        @classmethod
        def _check_filters(cls, v):
            if isinstance(v, str) and len(v) > MAX_FILTER_CHARS:
                raise ValueError(f"filter expression longer than {MAX_FILTER_CHARS} characters")
            if isinstance(v, dict):
                for key, value in v.items():
                    if isinstance(value, float) and not math.isfinite(value):
                        raise ValueError(f"filter value for {key!r} must be a finite number")
            return v

    class SearchHit(BaseModel):
        """One gallery item matching the query."""

        id: int = Field(..., description="Stable id of the gallery item in this index.")
        rank: int = Field(..., description="1 for the best match.")
        score: float = Field(..., description="Cosine similarity (after any re-ranking), or the re-scored value "
                             "when the response is `rescored`; higher is better.")
        cosine: float | None = Field(None, description="The dual encoder's cosine similarity, when `score` is "
                                     "a re-scored value; else null.")
        name: str = Field(..., description="File name of the image (no server path).")
        image_url: str = Field(..., description="URL of the full image (same auth as the API).")
        thumb_url: str = Field(..., description="URL of a small JPEG thumbnail.")
        metadata: dict[str, Any] = Field(
            ..., description="width, height, mtime, sha256 and the gallery's CSV columns."
        )

    class SearchResponse(BaseModel):
        """Ranked results, best first."""

        query: str = Field(..., description="The text searched for, or the uploaded file name.")
        k: int = Field(..., description="Number of results asked of the index (after clamping).")
        where: str | None = Field(None, description="The filter expression applied, if any.")
        results: list[SearchHit]
        took_ms: float = Field(..., description="Server time spent on this search.")
        rescored: bool = Field(False, description="Whether the top candidates were re-scored (`rescore: true`).")
        rescore_ms: float | None = Field(None, description="Time spent re-scoring (within took_ms), when rescored.")

    class ErrorItem(BaseModel):
        """One validation problem: where (``loc``), what (``msg``), and pydantic's ``type``."""

        loc: list[str | int]
        msg: str
        type: str

    class ErrorResponse(BaseModel):
        """Any 4xx answer."""

        detail: str = Field(..., description="What was wrong, in one line.")
        errors: list[ErrorItem] | None = Field(None, description="Per-field validation errors.")

    class Health(BaseModel):
        """Liveness."""

        status: str
        version: str

    class Stats(BaseModel):
        """What is being served, and the server's counters."""

        items: int = Field(..., description="Number of images in the gallery.")
        embed_dim: int
        columns: list[str] = Field(..., description="Metadata columns usable in filters.")
        model: dict[str, Any] = Field(..., description="Fingerprint of the encoder that built the index.")
        index: dict[str, Any] = Field(..., description="The index's own info (sizes, search mode).")
        limits: dict[str, int]
        auth: bool = Field(..., description="Whether a token is required.")
        thumb_cache: dict[str, int]
        reloads: dict[str, int | str | None] = Field(
            ..., description="Index generations picked up since startup, and why the last reload failed (if it did)."
        )
        text_batches: dict[str, int] = Field(..., description="Encoder calls for text queries, and queries they served.")
        rescore: dict[str, Any] = Field(
            ..., description="Whether `rescore: true` is available and, if so, its k, mode and weight."
        )
        uptime_s: float

    err = {"model": ErrorResponse}
    auth_errors = {401: {**err, "description": "Missing or wrong token."}} if token else {}

    # ---- auth --------------------------------------------------------------------------
    dependencies = []
    if token:
        expected = token.encode("utf-8")
        bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer TOKEN`")
        query_key = APIKeyQuery(name="token", auto_error=False, description="`?token=TOKEN` (for links and <img>)")
        cookie_key = APIKeyCookie(name=TOKEN_COOKIE, auto_error=False, description="Set by opening `/?token=TOKEN`.")

        def _matches(candidate: str | None) -> bool:
            return candidate is not None and hmac.compare_digest(candidate.encode("utf-8"), expected)

        def require_token(
            cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
            q: Annotated[str | None, Depends(query_key)],
            c: Annotated[str | None, Depends(cookie_key)],
        ) -> None:
            # Check every offered credential: a stale cookie must not hide a good header.
            offered = [x for x in (cred.credentials if cred else None, q, c) if x is not None]
            if any(_matches(x) for x in offered):
                return
            detail = "wrong token" if offered else (
                "this server needs a token: send 'Authorization: Bearer TOKEN' or add ?token=TOKEN"
            )
            raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})

        dependencies = [Depends(require_token)]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(
        lifespan=lifespan,
        title=title,
        version=__version__,
        description="Text-based person search over a gallery of person crops. "
        "POST a description to `/search`; images are served by index id.",
        # The schema is served below, behind the token like every route but /health. No
        # /docs: Swagger UI loads its assets from a CDN, and this server loads nothing external.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.live = live
    app.state.encoder = encoder
    app.state.thumbs = thumbs
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, limits={"/search/image": MAX_UPLOAD_BYTES + 64 * 1024})

    # ---- errors: one readable line, never the (possibly huge) input echoed back --------
    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        items = []
        for e in exc.errors():
            loc = [x if isinstance(x, int) else str(x) for x in e.get("loc", ())]
            items.append({"loc": loc, "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
        for i in items:  # pydantic's wording for these is cryptic
            if i["type"] == "string_pattern_mismatch" and i["loc"][-1:] == ["text"]:
                i["msg"] = "the query is empty or only whitespace"
        first = items[0] if items else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(x) for x in first["loc"] if x != "body") or "body"
        detail = f"{where}: {first['msg']}"
        if any(i["type"] == "json_invalid" for i in items):
            detail = "the request body is not valid JSON: " + first["msg"]
        return JSONResponse({"detail": detail, "errors": items}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(
            {"detail": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    # ---- helpers -----------------------------------------------------------------------
    def _prefix(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def _hits_to_response(request: Request, hits, query: str, k: int, where, t0: float, bound=None):
        base = _prefix(request)
        results = []
        stage1 = bound.stage1[0] if bound is not None and bound.stage1 else {}
        for rank, h in enumerate(hits, start=1):
            cos = stage1.get(int(h.id))
            results.append(
                SearchHit(
                    id=int(h.id),
                    rank=rank,
                    score=float(h.score) if math.isfinite(float(h.score)) else -1.0,
                    name=Path(str(h.path)).name,
                    image_url=f"{base}/images/{int(h.id)}",
                    thumb_url=f"{base}/thumbs/{int(h.id)}",
                    metadata=_jsonable(dict(h.metadata or {})),
                    cosine=cos if cos is None or math.isfinite(cos) else None,
                )
            )
        return SearchResponse(
            query=query, k=k, where=where, results=results, took_ms=round((time.perf_counter() - t0) * 1e3, 3),
            rescored=bound is not None, rescore_ms=None if bound is None else round(bound.seconds * 1e3, 3),
        )

    def _where(filters, index) -> str | None:
        if filters is None:
            return None
        if isinstance(filters, dict):
            try:
                return filters_to_where(filters, list(index.columns))
            except ValueError as e:
                raise HTTPException(422, f"filters: {e}") from None
        return filters.strip() or None

    def _search(index, feats: np.ndarray, k: int, where: str | None, options: dict | None = None):
        n = len(index)
        if n == 0:
            return []
        k = min(k, n)
        try:
            return index.search(feats, k=k, where=where, **(search_options if options is None else options))[0]
        except filter_errors as e:
            raise HTTPException(422, f"filters: {e}") from None

    def _encode(fn, arg):
        with lock:
            return fn(arg)

    def _rescore_options(text: str):
        """(index.search options, the bound rescorer) re-scoring ``text``'s top candidates."""
        with lock:  # the rescorer shares the encoder's model, and its image cache is not thread-safe
            bound = rescorer.for_texts([text], depth=rescore_depth)

        def locked(*args):
            with lock:
                return bound(*args)

        return {"reranker": locked, "rerank_depth": rescore_depth}, bound

    def _image_path(item_id: int) -> Path:
        if item_id >= _MAX_ID:
            raise HTTPException(404, f"no image with id {item_id} in this index")
        try:
            path = Path(live.get().image_path(item_id))
        except (KeyError, IndexError):
            raise HTTPException(404, f"no image with id {item_id} in this index") from None
        if not path.is_file():
            raise HTTPException(404, f"the image file for id {item_id} is gone from disk")
        return path

    ItemId = Annotated[int, PathParam(ge=0, description="Gallery item id, as returned by /search.")]

    # ---- routes ------------------------------------------------------------------------
    @app.get("/health", response_model=Health, tags=["server"], summary="Liveness probe (no token needed)")
    def health():
        return Health(status="ok", version=__version__)

    @app.get(
        "/stats",
        response_model=Stats,
        tags=["server"],
        summary="Gallery size, model and index info",
        dependencies=dependencies,
        responses={**auth_errors},
    )
    def stats():
        index = live.get()
        info = index.info() if hasattr(index, "info") else {}
        return Stats(
            items=len(index),
            embed_dim=int(getattr(encoder, "embed_dim", 0)),
            columns=list(index.columns),
            model=_jsonable(dict(getattr(index, "fingerprint", {}) or {})),
            index=_jsonable(dict(info or {})),
            limits={"max_k": MAX_K, "max_query_chars": MAX_QUERY_CHARS, "max_upload_bytes": MAX_UPLOAD_BYTES},
            auth=bool(token),
            thumb_cache={"items": len(thumbs), "capacity": thumbs.capacity, "hits": thumbs.hits, "misses": thumbs.misses},
            text_batches={"batches": batcher.batches, "queries": batcher.queries, "max_batch": batcher.max_batch},
            rescore=rescore_info,
            reloads={"count": live.reloads, "error": live.error},
            uptime_s=round(time.time() - started, 3),
        )

    @app.post(
        "/search",
        response_model=SearchResponse,
        tags=["search"],
        summary="Search the gallery by a text description",
        dependencies=dependencies,
        responses={
            400: {**err, "description": "The body could not be read (e.g. not UTF-8)."},
            413: {**err, "description": f"The body is over {MAX_BODY_BYTES} bytes."},
            422: {**err, "description": "Invalid query, k, or filter, or `rescore` asked of a server "
                  "that cannot re-score (the message says which)."},
            **auth_errors,
        },
    )
    def search(req: SearchRequest, request: Request):
        t0 = time.perf_counter()
        if req.rescore and rescorer is None:
            raise HTTPException(422, "rescore: this server cannot re-score; start it with `tbps serve INDEX "
                                "--rescore` on a checkpoint with a trained fusion encoder (recipe laip)")
        index = live.get()
        where = _where(req.filters, index)
        text = req.text.strip()
        feats = batcher(text)[None]  # (1, D) float32, L2-normalised
        k = min(req.k, len(index))
        options, bound = _rescore_options(text) if req.rescore else (None, None)
        hits = _search(index, np.asarray(feats, dtype=np.float32), k, where, options)
        return _hits_to_response(request, hits, text, k, where, t0, bound)

    @app.post(
        "/search/image",
        response_model=SearchResponse,
        tags=["search"],
        summary="Find by example: search with an uploaded image",
        dependencies=dependencies,
        responses={
            400: {**err, "description": "The upload is not a readable image."},
            413: {**err, "description": "The upload is too large."},
            422: {**err, "description": "Invalid k or filter."},
            **auth_errors,
        },
    )
    async def search_image(
        request: Request,
        file: Annotated[UploadFile, File(description="An image (JPEG, PNG, ...) of a person.")],
        k: Annotated[int, Form(ge=1, le=MAX_K, description="How many results (clamped to the gallery size).")] = 10,
        filters: Annotated[str | None, Form(max_length=MAX_FILTER_CHARS, description="A `where` expression.")] = None,
    ):
        from PIL import Image, UnidentifiedImageError
        from starlette.concurrency import run_in_threadpool

        t0 = time.perf_counter()
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
        index = live.get()
        where = _where(filters, index)

        def work():  # decoding and encoding are CPU work: keep them off the event loop
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    pixels = encoder.preprocess(im)  # (3, H, W)
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
                name = file.filename or "upload"
                raise HTTPException(400, f"the upload {name!r} is not a readable image ({type(e).__name__})") from None
            feats = _encode(encoder.encode_images, pixels.unsqueeze(0))  # (1, D)
            kk = min(k, len(index))
            return kk, _search(index, np.asarray(feats, dtype=np.float32), kk, where)

        kk, hits = await run_in_threadpool(work)
        return _hits_to_response(request, hits, file.filename or "upload", kk, where, t0)

    @app.get(
        "/images/{item_id}",
        tags=["images"],
        summary="The original gallery image",
        dependencies=dependencies,
        response_class=FileResponse,
        responses={
            200: {"content": {"image/*": {}}, "description": "The image file."},
            404: {**err, "description": "No such id, or its file is gone."},
            422: {**err, "description": "The id is not a non-negative integer."},
            **auth_errors,
        },
    )
    def image(item_id: ItemId):
        path = _image_path(item_id)
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    @app.get(
        "/thumbs/{item_id}",
        tags=["images"],
        summary=f"A JPEG thumbnail fitting {THUMB_BOX[0]}x{THUMB_BOX[1]}",
        dependencies=dependencies,
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}}, "description": "The thumbnail."},
            404: {**err, "description": "No such id, or its file is gone or unreadable."},
            422: {**err, "description": "The id is not a non-negative integer."},
            **auth_errors,
        },
    )
    def thumb(item_id: ItemId):
        path = _image_path(item_id)
        try:
            mtime = path.stat().st_mtime_ns
            data = thumbs.get((item_id, mtime), lambda: make_thumbnail(path))
        except (OSError, ValueError) as e:
            raise HTTPException(404, f"the image for id {item_id} cannot be read ({type(e).__name__})") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/openapi.json", include_in_schema=False, dependencies=dependencies)
    def openapi_schema():
        return JSONResponse(app.openapi())

    # ---- the page ----------------------------------------------------------------------
    @app.get("/", include_in_schema=False, dependencies=dependencies)
    def page(request: Request):
        html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        resp = HTMLResponse(html, headers={"Cache-Control": "no-cache"})
        q = request.query_params.get("token")
        if token and q is not None and hmac.compare_digest(q.encode("utf-8"), token.encode("utf-8")):
            resp.set_cookie(TOKEN_COOKIE, q, httponly=True, samesite="strict", path="/")
        return resp

    @app.get("/static/{name}", include_in_schema=False, dependencies=dependencies)
    def static(name: str):
        if name not in STATIC_FILES:  # a fixed list: no client path reaches the filesystem
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    return app
