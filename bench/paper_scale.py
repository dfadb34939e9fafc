"""Every paper recipe at its real architecture and input size, on CPU, with random weights.

For each recipe (one child process each, so peak memory is its own): `tbps train` (the library's
``train``) on a tiny synthetic dataset for one epoch at batch 8, timing every optimiser step, then
`tbps eval` reads the run's best.pt. One line per recipe: parameters (trainable / all, model and
objective), seconds per step (the median of the steps after the first, which warms the allocator),
its CPU seconds per step (the process's own CPU time: comparable across a busy and an idle
machine, unlike the wall seconds), peak resident memory of the training process, wall seconds of the whole train run, and the test R@1
`tbps eval` printed (of random weights after a few steps: it shows the checkpoint reads back, not
accuracy).

    python bench/paper_scale.py                       # all six, data made in /tmp/tbps-paper-scale
    python bench/paper_scale.py --recipes textreid irra --threads 2
    python bench/paper_scale.py --one tbps-clip --data D --out O    # one child (used internally)

What differs from the paper runs, and why: ``model.pretrained=null`` (no downloads here); TextReID's
frozen word dictionary is hash-seeded random vectors of CLIP RN50's width (1024) instead of CLIP's
own (which needs the real weights); MeFa's masked-LM rewrites (tier 3, RoBERTa) are off (no model
offline); LAIP runs its second stage's losses from the first step (``stages=[]``, every weight 1), so
the step timed is its most expensive one; data.num_workers=0 and no text augmentation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAPER = ("tbps-clip", "tbps-clip-simplified", "irra", "textreid", "mefa", "laip")
COMMON = ["model.pretrained=null", "data.num_workers=0", "data.text_augment=null", "train.log_every=1"]
EXTRA = {
    "textreid": ["model.text_tower.source=random", "model.text_tower.dim=1024"],
    "mefa": ["losses.imr_text.tiers=[1, 2]", "losses.imr_text.mlm=null"],
    "laip": ["stages=[]", "losses.triplet.weight=1.0", "losses.bidiratt.weight=1.0", "losses.mpm.weight=1.0"],
}


def overrides(name: str, batch: int, threads: int) -> list[str]:
    return COMMON + [f"data.batch_size={batch}", f"train.cpu_threads={threads}"] + EXTRA.get(name, [])


def run_one(name: str, data: Path, out: Path, batch: int, threads: int, budget_min: float) -> dict:
    """Train ``name`` for one epoch (or the budget) in this process, timing each optimiser step."""
    import torch

    import tbps.engine.epoch as epoch_mod
    from tbps.engine.train import TrainJob, train
    from tbps.recipes.config import load_recipe

    times: list[float] = []
    cpu: list[float] = []  # this process's CPU seconds per step: what a step costs whatever else runs
    counts: dict[str, int] = {}
    real_step = epoch_mod._step

    def timed_step(loop, batch_, progress):
        if not counts:
            ps = list(loop.module.parameters())
            counts.update(all=sum(p.numel() for p in ps), trainable=sum(p.numel() for p in ps if p.requires_grad))
        t0, c0 = time.perf_counter(), time.process_time()
        res = real_step(loop, batch_, progress)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        return res

    epoch_mod._step = timed_step
    recipe = load_recipe(name, overrides(name, batch, threads))
    t0 = time.perf_counter()
    summary = train(TrainJob(data_root=str(data), recipe=recipe, out_dir=str(out), epochs=1, time_budget=budget_min,
                             device="cpu", progress=False))
    wall = time.perf_counter() - t0
    steady = times[1:] or times
    return {
        "recipe": name, "arch": recipe.model.arch, "image_size": list(recipe.model.image_size or []),
        "params_M": round(counts.get("all", 0) / 1e6, 1), "trainable_M": round(counts.get("trainable", 0) / 1e6, 1),
        "steps": len(times), "s_per_step": round(statistics.median(steady), 2) if steady else None,
        "cpu_s_per_step": round(statistics.median(cpu[1:] or cpu), 2) if cpu else None,
        "first_step_s": round(times[0], 2) if times else None,
        "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "train_wall_s": round(wall, 1), "best_pt": Path(summary["best"]).exists(), "threads": torch.get_num_threads(),
    }


def eval_cli(run: Path, data: Path) -> dict:
    """`tbps eval RUN --json` in a fresh process: the test split's text-to-image figures."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([sys.executable, "-m", "tbps.cli.main", "eval", str(run), "--data", str(data), "--json",
                        "--device", "cpu"], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"eval_error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return {"test_R1": round(json.loads(p.stdout)["t2i"]["R1"], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=list(PAPER))
    ap.add_argument("--data", default="/tmp/tbps-paper-scale/data", help="made with tbps synth if missing")
    ap.add_argument("--out", default="/tmp/tbps-paper-scale/runs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--budget", type=float, default=20.0, help="minutes per training run at most")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, data, out / args.one, args.batch, args.threads, args.budget)))
        return 0
    if not (data / "reid_raw.json").exists():
        from tbps.synth import synthesize  # 12 ids x 2 views: ~4 steps of 8 pairs in the train split

        synthesize(data, ids=12, images_per_id=2, seed=0, image_size=(128, 64), workers=1, progress=False)
    cols = ["recipe", "arch", "image_size", "params_M", "trainable_M", "s_per_step", "cpu_s_per_step", "first_step_s", "steps",
            "peak_rss_GiB", "train_wall_s", "best_pt", "test_R1"]
    print(" | ".join(cols), flush=True)
    for name in args.recipes:
        cmd = [sys.executable, __file__, "--one", name, "--data", str(data), "--out", str(out), "--batch",
               str(args.batch), "--threads", str(args.threads), "--budget", str(args.budget)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            err = (p.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{name} | FAILED: {err}", flush=True)
            continue
        row = json.loads(line[7:])
        row.update(eval_cli(out / name, data))
        print(" | ".join(str(row.get(c, row.get("eval_error", ""))) for c in cols), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
