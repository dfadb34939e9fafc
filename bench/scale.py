"""Engines side by side at 10^5 / 10^6 / 10^7 vectors: build time, memory, p50/p99 latency, recall@10.

Engines: faiss flat (``IndexFlatIP``, everything in RAM), faiss IVF (tbps' ``ivf`` mode: 8-bit
SQ codes), faiss IVF-PQ (tbps' ``ivfpq`` mode: d/8-byte PQ codes) and Qdrant's local engine
(``qdrant_client.QdrantClient(path=...)``, the in-process mode of the client tbps' Qdrant
store uses; it is a brute-force numpy scan in Python, so it only runs up to ``--qdrant-max``).
IVF and IVF-PQ go through ``tbps.index.ann`` exactly as ``GalleryIndex`` does: the structure
proposes ``ann.candidates(...)`` candidates, which are re-scored exactly against the float32
features memory-mapped from disk (the sqlite metadata lookup of a real index is not timed).

Data (made in chunks, never held whole): 512-d unit vectors from a mixture, as in
``bench/search_latency.py``: 64 coarse appearance modes, identities of ~20 crops around a
point near a mode (cosine ~0.67 within an identity), queries near an identity's point with
more noise than a crop (text is vaguer). The gallery is written to a float32 ``.npy`` on
disk (2 KB per vector: 20 GB at 10^7) while the exact top-10 of every query is kept
streaming, chunk by chunk: that is the ground truth recall is measured against.

Every (size, engine) runs in its own child process, so its memory figures are its own:
peak RSS (``ru_maxrss``), and after the build the RSS split into anonymous memory (the
engine's structures) and file pages (the memory-mapped features the re-scoring touched).

    python bench/scale.py --sizes 20000,100000,1000000     # Qdrant only up to --qdrant-max (20000)
    nice -n 19 python bench/scale.py --sizes 10000000 --engines ivfpq --workdir /w/scale --keep --build-only
    python bench/scale.py --sizes 10000000 --engines ivfpq --workdir /w/scale --keep --nprobe 16,32,64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 131_072  # rows generated (and scored for the ground truth) at a time: 256 MB at 512-d


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_data(work: Path, n: int, d: int, n_queries: int, k: int, seed: int) -> dict:
    """Write ``gallery.npy`` (n, d) float32, ``queries.npy`` and ``truth.npy`` (Q, k) into ``work``.

    A ``data.json`` records what was made; a later run (``--keep``) with the same settings reuses it."""
    spec = {"n": n, "d": d, "queries": n_queries, "k": k, "seed": seed}
    stamp = work / "data.json"
    if stamp.exists():
        made = json.loads(stamp.read_text())
        if made.get("spec") == spec:
            return {**made["gen"], "reused_data": True}
    rng = np.random.default_rng(seed)
    coarse = unit(rng.standard_normal((64, d), dtype=np.float32))
    n_fine = max(1, n // 20)
    fine = np.empty((n_fine, d), np.float32)  # identities: (n/20, d), 1 GB at 10^7
    for s in range(0, n_fine, CHUNK):
        m = min(CHUNK, n_fine - s)
        fine[s:s + m] = unit(coarse[rng.integers(0, 64, m)] + 0.6 * unit(rng.standard_normal((m, d), dtype=np.float32)))
    q = unit(fine[rng.integers(0, n_fine, n_queries)] + 0.9 * unit(rng.standard_normal((n_queries, d), dtype=np.float32)))
    gallery = np.lib.format.open_memmap(work / "gallery.npy", mode="w+", dtype=np.float32, shape=(n, d))
    best_s = np.full((n_queries, 0), -np.inf, np.float32)
    best_i = np.zeros((n_queries, 0), np.int64)
    t = time.perf_counter()
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        block = unit(fine[rng.integers(0, n_fine, m)] + 0.7 * unit(rng.standard_normal((m, d), dtype=np.float32)))
        gallery[s:s + m] = block
        sc = np.concatenate([best_s, q @ block.T], axis=1)  # (Q, k + m)
        ids = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + m), (n_queries, m))], axis=1)
        top = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(sc, top, 1), np.take_along_axis(ids, top, 1)
    gallery.flush()
    del gallery, fine
    np.save(work / "queries.npy", q.astype(np.float32))
    np.save(work / "truth.npy", best_i)
    gen = {"generate_s": round(time.perf_counter() - t, 1), "generate_load": round(os.getloadavg()[0], 1)}
    stamp.write_text(json.dumps({"spec": spec, "gen": gen}))
    return gen


def rss() -> dict:
    """Current RSS of this process, split (MB): anonymous memory and file-backed pages."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# -- engines (each returns a search function query (d,) -> top-k ids) ------------------------------
def faiss_flat(work: Path, g: np.ndarray, k: int, cfg: dict):
    import faiss

    index = faiss.IndexFlatIP(g.shape[1])
    for s in range(0, len(g), CHUNK):
        index.add(np.ascontiguousarray(g[s:s + CHUNK]))
    faiss.omp_set_num_threads(1)  # one query at a time, as the store does
    return index, lambda q, **_: index.search(q[None], k)[1][0]


def faiss_tbps(mode: str):
    """An ANN mode of ``tbps.index.ann`` with the store's exact re-scoring of the candidates."""

    def make(work: Path, g: np.ndarray, k: int, cfg: dict):
        from tbps.index import ann

        ids = np.arange(len(g), dtype=np.int64)
        params = ann.default_params(mode, len(g))
        if cfg.get("nlist"):  # --nlist: fewer lists build faster (the assignment of N items to them dominates)
            params.update(nlist=int(cfg["nlist"]), nprobe=min(int(cfg["nlist"]), params["nprobe"]))
        saved = work / f"{mode}-nlist{params['nlist']}.faiss"  # --keep: a structure built by an earlier run
        if saved.exists() and saved.with_suffix(".json").exists():
            index = ann.read(saved)
            built = {**json.loads(saved.with_suffix(".json").read_text()), "reused_structure": True}
        else:
            t, load = time.perf_counter(), os.getloadavg()[0]
            index = ann.build(mode, g, ids, params)
            built = {"build_s": round(time.perf_counter() - t, 1), "build_load": round((load + os.getloadavg()[0]) / 2, 1)}
            if cfg.get("keep"):
                ann.write(index, saved)
                saved.with_suffix(".json").write_text(json.dumps(built))

        def search(q, **over):
            p = {**params, **over}
            labels = ann.search(index, mode, q[None], ann.candidates(mode, k, p), p)[0]
            rows = np.sort(labels[labels >= 0])  # ids are rows here
            sc = np.asarray(g[rows], dtype=np.float32) @ q  # exact re-scoring from the memory-mapped features
            return rows[np.lexsort((rows, -sc))[:k]]

        search.params, search.built = params, built
        return index, search

    return make


def qdrant_local(work: Path, g: np.ndarray, k: int, cfg: dict):
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(work / "qdrant"))
    client.create_collection("bench", vectors_config=models.VectorParams(size=g.shape[1], distance=models.Distance.COSINE))
    for s in range(0, len(g), 8192):
        block = np.asarray(g[s:s + 8192])
        client.upload_collection("bench", vectors=block, ids=list(range(s, s + len(block))), batch_size=1024)

    def search(q, **_):
        res = client.query_points("bench", query=q.tolist(), limit=k).points
        return np.asarray([p.id for p in res], dtype=np.int64)

    return client, search


ENGINES = {"flat": faiss_flat, "ivf": faiss_tbps("ivf"), "ivfpq": faiss_tbps("ivfpq"), "qdrant": qdrant_local}


def index_bytes(engine: str, index, work: Path) -> int | None:
    """Size of the engine's own structure (faiss: serialised; Qdrant: its folder)."""
    if engine == "qdrant":
        return sum(f.stat().st_size for f in (work / "qdrant").rglob("*") if f.is_file())
    import faiss

    path = work / f"{engine}.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def child(args) -> int:
    """Build one engine over ``workdir``'s data, time its queries, print one JSON line per config."""
    work = Path(args.workdir)
    g = np.load(work / "gallery.npy", mmap_mode="r")
    q, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    k = truth.shape[1]
    t = time.perf_counter()
    index, search = ENGINES[args.child](work, g, k, {"nlist": args.nlist, "keep": args.keep})
    built = getattr(search, "built", {"build_s": round(time.perf_counter() - t, 1)})
    after_build = rss()
    size = index_bytes(args.child, index, work)
    if args.build_only:
        print(json.dumps({"n": len(g), "engine": args.child, "built": built, "index_mb": None if size is None else round(size / 1e6, 1),
                          "rss_after_build_mb": after_build, "peak_rss_mb": peak_rss_mb()}), flush=True)
        return 0
    configs = [{}]
    params = getattr(search, "params", {})
    if "nprobe" in params:
        configs = [{"nprobe": v} for v in sorted({params["nprobe"], *[int(x) for x in args.nprobe.split(",") if x]})]
    for cfg in configs:
        search(q[0], **cfg)  # warm-up
        lat, found = [], []
        for qi in q:
            t = time.perf_counter()
            found.append(search(qi, **cfg))
            lat.append(time.perf_counter() - t)
        rec = float(np.mean([len(set(f.tolist()) & set(tr.tolist())) / k for f, tr in zip(found, truth)]))
        print(json.dumps({"n": len(g), "engine": args.child, "params": {**params, **cfg}, **built,
                          "index_mb": None if size is None else round(size / 1e6, 1), "rss_after_build_mb": after_build,
                          "peak_rss_mb": peak_rss_mb(), "rss_after_queries_mb": rss(),
                          "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
                          "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3), "recall_at_10": round(rec, 4),
                          "queries": len(q), "load": round(os.getloadavg()[0], 1)}), flush=True)
    return 0


def run_child(engine: str, work: Path, args) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", engine, "--workdir", str(work), "--nprobe", args.nprobe,
           "--nlist", str(args.nlist), *(["--keep"] if args.keep else []), *(["--build-only"] if args.build_only else [])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"# {engine}: failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}", flush=True)
        return []
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000,10000000")
    p.add_argument("--engines", default="flat,ivf,ivfpq,qdrant")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", default="", help="extra nprobe values to sweep for ivf/ivfpq (comma-separated)")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists for ivf/ivfpq (default: tbps' choice for the size)")
    p.add_argument("--flat-max", type=int, default=1_000_000, help="faiss flat above this size: skipped (N x d x 4 B of RAM)")
    p.add_argument("--ivf-max", type=int, default=1_000_000, help="IVF-SQ8 above this size: skipped (N x d B of RAM)")
    p.add_argument("--qdrant-max", type=int, default=20_000, help="Qdrant's local engine above this size: skipped")
    p.add_argument("--workdir", default=None, help="where data and indexes go (default: a temp dir, removed)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--keep", action="store_true",
                   help="keep the data and the built faiss structures in --workdir and reuse them on the next run "
                        "with the same settings (build on a busy machine, time the queries later on a quiet one)")
    p.add_argument("--build-only", action="store_true", help="make the data and build (with --keep), time no queries")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="tbps-scale-"))
    limits = {"flat": args.flat_max, "ivf": args.ivf_max, "qdrant": args.qdrant_max}
    results = []
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; d={args.dim}, k={args.k}, "
          f"{args.queries} queries", flush=True)
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            work = root / f"n{n}"
            work.mkdir(parents=True, exist_ok=True)
            gen = make_data(work, n, args.dim, args.queries, args.k, seed=n)
            print(f"# N={n}: data and streamed ground truth in {gen['generate_s']} s"
                  + (" (made by an earlier run, reused)" if gen.get("reused_data") else ""), flush=True)
            for engine in args.engines.split(","):
                if n > limits.get(engine, n):
                    print(f"# N={n} {engine}: skipped (above --{engine}-max)", flush=True)
                    continue
                for r in run_child(engine, work, args):
                    results.append({**r, **gen})
                    print(json.dumps(r) if args.build_only else format_row(r), flush=True)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def format_row(r: dict) -> str:
    p = r["params"]
    par = " ".join(f"{key}={p[key]}" for key in ("nlist", "nprobe", "nbits", "rescore") if key in p)
    a = r["rss_after_build_mb"]
    return (f"{r['n']:>9} {r['engine']:>7} {par:>34} build {r['build_s']:7.1f} s  index {r['index_mb']} MB  "
            f"RSS anon {a.get('RssAnon')} MB file {a.get('RssFile')} MB peak {r['peak_rss_mb']} MB  "
            f"p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms  recall@10 {r['recall_at_10']:.3f}  (load {r['load']})")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())
