"""The server's routes: module-level handlers that read what they serve from ``request.app.state``.

``create_app`` (``tbps.serve.app``) fills the state: ``live`` (``live.get()`` is the current
index), ``encoder``, ``lock`` (one encoder call at a time), ``batcher``, ``thumbs``, ``token``,
``search_options`` (the ``reranker`` for every query), ``rescorer``, ``rescore_depth``,
``rescore_info`` and ``started``. ``public`` holds ``/health``; ``router`` every other route,
which ``create_app`` puts behind the token when one is set.

(No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.)
"""

import functools
import math
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tbps.index.errors import FilterError, QueryError
from tbps.index.filters import filter_text
from tbps.serve.auth import TOKEN_COOKIE, token_matches
from tbps.serve.runtime import (
    IMAGE_CSP,
    THUMB_BOX,
    GalleryFileError,
    check_gallery_file,
    make_thumbnail,
    read_gallery_file,
    sniff_image,
)
from tbps.serve.schemas import (
    ERROR,
    MAX_BODY_BYTES,
    MAX_FILTER_CHARS,
    MAX_K,
    MAX_QUERY_CHARS,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
    Health,
    SearchRequest,
    SearchResponse,
    Stats,
)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {  # the only files the page may load: name -> media type
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_MAX_ID = 2**62  # ids above this cannot exist; refuse before numpy sees them
_CACHE_AN_HOUR = {"Cache-Control": "private, max-age=3600"}
_NO_RESCORER = ("rescore: this server cannot re-score; start it with `tbps serve INDEX --rescore` on a "
                "checkpoint with a trained fusion encoder (recipe laip)")

_TOKEN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tbps search: token needed</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><h1>tbps search</h1>
<p>This server needs the token it was started with (<code>--token</code> or <code>$TBPS_TOKEN</code>).</p>
<form method="get" action="ACTION"><label>Token <input name="token" type="password" autocomplete="current-password"
required autofocus></label> <button type="submit">Open</button></form>
<p>API clients send <code>Authorization: Bearer TOKEN</code>.</p></body></html>
"""

public = APIRouter()
router = APIRouter()

ItemId = Annotated[int, PathParam(ge=0, description="Gallery item id, as returned by /search.")]


# ---- errors: one readable line, never the (possibly huge) input echoed back -----------


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 whose ``detail`` names the first problem; ``errors`` lists them all."""
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


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Any HTTP error as ``{"detail": "..."}``, with its headers (``WWW-Authenticate``); a browser
    asking for a page without the token gets a page where it can enter it instead."""
    if exc.status_code == 401 and request.method == "GET" and "text/html" in request.headers.get("accept", ""):
        base = request.scope.get("root_path", "").rstrip("/")
        return HTMLResponse(_TOKEN_PAGE.replace("ACTION", f"{base}/"), status_code=401,
                            headers=getattr(exc, "headers", None))
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


# ---- helpers --------------------------------------------------------------------------


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


def _jsonable_record(meta: dict) -> dict:
    """``_jsonable(dict(meta))``, at the cost of a copy when every key is a ``str`` and every
    value a ``str``, ``int``, None or finite float (the metadata as SQLite returns it)."""
    for key, v in meta.items():
        t = type(v)
        if type(key) is not str or not (t is str or t is int or v is None or (t is float and math.isfinite(v))):
            return _jsonable(dict(meta))
    return dict(meta)


@functools.lru_cache(maxsize=65536)
def _file_name(path: str) -> str:
    """The file name of a gallery path (no folder: no server path to the client)."""
    return Path(path).name


def _filter_of(filters: str | dict | None) -> tuple[str | dict | None, str | None]:
    """(what the index filters by, the expression the response shows as ``where``)."""
    if isinstance(filters, dict):  # the index binds the dict's values itself
        return filters or None, filter_text(filters)
    where = (filters.strip() or None) if filters is not None else None
    return where, where


def _search(state, index, feats: np.ndarray, k: int, where, options: dict | None = None) -> list:
    """The index's hits for the (1, D) query ``feats``; a bad filter or query is a 422."""
    try:
        if len(index) == 0:
            if isinstance(where, dict):
                index.filter_ids(where)  # an unknown column is an error even in an empty gallery
            return []
        options = state.search_options if options is None else options
        return index.search(np.asarray(feats, dtype=np.float32), k=min(k, len(index)), where=where, **options)[0]
    except (FilterError, QueryError) as e:
        raise HTTPException(422, f"filters: {e}") from None


def _rescored_query(state, text: str):
    """One text pass for a re-scored query -> its (1, D) stage-1 feature, the ``index.search``
    options that re-score its top candidates, and the bound rescorer (timings, stage-1 scores)."""
    with state.lock:  # the rescorer shares the encoder's model, and its image cache is not thread-safe
        bound = state.rescorer.for_texts([text], depth=state.rescore_depth)

    def locked(*args):
        with state.lock:
            return bound(*args)

    return bound.query_features, {"reranker": locked, "rerank_depth": state.rescore_depth}, bound


def _encode_upload(state, data: bytes, name: str) -> np.ndarray:
    """(1, D) features of an uploaded image; one that cannot be read is a 400, one over
    ``MAX_UPLOAD_PIXELS`` (after JPEG's draft decoding) a 413. At most ``decode_slots`` decode at once."""
    from tbps.data.images import ImageError, ImageTooLarge, open_image

    try:
        with state.decodes:  # bounds the memory concurrent decodes take
            pixels = state.encoder.preprocess(open_image(data, max_pixels=MAX_UPLOAD_PIXELS, draft=(1024, 1024)))
    except ImageTooLarge as e:
        raise HTTPException(413, f"the upload {name!r} is too large an image: {str(e).removeprefix('image: ')}") from None
    except (ImageError, OSError, ValueError) as e:
        raise HTTPException(400, f"the upload {name!r} is not a readable image ({type(e).__name__})") from None
    with state.lock:
        return state.encoder.encode_images(pixels.unsqueeze(0))


def _response(request: Request, hits, query: str, k: int, where: str | None, t0: float, bound=None,
              unknown: dict | None = None) -> dict:
    """The body of a ``SearchResponse``, as a dict (FastAPI validates it against the model in one
    call and writes the JSON: the same answer as building the models here, at less cost)."""
    base = request.scope.get("root_path", "").rstrip("/")
    stage1 = bound.stage1[0] if bound is not None and bound.stage1 else {}
    results = []
    for rank, h in enumerate(hits, start=1):
        item, score, cos = int(h.id), float(h.score), stage1.get(int(h.id))
        results.append({
            "id": item,
            "rank": rank,
            "score": score if math.isfinite(score) else -1.0,
            "cosine": cos if cos is None or math.isfinite(cos) else None,
            "name": _file_name(str(h.path)),
            "image_url": f"{base}/images/{item}",
            "thumb_url": f"{base}/thumbs/{item}",
            "metadata": _jsonable_record(h.metadata or {}),
        })
    return {
        "query": query, "k": k, "where": where, "results": results, "took_ms": round((time.perf_counter() - t0) * 1e3, 3),
        "rescored": bound is not None, "rescore_ms": None if bound is None else round(bound.seconds * 1e3, 3),
        "unknown_words": {w: {n: round(p, 4) for n, p in near} for w, near in (unknown or {}).items()},
    }


def _gallery_item(state, item_id: int) -> tuple[Path, dict, str | None]:
    """(image path, its recorded metadata, the index's images folder) of item ``item_id``."""
    if item_id >= _MAX_ID:
        raise HTTPException(404, f"no image with id {item_id} in this index")
    index = state.live.get()
    try:
        hit = index.get(item_id)
    except (KeyError, IndexError):
        raise HTTPException(404, f"no image with id {item_id} in this index") from None
    images_dir = (getattr(index, "manifest", None) or {}).get("images_dir")
    return Path(hit.path), dict(hit.metadata or {}), images_dir


def _refused(item_id: int, e: GalleryFileError) -> HTTPException:
    return HTTPException(404, f"the image file for id {item_id} {e}")


# ---- routes ---------------------------------------------------------------------------


@public.get("/health", response_model=Health, tags=["server"], summary="Liveness probe (no token needed)")
def health(request: Request):
    return Health(status="ok", version=request.app.version)


@router.get("/stats", response_model=Stats, tags=["server"], summary="Gallery size, model and index info")
def stats(request: Request):
    state = request.app.state
    index, thumbs, batcher = state.live.get(), state.thumbs, state.batcher
    info = dict(index.info()) if hasattr(index, "info") else {}
    for key in ("path", "images_dir", "checkpoint"):  # names only: no server paths to the client
        if info.get(key):
            info[key] = Path(str(info[key])).name
    return Stats(
        items=len(index),
        embed_dim=int(getattr(state.encoder, "embed_dim", 0)),
        columns=list(index.columns),
        model=_jsonable(dict(getattr(index, "fingerprint", {}) or {})),
        index=_jsonable(dict(info or {})),
        limits={"max_k": MAX_K, "max_query_chars": MAX_QUERY_CHARS, "max_upload_bytes": MAX_UPLOAD_BYTES},
        auth=bool(state.token),
        thumb_cache={"items": len(thumbs), "capacity": thumbs.capacity, "hits": thumbs.hits, "misses": thumbs.misses},
        text_batches={"batches": batcher.batches, "queries": batcher.queries, "max_batch": batcher.max_batch},
        rescore=state.rescore_info,
        reloads={"count": state.live.reloads, "error": state.live.error},
        uptime_s=round(time.time() - state.started, 3),
    )


@router.post(
    "/search",
    response_model=SearchResponse,
    tags=["search"],
    summary="Search the gallery by a text description",
    responses={
        400: {**ERROR, "description": "The body could not be read (e.g. not UTF-8)."},
        413: {**ERROR, "description": f"The body is over {MAX_BODY_BYTES} bytes."},
        422: {**ERROR, "description": "Invalid query, k, or filter, or `rescore` asked of a server "
              "that cannot re-score (the message says which)."},
    },
)
async def search(req: SearchRequest, request: Request):
    # A coroutine: the request waits for the batcher without a thread of its own; the batcher's
    # worker encodes the query with the others waiting and searches the index right after.
    state = request.app.state
    t0 = time.perf_counter()
    if req.rescore and state.rescorer is None:
        raise HTTPException(422, _NO_RESCORER)
    index = await _current_index(state)
    where, shown = _filter_of(req.filters)
    text = req.text.strip()
    k = min(req.k, len(index))
    if req.rescore:  # the rescorer's one text pass gives the stage-1 feature too
        from starlette.concurrency import run_in_threadpool

        hits, bound = await run_in_threadpool(_rescored_search, state, index, text, k, where)
    else:  # encoded with the queries waiting beside it, then searched by search_batch
        hits, bound = await state.batcher.encode(text, (index, k, where)), None
    # After encoding, which has mapped every unseen word: a look-up, no encoder call.
    return _response(request, hits, text, k, shown, t0, bound, state.unknown_words(text))


def search_batch(state, jobs: list[tuple[tuple, np.ndarray]]) -> list:
    """The batcher's finish step: for each ``((index, k, where), feature)`` its hits, or the
    exception its request raises. Plain queries are searched with one ``search_many`` call (the same hits as one by one); filtered ones, and every query when
    the server re-ranks, one by one."""
    out: list = [None] * len(jobs)
    plain: dict[int, list[int]] = {}  # id(index) -> positions of its plain queries
    for i, ((index, k, where), _) in enumerate(jobs):
        if where is None and not state.search_options and len(index):
            plain.setdefault(id(index), []).append(i)
    for group in plain.values():
        index = jobs[group[0]][0][0]
        try:
            found = index.search_many(np.stack([jobs[i][1] for i in group]), [jobs[i][0][1] for i in group])
        except (FilterError, QueryError) as e:
            found = [HTTPException(422, f"filters: {e}")] * len(group)
        except Exception as e:  # noqa: BLE001 - raised by each request of the group
            found = [e] * len(group)
        for i, hits in zip(group, found):
            out[i] = hits
    for i, ((index, k, where), feat) in enumerate(jobs):
        if out[i] is None:
            try:
                out[i] = _search(state, index, feat[None], k, where)
            except Exception as e:  # noqa: BLE001 - raised by the request that asked
                out[i] = e
    return out


async def _current_index(state):
    """``state.live.get()``, off the event loop when it may open a new generation (disk reads)."""
    if not state.live.check_due():
        return state.live.get()
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(state.live.get)


def _rescored_search(state, index, text: str, k: int, where):
    feats, options, bound = _rescored_query(state, text)
    return _search(state, index, feats, k, where, options), bound


@router.post(
    "/search/image",
    response_model=SearchResponse,
    tags=["search"],
    summary="Find by example: search with an uploaded image",
    responses={
        400: {**ERROR, "description": "The upload is not a readable image."},
        413: {**ERROR, "description": "The upload is too large."},
        422: {**ERROR, "description": "Invalid k or filter."},
    },
)
async def search_image(
    request: Request,
    file: Annotated[UploadFile, File(description="An image (JPEG, PNG, ...) of a person.")],
    k: Annotated[int, Form(ge=1, le=MAX_K, description="How many results (clamped to the gallery size).")] = 10,
    filters: Annotated[str | None, Form(max_length=MAX_FILTER_CHARS, description="A `where` expression.")] = None,
):
    from starlette.concurrency import run_in_threadpool

    state = request.app.state
    t0 = time.perf_counter()
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"upload larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    index = state.live.get()
    where, shown = _filter_of(filters)
    name = file.filename or "upload"
    k = min(k, len(index))

    def work():  # decoding and encoding are CPU work: keep them off the event loop
        return _search(state, index, _encode_upload(state, data, name), k, where)

    hits = await run_in_threadpool(work)
    return _response(request, hits, name, k, shown, t0)


@router.get(
    "/images/{item_id}",
    tags=["images"],
    summary="The original gallery image",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "The image file, typed by its content."},
        404: {**ERROR, "description": "No such id, or its file is gone, changed, a link or not an image."},
        422: {**ERROR, "description": "The id is not a non-negative integer."},
    },
)
def image(item_id: ItemId, request: Request):
    # The bytes checked against the index (size, SHA-256, no link) and typed by their content,
    # never by the file's name: a JPEG with HTML appended, named x.html, is an image/jpeg.
    path, record, images_dir = _gallery_item(request.app.state, item_id)
    try:
        data = read_gallery_file(path, record, images_dir)
    except GalleryFileError as e:
        raise _refused(item_id, e) from None
    media = sniff_image(data)
    if media is None:
        raise HTTPException(404, f"the file for id {item_id} is not an image this server serves")
    return Response(data, media_type=media, headers={**_CACHE_AN_HOUR, "Content-Security-Policy": IMAGE_CSP})


@router.get(
    "/thumbs/{item_id}",
    tags=["images"],
    summary=f"A JPEG thumbnail fitting {THUMB_BOX[0]}x{THUMB_BOX[1]}",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "The thumbnail."},
        404: {**ERROR, "description": "No such id, or its file is gone or unreadable."},
        422: {**ERROR, "description": "The id is not a non-negative integer."},
    },
)
def thumb(item_id: ItemId, request: Request):
    from tbps.data.images import ImageError

    state = request.app.state
    path, record, images_dir = _gallery_item(state, item_id)

    def make() -> bytes:
        raw = read_gallery_file(path, record, images_dir)
        with state.decodes:
            return make_thumbnail(raw, max_pixels=state.max_image_pixels)

    try:
        st = check_gallery_file(path, record, images_dir)
        data = state.thumbs.get((item_id, st.st_mtime_ns, st.st_size), make)
    except GalleryFileError as e:
        raise _refused(item_id, e) from None
    except (ImageError, OSError) as e:
        raise HTTPException(404, f"the image for id {item_id} cannot be read ({type(e).__name__})") from None
    return Response(data, media_type="image/jpeg", headers=_CACHE_AN_HOUR)


@router.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request):
    return JSONResponse(request.app.openapi())


# ---- the page -------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
def page(request: Request):
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    resp = HTMLResponse(html, headers={"Cache-Control": "no-cache"})
    q = request.query_params.get("token")
    if token_matches(q, request.app.state.token):  # opened as /?token=TOKEN: remember it in a cookie
        resp.set_cookie(TOKEN_COOKIE, q, httponly=True, samesite="strict", path="/")
    return resp


@router.get("/static/{name}", include_in_schema=False)
def static(name: str):
    if name not in STATIC_FILES:  # a fixed list: no client path reaches the filesystem
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})
