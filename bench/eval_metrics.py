"""Time and peak memory of the chunked retrieval metrics against the naive full argsort.

    python bench/eval_metrics.py                 # CUHK and ICFG test sizes, 1 thread
    python bench/eval_metrics.py --sizes cuhk --threads 2

Each (size, method) runs in its own subprocess. The subprocess builds the same
similarity matrix (seeded random features: one prototype per identity plus
noise, tuned to CUHK-like figures; "icfg-random" has no identity signal at all), then resets the kernel's peak-RSS mark
(/proc/self/clear_refs) and measures: "extra peak" = peak RSS during the metric call
minus RSS just before it, i.e. the working memory beyond the similarity matrix
(which both methods share). The table prints both methods side by side and checks
that their metrics agree to 1e-4.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

# name: (queries, gallery, identities, noise); test-split sizes of the public benchmarks.
# noise 2.0 gives CUHK-like figures (R1 ~70, mAP ~54); None = features without any
# identity signal: the worst case for the chunked method (correct items anywhere).
SIZES = {
    "cuhk": (6156, 3074, 1000, 2.0),
    "icfg": (19848, 19848, 1000, 2.0),
    "icfg-random": (19848, 19848, 1000, None),
    "small": (2000, 1500, 300, 2.0),
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_similarity(n_q: int, n_g: int, n_ids: int, noise: float | None, dim: int = 256, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    gids = torch.arange(n_g) % n_ids
    gids = gids[torch.randperm(n_g, generator=gen)]
    qids = gids[torch.arange(n_q) % n_g]  # each query describes a gallery item's identity
    proto = torch.randn(n_ids, dim, generator=gen) * (0.0 if noise is None else 1.0 / noise)
    img = proto[gids] + torch.randn(n_g, dim, generator=gen)
    txt = proto[qids] + torch.randn(n_q, dim, generator=gen)
    img = torch.nn.functional.normalize(img, dim=1)
    txt = torch.nn.functional.normalize(txt, dim=1)
    return txt @ img.T, qids, gids  # (Q, G) float32 cosine similarity


def worker(size: str, method: str, threads: int) -> None:
    """Run one method once on one size; print a JSON line with time, memory and metrics."""
    import torch

    from tbps.retrieval.metrics import naive_retrieval_metrics, retrieval_metrics

    torch.set_num_threads(threads)
    sim, qids, gids = _make_similarity(*SIZES[size])
    gc.collect()
    fn = retrieval_metrics if method == "chunked" else naive_retrieval_metrics
    fn(sim[:8], qids[:8], gids, skip_missing=True)  # warm up lazy init outside the measurement
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    metrics = fn(sim, qids, gids)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    out = {
        "size": size,
        "method": method,
        "seconds": seconds,
        "extra_peak_mb": (peak_kb - base_kb) / 1024,
        "sim_mb": sim.numel() * sim.element_size() / 2**20,
        "metrics": metrics,
    }
    print(json.dumps(out))


def run_one(size: str, method: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", size, method, "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"worker {size}/{method} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["cuhk", "icfg", "icfg-random"], choices=sorted(SIZES))
    p.add_argument("--threads", type=int, default=1, help="torch threads for both methods")
    p.add_argument("--worker", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.threads)
        return

    print(f"torch threads: {args.threads}; extra peak = peak RSS during the call minus RSS before it")
    header = f"{'size':<11} {'Q x G':>15} {'sim MB':>7} | {'naive s':>8} {'chunked s':>9} {'speedup':>7} | {'naive MB':>8} {'chunked MB':>10} {'mem ratio':>9} | agree"
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        q, g, _, _ = SIZES[size]
        naive = run_one(size, "naive", args.threads)
        fast = run_one(size, "chunked", args.threads)
        diff = max(abs(naive["metrics"][k] - fast["metrics"][k]) for k in naive["metrics"])
        print(
            f"{size:<11} {f'{q} x {g}':>15} {naive['sim_mb']:7.0f} | {naive['seconds']:8.2f} {fast['seconds']:9.2f} "
            f"{naive['seconds'] / fast['seconds']:6.1f}x | {naive['extra_peak_mb']:8.0f} {fast['extra_peak_mb']:10.0f} "
            f"{naive['extra_peak_mb'] / max(fast['extra_peak_mb'], 1e-9):8.1f}x | "
            f"{'yes' if diff <= 1e-4 else 'NO'} (max diff {diff:.1e})"
        )
        m = fast["metrics"]
        print(f"{'':11} metrics: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
