"""What the server runs on besides its routes: the text batcher, the live index, the
thumbnail cache and the request-body limit. Plain Python (no FastAPI), each usable alone."""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

THUMB_BOX = (160, 320)  # (W, H) bounding box; person crops are tall
THUMB_CACHE_ITEMS = 2048  # ~8 KB each -> ~16 MB at most


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
    """Encode concurrent text queries together: ``__call__(text) -> (D,)`` blocks until done,
    ``await encode(text)`` waits on the event loop without holding a thread.

    One worker thread takes whatever queries are waiting (up to ``max_batch``) and encodes
    them in one ``encode_texts`` call, so under load the model sees batches, and an idle
    server adds no delay (a lone query is encoded at once). Encoder calls never overlap:
    ``lock`` is shared with the image-search path.

    A query may come with a ``job``: the worker then hands the batch's ``(job, feature)``
    pairs to ``finish`` right after the encoder call (outside ``lock``), and each caller gets
    its element of what ``finish`` returns (an exception in that list is raised to that
    caller alone). The server searches the index there, all the batch's plain queries in one
    call, so a request costs no thread of its own and no hop from thread to thread.
    """

    def __init__(self, encode_texts: Callable[[list[str]], np.ndarray], lock: threading.Lock, max_batch: int = 32,
                 finish: Callable[[list[tuple[Any, np.ndarray]]], list] | None = None):
        self.encode_texts = encode_texts
        self.lock = lock
        self.max_batch = int(max_batch)
        self.finish = finish
        self.batches = 0
        self.queries = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def __call__(self, text: str, job: Any = None):
        from concurrent.futures import Future

        fut: Future = Future()
        self._submit(text, job, fut)
        return fut.result()

    async def encode(self, text: str, job: Any = None):
        """The (D,) feature of ``text`` (or, with a ``job``, its result), awaited on the running loop."""
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._submit(text, job, (loop, fut))
        return await fut

    def _submit(self, text: str, job: Any, reply) -> None:
        if job is not None and self.finish is None:
            raise ValueError("this TextBatcher has no finish step to run jobs")
        if self._thread is None or not self._thread.is_alive():
            with self._start_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name="tbps-text-batcher", daemon=True)
                    self._thread.start()
        self._queue.put((text, job, reply))

    @property
    def waiting(self) -> int:
        """Queries queued and not yet taken into a batch (a snapshot: others may be arriving)."""
        return self._queue.qsize()

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
            _reply([job[2] for job in batch], self._run(batch))

    def _run(self, batch: list) -> list:
        """Each query's answer (its feature, its job's result, or the exception to raise)."""
        try:
            with self.lock:
                feats = self.encode_texts([text for text, *_ in batch])  # (B, D)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request, which re-raises it
            return [e] * len(batch)
        self.batches += 1
        self.queries += len(batch)
        out: list = [feats[i] for i in range(len(batch))]
        jobs = [i for i, (_, job, *_) in enumerate(batch) if job is not None]
        if jobs:
            try:
                done = self.finish([(batch[i][1], feats[i]) for i in jobs])
            except BaseException as e:  # noqa: BLE001 - each job's caller re-raises it
                done = [e] * len(jobs)
            for i, result in zip(jobs, done):
                out[i] = result
        return out


def _reply(replies: list, answers: list) -> None:
    """Hand each answer (a result, or an exception to raise) to its caller: a
    ``concurrent.futures.Future``, or a ``(loop, asyncio future)`` pair; the futures of one
    event loop are settled in one call on that loop (one wake-up per batch, not per query)."""
    by_loop: dict = {}
    for reply, answer in zip(replies, answers):
        if isinstance(reply, tuple):
            by_loop.setdefault(reply[0], []).append((reply[1], answer))
        elif isinstance(answer, BaseException):
            reply.set_exception(answer)
        else:
            reply.set_result(answer)
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, pairs)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(pairs: list) -> None:
    for fut, answer in pairs:
        if fut.done():  # cancelled meanwhile: its client left
            continue
        if isinstance(answer, BaseException):
            fut.set_exception(answer)
        else:
            fut.set_result(answer)


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

    def check_due(self) -> bool:
        """Whether the next ``get()`` looks at the manifest on disk (and may open a new generation)."""
        return self.manifest is not None and time.monotonic() >= self.next_check

    def get(self):
        """The current index (one call per request, so a request sees one generation)."""
        if not self.check_due():
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


def make_thumbnail(path, box: tuple[int, int] = THUMB_BOX, quality: int = 85,
                   max_pixels: int | None = None) -> bytes:
    """A JPEG of the image at ``path`` (a path or bytes) shrunk to fit ``box`` (W, H), aspect kept;
    ``tbps.data.images.ImageError`` if it cannot be read or decodes to over ``max_pixels``."""
    from PIL import Image

    from tbps.data.images import open_image

    # upright and RGB as the index embedded it; JPEG decoders downscale while reading (draft)
    im = open_image(path, max_pixels=max_pixels, draft=box)
    im.thumbnail(box, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


# ---- serving untrusted galleries --------------------------------------------------------

# What an original may be served as: PIL's name of the format it decodes as -> media type.
# Anything else (or a file PIL cannot identify) is not served as it is.
SERVED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                  "BMP": "image/bmp", "TIFF": "image/tiff"}
IMAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"  # an image shown alone runs nothing
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class GalleryFileError(Exception):
    """A gallery file that must not be served: gone, replaced, a link out of the gallery, changed."""


def check_gallery_file(path: str | os.PathLike, record: dict, images_dir: str | None) -> os.stat_result:
    """The ``stat`` of an indexed image file, or ``GalleryFileError`` saying why it cannot be served.

    Paths are recorded resolved, so a symbolic link anywhere on the way now (the file or a
    folder replaced by one) means it changed since indexing; the file must lie under the
    index's ``images_dir`` and still have its recorded size.
    """
    p = str(path)
    real = os.path.realpath(p)
    if real != p:
        raise GalleryFileError("was replaced by a link since it was indexed")
    if images_dir and os.path.commonpath([real, os.path.realpath(images_dir)]) != os.path.realpath(images_dir):
        raise GalleryFileError("is outside the gallery folder")
    try:
        st = os.stat(p, follow_symlinks=False)
    except FileNotFoundError:
        raise GalleryFileError("is gone from disk") from None
    except OSError as e:
        raise GalleryFileError(f"cannot be read ({e.strerror or e})") from None
    import stat as stat_mod

    if not stat_mod.S_ISREG(st.st_mode):
        raise GalleryFileError("is not a regular file any more")
    size = record.get("size")
    if size is not None and int(size) != st.st_size:
        raise GalleryFileError(f"changed since it was indexed ({st.st_size} bytes, {size} recorded); "
                               "update the index with `tbps index add`")
    return st


def read_gallery_file(path: str | os.PathLike, record: dict, images_dir: str | None) -> bytes:
    """The bytes of an indexed image, checked as ``check_gallery_file`` does and against the
    recorded SHA-256 (read through ``O_NOFOLLOW``, hashed as read: what is hashed is served)."""
    import hashlib

    st = check_gallery_file(path, record, images_dir)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise GalleryFileError(f"cannot be read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(st.st_size + 1)
    sha = record.get("sha256")
    if len(data) != st.st_size or (sha and hashlib.sha256(data).hexdigest() != sha):
        raise GalleryFileError("changed since it was indexed; update the index with `tbps index add`")
    return data


def sniff_image(data: bytes) -> str | None:
    """The media type of an image by its content (PIL reads the header only), None unless it is
    one of ``SERVED_FORMATS``: a JPEG named ``x.html`` is served as ``image/jpeg``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return SERVED_FORMATS.get(im.format or "")
    except Exception:  # noqa: BLE001 - any file PIL cannot identify is not served as an image
        return None


class HostCheck:
    """ASGI middleware against DNS rebinding: only requests whose ``Host`` names this server.

    A page on ``evil.example`` that re-points its name at 127.0.0.1 reaches the server with
    ``Host: evil.example``; refusing names the server was not told to answer stops it.
    Accepted: IP literals (a rebinding needs a name), ``localhost`` and ``allowed``.
    """

    def __init__(self, app, allowed):
        self.app = app
        self.allowed = {h.lower().rstrip(".") for h in allowed}
        self._known: dict[str, bool] = {}  # the verdicts on the first Host values seen (bounded)

    def accepts(self, host: str) -> bool:
        import ipaddress

        name = host.strip().lower()
        if name.startswith("["):  # [::1]:8000
            name = name[1:].split("]", 1)[0]
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        name = name.rstrip(".")
        if name in self.allowed or name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        ok = self._known.get(host)
        if ok is None:
            ok = self.accepts(host)
            if len(self._known) < 64:  # a client's made-up names must not grow it
                self._known[host] = ok
        if ok:
            return await self.app(scope, receive, send)
        shown = host[:100]
        body = json.dumps({"detail": f"this server does not answer to host {shown!r}; start it with "
                           f"--allow-host {shown.split(':')[0] or 'NAME'} to allow that name"}).encode()
        await send({"type": "http.response.start", "status": 421,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """ASGI middleware: ``nosniff``, no framing, no referrer, and a CSP on every response (a
    route that sets its own ``Content-Security-Policy`` keeps it)."""

    HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"no-referrer"))

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in self.HEADERS if k not in names]
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
