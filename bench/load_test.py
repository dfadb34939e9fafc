"""Bounded load test of `tbps serve` on loopback: N concurrent clients POSTing /search.

    python bench/load_test.py                      # 32 clients, 30 s, 200-image synthetic gallery
    python bench/load_test.py --clients 8 --duration 10 --checkpoint runs/x/best.pt
    python bench/load_test.py --soak               # 32 clients, 5 minutes, image uploads mixed in
    python bench/load_test.py --compare main --rounds 2   # main's server and this tree's, side by side
    python bench/load_test.py --baseline-args "--http h11 --loop asyncio" --rounds 2   # two settings, one tree

It builds a small real index in a temporary folder (synthetic pedestrians from
``tbps.synth`` and, unless --checkpoint is given, an untrained tiny-vit checkpoint),
starts ``tbps serve`` as a subprocess on 127.0.0.1, waits for /health, runs the clients
(asyncio, one keep-alive connection each: ``RawHTTP``, a lean HTTP/1.1 client, or httpx with
``--client httpx``) with varied queries, k and filters, and prints requests/s, latency
percentiles, the error count and the CPU time per request of the server and of the load
generator (they share the cores). Exit status 1 if any request failed.

``--compare REV`` serves the same index from git revision REV's ``src/`` (exported to a
temporary folder) and from this tree in turn, ``--rounds`` times, and prints them side by side.
``--baseline-args ARGS`` does the same with this tree served twice, once with ``tbps serve``
arguments ARGS added (e.g. ``--http h11 --loop asyncio``: uvicorn's pure-Python parser and loop).

Soak mode (``--soak``: 32 clients for 300 s unless told otherwise) mixes image uploads into
the text queries (``--upload-share``, default 1 in 8): gallery crops, a 10000x10000 JPEG
(1.5 MB; the server decodes it at 1/8 scale) and a PNG that declares 12000x8000 pixels (a
decompression bomb: it must get a 413), and samples the server's memory: its resident set
at the start and end of the load and its peak (``VmHWM``), so a leak or a decode bomb shows
as a number. An answer other than the expected status counts as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import json as json_mod  # RawHTTP.post's argument is called json, as httpx's
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

COLOURS = ["red", "blue", "black", "white", "green", "yellow", "grey", "pink", "purple", "orange", "brown"]
TOPS = ["jacket", "t-shirt", "coat", "hoodie", "shirt", "sweater", "dress"]
BOTTOMS = ["jeans", "trousers", "shorts", "skirt", "pants"]
PEOPLE = ["man", "woman", "boy", "girl", "person", "young man", "older woman"]
EXTRAS = ["", " carrying a {c} backpack", " with a {c} handbag", " wearing {c} sneakers", " holding an umbrella"]


def random_query(rng: random.Random) -> dict:
    """A varied /search body: description, k in {5, 10, 20}, a filter one time in five."""
    def c() -> str:
        return rng.choice(COLOURS)

    text = (f"a {rng.choice(PEOPLE)} in a {c()} {rng.choice(TOPS)} and {c()} {rng.choice(BOTTOMS)}"
            + rng.choice(EXTRAS).format(c=c()))
    body: dict = {"text": text, "k": rng.choice([5, 10, 20])}
    roll = rng.random()
    if roll < 0.1:
        body["filters"] = {"camera": rng.choice(["c00", "c01"])}
    elif roll < 0.2:
        body["filters"] = f"person_id <= {rng.randint(1, 100)}"
    return body


def build_demo_index(root: Path, ids: int = 100, images_per_id: int = 2, checkpoint: str | None = None,
                     image_size: tuple[int, int] = (256, 128)) -> tuple[Path, Path]:
    """Synthetic gallery + metadata CSV (person_id, camera, split) + index; returns (index, checkpoint)."""
    import torch

    from tbps.synth import synthesize
    from tbps.index import build_index
    from tbps.retrieval.encoder import Encoder, create_untrained_checkpoint

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    stats = synthesize(root / "synth", ids=ids, images_per_id=images_per_id, image_size=image_size,
                       workers=0, progress=False)
    images = Path(stats["image_root"])
    records = json.loads(Path(stats["annotation_file"]).read_text())
    meta = root / "metadata.csv"
    with meta.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "person_id", "camera", "split"])
        for r in records:
            cam = re.search(r"_(c\d+)\.", r["file_path"])
            w.writerow([r["file_path"], r["id"], cam.group(1) if cam else "", r["split"]])
    ckpt = Path(checkpoint) if checkpoint else create_untrained_checkpoint(root / "ckpt" / "best.pt")
    encoder = Encoder.from_checkpoint(ckpt)
    build_index(root / "index", encoder, images, recursive=True, metadata_csv=meta, progress=False, checkpoint=ckpt)
    return root / "index", ckpt


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, threads: int | None, log: Path, max_batch: int = 32,
                 src: Path | None = None, extra: Sequence[str] = ()) -> subprocess.Popen:
    """``tbps serve`` on 127.0.0.1:``port`` with arguments ``extra`` added, run from the source
    tree ``src`` (default: the tbps this bench imports)."""
    import tbps

    cmd = [sys.executable, "-m", "tbps.cli.main", "serve", str(index), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--max-batch", str(max_batch)]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += list(extra)
    env = dict(os.environ, PYTHONPATH=str(src or Path(tbps.__file__).resolve().parents[1]))
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def export_tree(rev: str, dest: Path) -> Path:
    """The ``src`` folder of git revision ``rev`` of this repository, written under ``dest``."""
    repo = Path(__file__).resolve().parents[1]
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tbps serve exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"tbps serve not healthy after {timeout:.0f} s")


def soak_uploads(images: Path, n_crops: int = 6) -> list[tuple[str, bytes, int]]:
    """(name, bytes, the status the server must answer) of the soak's uploads: a few gallery
    crops, a 10000x10000 JPEG (200: decoded at 1/8 scale) and a 12000x8000 PNG bomb (413)."""
    import io
    import struct
    import zlib

    from PIL import Image

    crops = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n_crops]
    out = [(p.name, p.read_bytes(), 200) for p in crops]
    big = io.BytesIO()
    Image.new("L", (10000, 10000), 128).save(big, "JPEG", quality=75)  # ~1.5 MB, 100 MP
    out.append(("huge.jpg", big.getvalue(), 200))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 8000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    out.append(("bomb.png", bomb, 413))
    return out


def _pick_upload(rng: random.Random, uploads: list) -> tuple[str, bytes, int]:
    roll = rng.random()  # 70% crops, 20% the huge JPEG, 10% the bomb
    if roll < 0.1:
        return uploads[-1]
    if roll < 0.3:
        return uploads[-2]
    return rng.choice(uploads[:-2])


async def _one_request(client, rng: random.Random, uploads: list, upload_share: float):
    """(kind, ok, error text) of one request: a text search or, ``upload_share`` of the time, an upload."""
    if uploads and rng.random() < upload_share:
        name, data, expected = _pick_upload(rng, uploads)
        r = await client.post("/search/image", files={"file": (name, data)}, data={"k": "10"})
        ok = r.status_code == expected
        return "upload", ok, None if ok else f"upload {name}: {r.status_code}: {r.text[:200]}"
    body = random_query(rng)
    r = await client.post("/search", json=body)
    ok = r.status_code == 200 and len(r.json()["results"]) <= body["k"]
    return "text", ok, None if ok else f"{r.status_code}: {r.text[:200]}"


class RawHTTP:
    """A lean HTTP/1.1 keep-alive client on asyncio streams: one connection, one request at a
    time. The load generator shares the server's cores, and httpx spends about as much CPU on a
    request as the server does; this one a fraction, so the cores measure the server."""

    def __init__(self, base_url: str):
        host, port = base_url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.head = f"Host: {host}:{port}\r\nUser-Agent: tbps-load-test\r\nAccept: */*\r\n".encode()
        self.reader = self.writer = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def post(self, path: str, *, json=None, files=None, data=None) -> "RawResponse":
        if files is not None:
            body, ctype = _multipart(files, data or {})
        else:
            body, ctype = json_mod.dumps(json).encode(), "application/json"
        request = (b"POST " + path.encode() + b" HTTP/1.1\r\n" + self.head
                   + f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: once more, on a new one
            reused = self.writer is not None
            try:
                if not reused:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                self.writer.write(request)
                return await self._read()
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError, RawError) as e:
                await self.aclose()
                if isinstance(e, RawError) and reused and attempt == 1:
                    continue
                raise RawError(f"{type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    async def _read(self) -> "RawResponse":
        line = await self.reader.readline()
        if not line:
            raise RawError("the server closed the connection")
        status = int(line.split(b" ", 2)[1])
        length, chunked, close = None, False, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            parts = []
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readline()
            await self.reader.readline()
            body = b"".join(parts)
        else:
            body = await self.reader.readexactly(length or 0)
        if close:
            await self.aclose()
        return RawResponse(status, body)


class RawError(Exception):
    """A request the lean client could not complete (connection closed, bad answer)."""


class RawResponse:
    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json_mod.loads(self.content)


def _multipart(files: dict, data: dict) -> tuple[bytes, str]:
    boundary = "tbps-load-" + os.urandom(8).hex()
    out = []
    for key, value in data.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for key, (name, content) in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{name}"\r\n'
                   "Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def _percentiles(lat: list[float]) -> dict:
    lat = sorted(lat)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))] * 1e3, 1) if lat else float("nan")

    return {"p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": round(lat[-1] * 1e3, 1) if lat else None}


async def run_clients(url: str, clients: int, duration: float, seed: int, uploads: list | None = None,
                      upload_share: float = 0.0, client: str = "raw") -> dict:
    """``clients`` workers POST /search (and, ``upload_share`` of the time, /search/image) back
    to back for ``duration`` seconds, each on one keep-alive connection (``client``: "raw",
    ``RawHTTP``, or "httpx")."""
    import httpx

    latencies: dict[str, list[float]] = {"text": [], "upload": []}
    errors: list[str] = []
    stop_at = time.perf_counter() + duration

    def connect():
        return RawHTTP(url) if client == "raw" else httpx.AsyncClient(base_url=url, timeout=60.0)

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with connect() as conn:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    kind, ok, err = await _one_request(conn, rng, uploads or [], upload_share)
                except (httpx.HTTPError, RawError, ValueError, KeyError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                if not ok:
                    errors.append(err)
                    continue
                latencies[kind].append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    every = latencies["text"] + latencies["upload"]
    res = {
        "clients": clients, "client": client, "seconds": round(wall, 2), "requests": len(every) + len(errors),
        "errors": len(errors), "error_samples": errors[:5],
        "requests_per_s": round(len(every) / wall, 1), **_percentiles(every),
    }
    if uploads:
        res["uploads"] = {"requests": len(latencies["upload"]), **_percentiles(latencies["upload"])}
    return res


def rss_kib(pid: int) -> dict:
    """The resident set (VmRSS) and its peak so far (VmHWM) of process ``pid``, in KiB (Linux)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def measure(index: Path, args, log: Path, src: Path | None = None, extra: Sequence[str] = ()) -> dict:
    """Start a server (from ``src``, with ``extra`` arguments), warm it up, run the load, stop it:
    the figures of one run."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(index, port, args.server_threads, log, args.max_batch, src, extra)
    try:
        t0 = time.perf_counter()
        wait_healthy(url, proc)
        startup_s = time.perf_counter() - t0
        uploads = soak_uploads(index.parent / "synth") if args.soak else None
        share = args.upload_share if args.soak else 0.0
        asyncio.run(run_clients(url, min(4, args.clients), 2.0, args.seed + 1, uploads, share, args.client))  # warm-up
        batches0 = httpx.get(url + "/stats").json()["text_batches"]
        mem0, load0 = rss_kib(proc.pid), os.getloadavg()[0]
        server_cpu0, client_cpu0 = cpu_seconds(proc.pid), time.process_time()
        res = asyncio.run(run_clients(url, args.clients, args.duration, args.seed, uploads, share, args.client))
        server_cpu1, client_cpu = cpu_seconds(proc.pid), time.process_time() - client_cpu0
        mem1 = rss_kib(proc.pid)
        stats = httpx.get(url + "/stats").json()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    res["server_rss_mib"] = {"after_warmup": round(mem0.get("VmRSS", 0) / 1024, 1),
                             "end": round(mem1.get("VmRSS", 0) / 1024, 1),
                             "peak": round(mem1.get("VmHWM", 0) / 1024, 1)}
    n_req = max(1, res["requests"])
    # CPU per request, server and load generator: on a small shared machine the two
    # compete for the same cores, so these say where the time goes better than req/s
    res["server_cpu_ms_per_request"] = (round((server_cpu1 - server_cpu0) / n_req * 1e3, 2)
                                        if server_cpu0 is not None and server_cpu1 is not None else None)
    res["client_cpu_ms_per_request"] = round(client_cpu / n_req * 1e3, 2)
    tb = stats["text_batches"]
    res.update(gallery=stats["items"], search_mode=stats["index"].get("search_mode"),
               arch=stats["model"].get("arch"), server_startup_s=round(startup_s, 1),
               cpus=os.cpu_count(), max_batch=args.max_batch,
               load_avg_1m=[round(load0, 1), round(os.getloadavg()[0], 1)],
               mean_text_batch=round((tb["queries"] - batches0["queries"]) / max(1, tb["batches"] - batches0["batches"]), 2))
    return res


def print_run(res: dict) -> None:
    print(f"gallery {res['gallery']} images ({res['arch']}, {res['search_mode']} search), "
          f"{res['clients']} clients ({res['client']}) x {res['seconds']} s on {res['cpus']} CPUs "
          f"(load average {res['load_avg_1m'][0]} at the start, {res['load_avg_1m'][1]} at the end), "
          f"max batch {res['max_batch']}")
    print(f"requests {res['requests']}  ->  {res['requests_per_s']} req/s")
    print(f"latency p50 {res['p50_ms']} ms  p90 {res['p90_ms']} ms  p99 {res['p99_ms']} ms  max {res['max_ms']} ms")
    print(f"CPU per request: server {res['server_cpu_ms_per_request']} ms, "
          f"load generator {res['client_cpu_ms_per_request']} ms")
    print(f"text queries per encoder call (mean): {res['mean_text_batch']}")
    if "uploads" in res:
        u = res["uploads"]
        print(f"uploads {u['requests']}: p50 {u['p50_ms']} ms  p99 {u['p99_ms']} ms  max {u['max_ms']} ms")
    m = res["server_rss_mib"]
    print(f"server memory (RSS): {m['after_warmup']} MiB after warm-up, {m['end']} MiB at the end, "
          f"peak {m['peak']} MiB")
    print(f"errors {res['errors']}" + (f"  e.g. {res['error_samples']}" if res["errors"] else ""))


def print_comparison(runs: list[tuple[str, dict]]) -> None:
    """One row per run, then each server's median and the ratio new / old."""
    cols = ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "errors", "server_cpu_ms_per_request",
            "client_cpu_ms_per_request", "mean_text_batch")
    head = ("server", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "srv CPU ms/req",
            "gen CPU ms/req", "queries/call", "load avg")
    rows = [(label, *(r[c] for c in cols), "{} -> {}".format(*r["load_avg_1m"])) for label, r in runs]
    labels = list(dict.fromkeys(label for label, _ in runs))
    for label in labels:
        mine = [r for lab, r in runs if lab == label]
        if len(mine) > 1:
            rows.append((f"{label} (median)", *(round(_median([r[c] for r in mine]), 2) for c in cols), ""))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    if len(labels) == 2:
        old, new = ([r for lab, r in runs if lab == label] for label in labels)
        print(f"{labels[1]} / {labels[0]}: requests/s x{_median([r['requests_per_s'] for r in new]) / _median([r['requests_per_s'] for r in old]):.2f}, "
              f"p99 x{_median([r['p99_ms'] for r in new]) / _median([r['p99_ms'] for r in old]):.2f}, "
              f"server CPU per request x{_median([r['server_cpu_ms_per_request'] for r in new]) / _median([r['server_cpu_ms_per_request'] for r in old]):.2f}")


def _median(values: list) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else round((values[mid - 1] + values[mid]) / 2, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (default 30; --soak 300)")
    ap.add_argument("--soak", action="store_true",
                    help="soak mode: image uploads mixed in, the server's memory sampled (default 300 s)")
    ap.add_argument("--upload-share", type=float, default=0.125, help="--soak: share of requests that upload")
    ap.add_argument("--ids", type=int, default=100, help="synthetic identities (2 images each; default 100)")
    ap.add_argument("--checkpoint", help="checkpoint to index with (default: untrained tiny-vit)")
    ap.add_argument("--server-threads", type=int, default=None, help="torch threads in the server")
    ap.add_argument("--max-batch", type=int, default=32, help="server's text batch size (1: no batching)")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="load generator: raw (a lean asyncio HTTP/1.1 client, default) or httpx")
    ap.add_argument("--compare", metavar="REV",
                    help="also serve from git revision REV (e.g. main) and print both side by side")
    ap.add_argument("--baseline-args", metavar="ARGS",
                    help="also serve this tree with these `tbps serve` arguments added (e.g. \"--http h11 --loop "
                    "asyncio\") and print both side by side")
    ap.add_argument("--rounds", type=int, default=1,
                    help="--compare, --baseline-args: alternate the two servers this many times")
    ap.add_argument("--workdir", help="keep the gallery/index here (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    args.duration = args.duration or (300.0 if args.soak else 30.0)
    if args.compare and args.baseline_args:
        ap.error("--compare and --baseline-args are alternatives (one baseline at a time)")

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tbps-load-"))
    root.mkdir(parents=True, exist_ok=True)
    rev_dir = Path(tempfile.mkdtemp(prefix="tbps-rev-")) if args.compare else None
    try:
        if (root / "index" / "manifest.json").exists():  # --workdir from an earlier run: reuse
            index = root / "index"
        else:
            index, _ = build_demo_index(root, ids=args.ids, checkpoint=args.checkpoint)
        trees: list[tuple[str, Path | None, list[str]]] = [("this tree", None, [])]
        if args.compare:
            trees.insert(0, (args.compare, export_tree(args.compare, rev_dir), []))
        elif args.baseline_args:
            trees.insert(0, (args.baseline_args, None, shlex.split(args.baseline_args)))
        runs = []
        for _ in range(args.rounds if len(trees) > 1 else 1):
            for label, src, extra in trees:
                runs.append((label, measure(index, args, root / "server.log", src, extra)))
                if not args.json:
                    print(f"--- {label}")
                    print_run(runs[-1][1])
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
        if rev_dir is not None:
            shutil.rmtree(rev_dir, ignore_errors=True)
    if args.json:
        print(json.dumps([{"server": label, **r} for label, r in runs], indent=2))
    elif len(runs) > 1:
        print(f"--- side by side: {args.compare or args.baseline_args} vs this tree, {args.clients} clients ({args.client}) x "
              f"{args.duration:g} s each, gallery {runs[0][1]['gallery']} images")
        print_comparison(runs)
    return 1 if any(r["errors"] for _, r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
