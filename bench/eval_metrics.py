"""Ranking metrics at ICFG size: a numpy full sort, tbps's torch full-argsort reference and
the chunked metrics, side by side in one run.

    python bench/eval_metrics.py                              # hard + noise, numpy vs chunked
    python bench/eval_metrics.py --methods numpy torch-ref chunked   # + the torch reference (~3 min, ~8 GB)
    python bench/eval_metrics.py --queries 2000 --methods numpy chunked:4 chunked:8 chunked:32

Inputs (19,848 queries x 19,848 gallery items, float32, as ICFG-PEDES's test split; ids
so that every query has ~20 correct gallery items):

- hard: Gaussian scores, correct items shifted by two standard deviations: they are
  scattered through the ranking (~45% of a row scores above its lowest correct item),
  so nothing can be skipped;
- noise: Gaussian scores without any signal (correct items anywhere, R@1 ~ 0);
- model (optional): cosine similarities of features with an identity signal, like a
  trained model's (most of a row below its lowest correct item).

Methods, each in its own subprocess on the same seeded matrix:

- numpy: the baseline a user writes, ``np.argsort(-sim, axis=1, kind="stable")``, then
  matches, cumulative sums, AP (``np.bincount`` in rank order), INP;
- torch-ref: ``tbps.retrieval.metrics.naive_retrieval_metrics`` (the tests' reference);
- chunked: ``tbps.retrieval.metrics.retrieval_metrics`` (``chunked:N`` sets chunk_size,
  ``chunked@T`` spreads the chunks over T threads; plain ``chunked`` uses --threads).

"extra MB" = peak RSS during the call minus RSS just before it (the kernel's peak mark is
reset through /proc/self/clear_refs first; the warm-up call runs on a tiny input, so no
buffer of the measured call's size is left over from it): the working memory beyond the
matrix. Figures
are compared with ``==`` against the first method's (bit-identical or not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

INPUTS = ("hard", "noise", "model")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_input(kind: str, n_q: int, n_g: int, per_id: int = 20, seed: int = 0):
    """(sim (Q, G) float32 numpy, query ids (Q,), gallery ids (G,)), the same for every method."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_ids = max(1, n_g // per_id)
    gids = (torch.randperm(n_g, generator=gen) % n_ids).numpy()
    qids = gids[torch.randint(0, n_g, (n_q,), generator=gen).numpy()]  # each query has an id in the gallery
    if kind == "model":
        proto = torch.randn(n_ids, 256, generator=gen) * 0.5
        img = torch.nn.functional.normalize(proto[gids] + torch.randn(n_g, 256, generator=gen), dim=1)
        txt = torch.nn.functional.normalize(proto[qids] + torch.randn(n_q, 256, generator=gen), dim=1)
        return (txt @ img.T).numpy(), qids, gids
    sim = torch.randn(n_q, n_g, generator=gen).numpy()
    if kind == "hard":
        for a in range(0, n_q, 1024):  # in place, block by block: no second matrix
            sim[a : a + 1024] += 2.0 * (qids[a : a + 1024, None] == gids[None, :])
    return sim, qids, gids


def numpy_full_sort(sim, qids, gids, ks=(1, 5, 10)) -> dict:
    """The baseline a user would write: a stable full sort of every row."""
    import numpy as np

    order = np.argsort(-sim, axis=1, kind="stable")  # (Q, G) int64
    matches = gids[order] == qids[:, None]  # (Q, G) bool, in rank order
    del order
    num_rel = matches.sum(1)
    cmc = matches.cumsum(1)  # correct items within the top p + 1
    rows, pos = np.nonzero(matches)
    prec = cmc[rows, pos] / (pos + 1.0)
    del cmc
    ap = np.bincount(rows, weights=prec, minlength=len(qids)) / num_rel
    last = np.zeros(len(qids), dtype=np.int64)
    np.maximum.at(last, rows, pos)
    out = {f"R{k}": 100.0 * float(np.mean(matches.argmax(1) < k)) for k in ks}
    out["mAP"] = 100.0 * float(np.mean(ap))
    out["mINP"] = 100.0 * float(np.mean(num_rel / (last + 1.0)))
    return out


def worker(kind: str, method: str, n_q: int, n_g: int, threads: int) -> None:
    """Run one method once on one input; print a JSON line with time, memory and figures."""
    import gc

    import torch

    from tbps.retrieval.metrics import naive_retrieval_metrics, retrieval_metrics

    torch.set_num_threads(threads)
    sim, qids, gids = make_input(kind, n_q, n_g)
    if method == "numpy":
        fn = numpy_full_sort
    elif method == "torch-ref":
        fn = naive_retrieval_metrics
    else:  # chunked[:CHUNK][@THREADS]
        name, _, n_threads = method.partition("@")
        chunk = int(name.split(":")[1]) if ":" in name else None
        fn = lambda s, q, g: retrieval_metrics(s, q, g, chunk_size=chunk, threads=int(n_threads or threads))  # noqa: E731
    fn(*make_input(kind, 8, 64, seed=1))  # lazy initialisation outside the measurement, tiny buffers
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    metrics = fn(sim, qids, gids)
    seconds = time.perf_counter() - t0
    extra_mb = (_status_kb("VmHWM") - base_kb) / 1024
    print(json.dumps({"seconds": seconds, "extra_mb": extra_mb, "sim_mb": sim.nbytes / 2**20, "metrics": metrics}))


def run_one(kind: str, method: str, n_q: int, n_g: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, method, "--queries", str(n_q), "--gallery", str(n_g),
           "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"worker {kind}/{method} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", default=["hard", "noise"], choices=INPUTS)
    p.add_argument("--methods", nargs="+", default=["numpy", "chunked"],
                   help="numpy, torch-ref, chunked, chunked:N (chunk size N), chunked@T (T threads); "
                        "the first is the baseline")
    p.add_argument("--queries", type=int, default=19848, help="Q (default: ICFG-PEDES test captions)")
    p.add_argument("--gallery", type=int, default=19848, help="G (default: ICFG-PEDES test images)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every method (numpy sorts on one)")
    p.add_argument("--worker", nargs=2, metavar=("INPUT", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.queries, args.gallery, args.threads)
        return

    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {args.queries} x {args.gallery} float32; "
          f"torch threads {args.threads}; {_load()}")
    print("extra MB = peak RSS during the call minus RSS before it (working memory beyond the matrix)")
    header = f"{'input':<6} {'method':<11} {'seconds':>8} {'speedup':>8} {'extra MB':>9} {'mem':>7}  figures"
    print(header)
    print("-" * (len(header) + 40))
    for kind in args.inputs:
        base = None
        for method in args.methods:
            r = run_one(kind, method, args.queries, args.gallery, args.threads)
            base = base or r
            same = "identical" if r["metrics"] == base["metrics"] else "DIFFERENT: " + json.dumps(r["metrics"])
            print(f"{kind:<6} {method:<11} {r['seconds']:8.2f} {base['seconds'] / r['seconds']:7.1f}x "
                  f"{r['extra_mb']:9.0f} {r['extra_mb'] / max(base['extra_mb'], 1e-9):6.1%}  {same}", flush=True)
        print(f"{'':6} figures: " + ", ".join(f"{k} {v:.4f}" for k, v in base["metrics"].items()) + f"; {_load()}")


if __name__ == "__main__":
    main()
