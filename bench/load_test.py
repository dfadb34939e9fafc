"""Bounded load test of `tbps serve` on loopback: N concurrent clients POSTing /search.

    python bench/load_test.py                      # 32 clients, 30 s, 200-image synthetic gallery
    python bench/load_test.py --clients 8 --duration 10 --checkpoint runs/x/best.pt

It builds a small real index in a temporary folder (synthetic pedestrians from
``tbps.synth`` and, unless --checkpoint is given, an untrained tiny-vit checkpoint),
starts ``tbps serve`` as a subprocess on 127.0.0.1, waits for /health, runs the clients
(asyncio + httpx, one connection each) with varied queries, k and filters, and prints
requests/s, latency percentiles and the error count. Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def start_server(index: Path, port: int, threads: int | None, log: Path, max_batch: int = 32) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tbps.cli.main", "serve", str(index), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--max-batch", str(max_batch)]
    if threads:
        cmd += ["--threads", str(threads)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


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


async def run_clients(url: str, clients: int, duration: float, seed: int) -> dict:
    """``clients`` workers POST /search back to back for ``duration`` seconds."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + duration

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
            while time.perf_counter() < stop_at:
                body = random_query(rng)
                t0 = time.perf_counter()
                try:
                    r = await client.post("/search", json=body)
                    if r.status_code != 200 or len(r.json()["results"]) > body["k"]:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))] * 1e3 if lat else float("nan")

    return {
        "clients": clients, "seconds": round(wall, 2), "requests": len(lat) + len(errors),
        "errors": len(errors), "error_samples": errors[:5],
        "requests_per_s": round(len(lat) / wall, 1), "p50_ms": round(pct(50), 1), "p90_ms": round(pct(90), 1),
        "p99_ms": round(pct(99), 1), "max_ms": round(lat[-1] * 1e3, 1) if lat else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    ap.add_argument("--ids", type=int, default=100, help="synthetic identities (2 images each; default 100)")
    ap.add_argument("--checkpoint", help="checkpoint to index with (default: untrained tiny-vit)")
    ap.add_argument("--server-threads", type=int, default=None, help="torch threads in the server")
    ap.add_argument("--max-batch", type=int, default=32, help="server's text batch size (1: no batching)")
    ap.add_argument("--workdir", help="keep the gallery/index here (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tbps-load-"))
    root.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        t0 = time.perf_counter()
        if (root / "index" / "manifest.json").exists():  # --workdir from an earlier run: reuse
            index = root / "index"
        else:
            index, _ = build_demo_index(root, ids=args.ids, checkpoint=args.checkpoint)
        build_s = time.perf_counter() - t0
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(index, port, args.server_threads, root / "server.log", args.max_batch)
        t0 = time.perf_counter()
        wait_healthy(url, proc)
        startup_s = time.perf_counter() - t0
        asyncio.run(run_clients(url, min(4, args.clients), 2.0, args.seed + 1))  # warm-up, not counted
        server_cpu0, client_cpu0 = cpu_seconds(proc.pid), time.process_time()
        res = asyncio.run(run_clients(url, args.clients, args.duration, args.seed))
        server_cpu1, client_cpu = cpu_seconds(proc.pid), time.process_time() - client_cpu0
        n_req = max(1, res["requests"])
        # CPU per request, server and load generator: on a small shared machine the two
        # compete for the same cores, so these say where the time goes better than req/s
        res["server_cpu_ms_per_request"] = (round((server_cpu1 - server_cpu0) / n_req * 1e3, 2)
                                            if server_cpu0 is not None and server_cpu1 is not None else None)
        res["client_cpu_ms_per_request"] = round(client_cpu / n_req * 1e3, 2)
        import httpx

        stats = httpx.get(url + "/stats").json()
        res.update(gallery=stats["items"], search_mode=stats["index"].get("search_mode"),
                   arch=stats["model"].get("arch"), build_s=round(build_s, 1), server_startup_s=round(startup_s, 1),
                   cpus=os.cpu_count(), max_batch=args.max_batch, load_avg_1m=round(os.getloadavg()[0], 1),
                   mean_text_batch=round(stats["text_batches"]["queries"] / max(1, stats["text_batches"]["batches"]), 2))
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"gallery {res['gallery']} images ({res['arch']}, {res['search_mode']} search), "
              f"{res['clients']} clients x {res['seconds']} s on {res['cpus']} CPUs "
              f"(load average {res['load_avg_1m']}), max batch {res['max_batch']}")
        print(f"requests {res['requests']}  ->  {res['requests_per_s']} req/s")
        print(f"latency p50 {res['p50_ms']} ms  p90 {res['p90_ms']} ms  p99 {res['p99_ms']} ms  max {res['max_ms']} ms")
        print(f"CPU per request: server {res['server_cpu_ms_per_request']} ms, "
              f"load generator {res['client_cpu_ms_per_request']} ms")
        print(f"text queries per encoder call (mean, incl. warm-up): {res['mean_text_batch']}")
        print(f"errors {res['errors']}" + (f"  e.g. {res['error_samples']}" if res["errors"] else ""))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
