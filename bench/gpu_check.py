"""GPU check: every paper recipe at full size with AMP on synthetic data and random weights, then a
one-process torchrun with NCCL. Run it through bench/gpu_check.sh (which puts the fetched wheels on
the path); docs/gpu.md says how.

Per recipe (one child process each): `tbps train` (the library's ``train``) for ``--steps`` optimiser
steps at the recipe's own per-GPU batch, timing each step (CUDA-synchronised), checking every
returned value is finite; then the line: images/s over the steps after the warm-up ones, seconds per
step, peak GPU memory (``torch.cuda.max_memory_allocated``), whether every loss stayed finite, and
whether best.pt was written. Then the same for one recipe under
``torchrun --nproc_per_node 1`` (NCCL on CUDA, gloo on CPU): the gathers and DDP run for real.

    python3 bench/gpu_check.py                          # on the GPU machine (via gpu_check.sh)
    python3 bench/gpu_check.py --device cpu --tiny --steps 2 --recipes irra textreid   # the logic, on CPU
    python3 bench/gpu_check.py --dry-run                # what would run

Differences from the paper runs: random weights (``model.pretrained=null``); TextReID's word
dictionary is hash-seeded vectors of CLIP RN50's width (CLIP's own needs the real weights); MeFa's
masked-LM rewrites are off (no RoBERTa there); without spaCy (not pure Python: not shipped) LAIP's
phrase losses (BidirAtt, MPM) and MeFa's text hard negatives are switched off and the line says so;
LAIP runs its second stage's losses from the first step when spaCy is there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from paper_scale import EXTRA, PAPER  # bench/ is this script's folder: the same recipes and stand-ins

COMMON = ["model.pretrained=null", "data.text_augment=null", "train.log_every=1", "train.amp=true"]
NO_SPACY = {  # what needs spaCy's parser / stop words
    "mefa": ["losses.imr_text.weight=0.0"],
    "laip": ["losses.bidiratt.weight=0.0", "losses.mpm.weight=0.0"],
}
TINY = ["model.arch=micro-vit", "model.image_size=[32, 16]", "model.context_length=32", "data.batch_size=4",
        "model.embed_dim=null"]
TINY_EXTRA = {
    "irra": ["losses.fusion.width=32", "losses.fusion.heads=2"],
    "laip": ["losses.fusion.width=32", "losses.fusion.heads=2", "losses.itc.queue_size=16"],
    "textreid": ["model.embed_dim=24", "model.text_tower.dim=16", "model.text_tower.hidden=16",
                 "losses.cmmoco.queue_size=16"],
    "mefa": ["losses.imr_image.top_k=1"],
}
DDP_RECIPE = "tbps-clip-simplified"


def recipe_overrides(name: str, tiny: bool, spacy: bool) -> list[str]:
    out = COMMON + EXTRA.get(name, []) + ([] if spacy else NO_SPACY.get(name, []))
    if tiny:
        out += TINY + TINY_EXTRA.get(name, [])
    return out


def run_one(name: str, data: Path, out: Path, steps: int, warmup: int, device: str, tiny: bool, spacy: bool) -> dict:
    """Train ``name`` for ``steps`` optimiser steps in this process and measure them."""
    import torch

    import tbps.engine.epoch as epoch_mod
    from tbps.engine.train import TrainJob, train
    from tbps.recipes.config import load_recipe

    cuda = device.startswith("cuda")
    times: list[float] = []
    finite = [True]
    seen: list[int] = []
    real_step = epoch_mod._step

    def timed_step(loop, batch, progress):
        if not times:
            loop.budget.spent = lambda: len(times) >= steps  # stop after a fixed number of steps
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = real_step(loop, batch, progress)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        seen.append(int(batch["tokens"].shape[0]))
        finite[0] &= all(bool(torch.isfinite(v).all()) for v in res[0].values()) and bool(torch.isfinite(res[1]))
        return res

    epoch_mod._step = timed_step
    recipe = load_recipe(name, recipe_overrides(name, tiny, spacy))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = train(TrainJob(data_root=str(data), recipe=recipe, out_dir=str(out), epochs=1, time_budget=1e6,
                             device=device, progress=False))
    wall = time.perf_counter() - t0
    timed, n = times[warmup:] or times, seen[warmup:] or seen
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "recipe": name, "arch": recipe.model.arch, "batch": recipe.data.batch_size, "world": world,
        "amp": str(epoch_mod.Amp.choose(True, torch.device(device), recipe.train.amp_dtype).dtype).removeprefix("torch.")
        if cuda and recipe.train.amp else "off", "steps": len(times),
        "images_per_s": round(sum(n) * world / max(sum(timed), 1e-9), 1),
        "s_per_step": round(sum(timed) / max(len(timed), 1), 3),
        "peak_gpu_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "finite": finite[0], "best_pt": Path(summary["best"]).exists(), "wall_s": round(wall, 1),
        "spacy": spacy,
    }


def _child(args, name: str, torchrun: bool) -> dict:
    cmd = [sys.executable, "-u", __file__, "--one", name, "--data", str(args.data), "--out", str(args.out),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    if args.tiny:
        cmd.append("--tiny")
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] + cmd[2:]
        cmd[cmd.index("--out") + 1] = str(Path(args.out) / "ddp")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-3:]
        return {"recipe": name, "error": " / ".join(tail)}
    return json.loads(line[7:])


def _data(args) -> None:
    if (Path(args.data) / "reid_raw.json").exists():
        return
    from tbps.synth import synthesize

    # Enough pairs for `steps` batches of the largest paper batch (TextReID: 128 = 32 ids x 4 pairs).
    ids = 8 if args.tiny else max(64, (128 * args.steps) // 4 * 10 // 7 + 16)
    synthesize(args.data, ids=ids, images_per_id=2, seed=0, image_size=(128, 64), workers=os.cpu_count() or 1,
               progress=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=list(PAPER))
    ap.add_argument("--steps", type=int, default=20, help="optimiser steps per recipe")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the rates")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny architectures and batch 4 (checks the logic on CPU)")
    ap.add_argument("--no-torchrun", action="store_true")
    ap.add_argument("--data", default="/tmp/tbps-gpu-check/data")
    ap.add_argument("--out", default="/tmp/tbps-gpu-check/runs")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per child at most")
    ap.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    spacy = importlib.util.find_spec("spacy") is not None
    if args.one:
        r = run_one(args.one, Path(args.data), Path(args.out) / args.one, args.steps, args.warmup, args.device,
                    args.tiny, spacy)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(r), flush=True)
        return 0
    plan = [(n, False) for n in args.recipes] + ([] if args.no_torchrun else [(DDP_RECIPE, True)])
    if args.dry_run:
        for name, ddp in plan:
            print(("torchrun x1: " if ddp else "") + name + " " + " ".join(recipe_overrides(name, args.tiny, spacy)))
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --tiny to check the logic", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if args.device.startswith('cuda') else 'cpu'}"
          f", spaCy {'yes' if spacy else 'no: phrase/negative-text losses off for laip, mefa'}", flush=True)
    t0 = time.perf_counter()
    _data(args)
    print(f"synthetic data ready in {time.perf_counter() - t0:.0f} s: {args.data}", flush=True)
    cols = ["recipe", "world", "arch", "batch", "amp", "steps", "images_per_s", "s_per_step", "peak_gpu_GiB",
            "finite", "best_pt", "wall_s"]
    print(" | ".join(cols), flush=True)
    ok = True
    for name, ddp in plan:
        r = _child(args, name, ddp)
        r["recipe"] = name + (" (torchrun x1)" if ddp else "")
        ok &= "error" not in r and r.get("finite", False) and r.get("best_pt", False)
        print(f"{name} | ERROR {r['error']}" if "error" in r else " | ".join(str(r.get(c)) for c in cols), flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s; {'all finite, every best.pt written' if ok else 'FAILURES above'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
