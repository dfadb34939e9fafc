"""Search latency and recall of the gallery index at 10k / 100k / 1M items (exact, IVF, IVF-PQ, HNSW).

For each gallery size it writes a real index (``build_index_from_features``) of synthetic
512-d features, opens it with ``GalleryIndex.open`` (memory-mapped) and times single-query
``index.search(q, k=10)`` calls: p50/p99 latency, and recall@10 of the approximate modes
against exact search. Exact search is memory-bound, so its effective read bandwidth is
compared with the machine's, measured with a numpy sum and copy.

Features are "clustered" by default (64 coarse appearance modes -> identities of ~20 crops
each; cosine ~0.67 between crops of one identity, ~0.49 between identities of one mode, ~0
across modes; queries are noisier than crops, like text), which behaves more like real
embeddings than isotropic noise does; ``--data random`` gives isotropic Gaussian features, the worst case.

    python bench/search_latency.py                       # 10k, 100k, 1M
    python bench/search_latency.py --sizes 10000 --queries 50   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_features(n: int, d: int, n_queries: int, kind: str, seed: int = 0):
    """(gallery (n, d), queries (q, d)) float32, L2-normalised."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        g = np.empty((n, d), np.float32)
        for s in range(0, n, 65536):
            g[s : s + 65536] = unit(rng.standard_normal((min(65536, n - s), d), dtype=np.float32))
        return g, unit(rng.standard_normal((n_queries, d), dtype=np.float32))
    coarse = unit(rng.standard_normal((64, d), dtype=np.float32))  # appearance modes
    n_fine = max(1, n // 20)  # ~20 crops per identity
    fine = unit(coarse[rng.integers(0, 64, n_fine)] + 0.6 * unit(rng.standard_normal((n_fine, d), dtype=np.float32)))
    g = np.empty((n, d), np.float32)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        noise = unit(rng.standard_normal((m, d), dtype=np.float32))
        g[s : s + m] = unit(fine[rng.integers(0, n_fine, m)] + 0.7 * noise)
    # Queries describe people in the gallery, more loosely than a crop does (text is vaguer).
    qn = unit(rng.standard_normal((n_queries, d), dtype=np.float32))
    q = unit(fine[rng.integers(0, n_fine, n_queries)] + 0.9 * qn)
    return g, q.astype(np.float32)


def memory_bandwidth_gbs(size_bytes: int = 1 << 30) -> dict:
    """Best of 3: numpy sum (read) and copy (read + write) bandwidth in GB/s."""
    a = np.ones(size_bytes // 4, np.float32)
    b = np.empty_like(a)
    read, copy = 0.0, 0.0
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        read = max(read, size_bytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        np.copyto(b, a)
        copy = max(copy, 2 * size_bytes / (time.perf_counter() - t) / 1e9)
    return {"read_gbs": round(read, 2), "copy_gbs": round(copy, 2)}


def time_queries(ix, queries: np.ndarray, k: int, **kw) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Per-query wall-clock latencies (s), CPU times (s, all threads) and result ids.

    On a shared machine the wall clock includes waiting for a core; the CPU time is what
    the query costs, i.e. about its latency on an idle core."""
    ix.search(queries[0], k, **kw)  # warm up (page cache, faiss allocations)
    lat, cpu, ids = [], [], []
    for q in queries:
        c = time.process_time()
        t = time.perf_counter()
        hits = ix.search(q, k, **kw)[0]
        lat.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        ids.append([h.id for h in hits])
    return np.asarray(lat), np.asarray(cpu), ids


def recall(approx: list[list[int]], exact: list[list[int]]) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200, help="timed queries per approximate config")
    p.add_argument("--exact-queries", type=int, default=50, help="timed queries for exact search at >= 1M")
    p.add_argument("--data", choices=["clustered", "random"], default="clustered")
    p.add_argument("--modes", default="exact,ivf,ivfpq,hnsw", help="search modes to measure")
    p.add_argument("--hnsw-max", type=int, default=200_000, help="skip HNSW above this size (slow to build on 2 cores)")
    p.add_argument("--nprobe", default="8,16,24,48", help="IVF nprobe values to sweep (plus the default)")
    p.add_argument("--ef", default="64,128,256", help="HNSW efSearch values to sweep (plus the default)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--workdir", default=None, help="where to write the indexes (default: a temp dir, removed)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    from tbps.index import GalleryIndex, build_index_from_features
    from tbps.index.store import exact_topk

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tbps-bench-"))
    results = {"machine": {"cpus": os.cpu_count(), **memory_bandwidth_gbs()}, "data": args.data, "dim": args.dim,
               "k": args.k, "runs": []}
    print(f"memory bandwidth: read {results['machine']['read_gbs']} GB/s, copy {results['machine']['copy_gbs']} GB/s "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}); data={args.data}, d={args.dim}, k={args.k}")
    print(f"{'N':>8} {'mode':>6} {'params':>24} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms':>8} {'recall@10':>9} {'GB/s':>6}")
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            nq = args.queries
            t = time.perf_counter()
            g, q = make_features(n, args.dim, nq, args.data, seed=n)
            gen_s = time.perf_counter() - t
            # Ground truth: exact top-k for all queries at once (batched GEMM).
            t = time.perf_counter()
            gt_ids, _ = exact_topk(g, np.arange(n, dtype=np.int64), q, args.k)
            gt_s = time.perf_counter() - t
            gt = [list(r) for r in gt_ids]
            paths = [f"/gallery/{i:07d}.jpg" for i in range(n)]
            modes = [m for m in args.modes.split(",") if m != "hnsw" or n <= args.hnsw_max]
            print(f"# N={n}: features generated in {gen_s:.0f} s; exact top-{args.k} of all {nq} queries in one "
                  f"batch: {gt_s / nq * 1e3:.2f} ms/query; load average {os.getloadavg()[0]:.1f}", flush=True)
            for mode in modes:
                path = work / f"idx-{n}-{mode}"
                t = time.perf_counter()
                build_index_from_features(path, g, paths, fingerprint={"bench": args.data}, search_mode=mode,
                                          overwrite=True)
                build_s = time.perf_counter() - t
                ix = GalleryIndex.open(path)
                ann_mb = (ix.info()["sizes_bytes"].get("ann") or 0) / 1e6  # the structure held in RAM
                configs = [{}]
                if mode in ("ivf", "ivfpq"):
                    default = ix.search_params["nprobe"]
                    configs = [{"nprobe": v} for v in sorted({default, *map(int, args.nprobe.split(","))})]
                elif mode == "hnsw":
                    default = ix.search_params["ef_search"]
                    configs = [{"ef_search": v} for v in sorted({default, *map(int, args.ef.split(","))})]
                for cfg in configs:
                    ix.search_params.update(cfg)
                    qs = q if mode != "exact" or n < 1_000_000 else q[: args.exact_queries]
                    lat, cpu, ids = time_queries(ix, qs, args.k)
                    rec = recall(ids, gt[: len(qs)])
                    p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
                    cpu50 = np.percentile(cpu, 50) * 1e3
                    gbs = n * args.dim * 4 / (p50 / 1e3) / 1e9 if mode == "exact" else None
                    params = {"exact": "", "ivf": f"nlist={ix.search_params.get('nlist')} nprobe={cfg.get('nprobe')}",
                              "ivfpq": f"nlist={ix.search_params.get('nlist')} nprobe={cfg.get('nprobe')} PQ",
                              "hnsw": f"M={ix.search_params.get('M')} ef={ix.search_params.get('ef_search')}"}[mode]
                    print(f"{n:>8} {mode:>6} {params:>24} {build_s:8.1f} {p50:8.2f} {p99:8.2f} {cpu50:8.2f} {rec:9.3f} "
                          f"{'' if gbs is None else f'{gbs:6.2f}'}  ann {ann_mb:.1f} MB  (load {os.getloadavg()[0]:.1f})", flush=True)
                    results["runs"].append({"n": n, "mode": mode, "params": dict(ix.search_params), "queries": len(qs),
                                            "build_s": round(build_s, 2), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "cpu_p50_ms": round(cpu50, 3),
                                            "recall_at_k": round(rec, 4), "exact_gbs": None if gbs is None else round(gbs, 2),
                                            "generate_s": round(gen_s, 1), "ann_mb": round(ann_mb, 1)})
                if mode == "exact":
                    # Batched exact search: 32 queries per call amortise the read of the features.
                    qb = q[:32]
                    t = time.perf_counter()
                    ix.search(qb, args.k)
                    dt = time.perf_counter() - t
                    print(f"{n:>8} {'exact':>6} {'batch of 32':>24} {'':>8} {dt / 32 * 1e3:8.2f} {'(per q)':>8}")
                    results["runs"].append({"n": n, "mode": "exact-batch32", "per_query_ms": round(dt / 32 * 1e3, 3)})
                ix.close()
                shutil.rmtree(path, ignore_errors=True)
            del g
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
