"""Ablations at equal CPU budget on the synthetic dataset: train each arm, evaluate on test, print a table.

Every arm trains with `tbps train --time-budget M --budget-clock cpu` (M minutes of this
process's CPU time, one torch thread, no DataLoader workers), so arms get the same compute
even when they run side by side or the machine is shared. best.pt is chosen on val; the
table is the test split, text-to-image.

    python bench/ablation.py --set laip --data data/abl --out runs/abl --minutes 8 --parallel 2
    python bench/ablation.py --set irra laip --data data/abl --out runs/abl --minutes 8
    python bench/ablation.py --set mefa --data data/abl --out runs/abl --minutes 8
    python bench/ablation.py --set laip --data data/abl --out runs/abl --report   # table only
    python bench/ablation.py --set mefa-ft laip-ft --data data/abl --out runs/abl --minutes 4
    python bench/ablation.py --set laip-ft --data data/abl --out runs/abl --epochs 1   # equal data instead

The dataset: `tbps synth data/abl --ids 1000` (the demo's size). Arms whose run folder
already has a finished result are not retrained.

The `-ft` sets are the papers' setting: the paths are added to a model that is already aligned
(MeFa fine-tunes EVA-CLIP; LAIP's second stage follows its global-only first stage). Every arm,
the baseline included, starts from the same `tbps train --init` checkpoint (the from-scratch
baseline arm's best.pt, so run that set first) and trains at the same, lower learning rate.

`--epochs N` trains every arm for N whole epochs instead of a time budget (equal data seen, not
equal compute; run folders NAME-Nep), for arms too slow to finish an epoch within the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# One stage from the first step: a budget of a few CPU minutes ends before the recipes' second stage.
_LAIP = ["stages=[]", "losses.triplet.weight=0", "losses.bidiratt.weight=0", "losses.mpm.weight=0"]
ARMS: dict[str, list[tuple]] = {
    # (name, recipe, overrides[, the arm whose best.pt it starts from])
    "irra": [
        ("irra-sdm", "irra-cpu", ["losses.id.weight=0", "losses.mlm.weight=0"]),
        ("irra-sdm-id", "irra-cpu", ["losses.mlm.weight=0"]),
        ("irra-sdm-id-mlm", "irra-cpu", []),
    ],
    "laip": [
        ("laip-base", "laip-cpu", _LAIP),
        ("laip-fwd", "laip-cpu", _LAIP + ["losses.bidiratt.weight=1", "losses.bidiratt.mode=forward"]),
        ("laip-bwd", "laip-cpu", _LAIP + ["losses.bidiratt.weight=1", "losses.bidiratt.mode=backward"]),
        ("laip-both", "laip-cpu", _LAIP + ["losses.bidiratt.weight=1", "losses.bidiratt.mode=both"]),
        ("laip-mpm", "laip-cpu", _LAIP + ["losses.mpm.weight=1"]),
        ("laip-all", "laip-cpu", _LAIP + ["losses.bidiratt.weight=1", "losses.mpm.weight=1",
                                          "losses.triplet.weight=1"]),
    ],
    "mefa": [
        ("mefa-base", "mefa-cpu", ["losses.imr_text.weight=0", "losses.imr_image.weight=0",
                                   "losses.cmr.weight=0", "losses.dcc.weight=0"]),
        ("mefa-imr-t", "mefa-cpu", ["losses.imr_image.weight=0", "losses.cmr.weight=0", "losses.dcc.weight=0"]),
        ("mefa-imr-v", "mefa-cpu", ["losses.imr_text.weight=0", "losses.cmr.weight=0", "losses.dcc.weight=0"]),
        ("mefa-cmr", "mefa-cpu", ["losses.imr_text.weight=0", "losses.imr_image.weight=0", "losses.dcc.weight=0"]),
        ("mefa-dcc", "mefa-cpu", ["losses.imr_text.weight=0", "losses.imr_image.weight=0", "losses.cmr.weight=0"]),
        ("mefa-all", "mefa-cpu", []),
    ],
}
_FT_LR = ["optim.lr=2e-4", "optim.warmup_epochs=0.2"]


def _fine_tune(arms, base: str) -> list[tuple[str, str, list[str], str]]:
    return [(name.replace("-", "-ft-", 1), recipe, _FT_LR + overrides, base) for name, recipe, overrides in arms]


ARMS["mefa-ft"] = _fine_tune(ARMS["mefa"], "mefa-base")
ARMS["laip-ft"] = _fine_tune(ARMS["laip"], "laip-base")
COMMON = ["data.num_workers=0", "train.cpu_threads=1"]


def _tbps() -> list[str]:
    return [sys.executable, "-m", "tbps.cli.main"]


def _run_dir(name: str, args) -> Path:
    return Path(args.out) / (f"{name}-{args.epochs}ep" if args.epochs else name)


def train_arm(name: str, recipe: str, overrides: list[str], init: str | None, args) -> dict:
    run = _run_dir(name, args)
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    start = []
    if init:
        ckpt = Path(args.out) / init / "best.pt"
        if not ckpt.exists():
            raise SystemExit(f"{name} fine-tunes {ckpt}, which does not exist: run the from-scratch set first")
        start = ["--init", str(ckpt)]
    length = ["--epochs", str(args.epochs)] if args.epochs else ["--time-budget", str(args.minutes), "--budget-clock", "cpu"]
    cmd = _tbps() + ["train", "--data", args.data, "--recipe", recipe, "--out", str(run), *length, "--no-progress",
                     *start, *COMMON, *overrides]
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    with open(run / "train.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time (arms run side by side)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{name}: tbps train failed, see {run / 'train.log'}")
    ev = subprocess.run(_tbps() + ["eval", str(run / "best.pt"), "--data", args.data, "--json"],
                        check=True, capture_output=True, text=True, env=env)
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result = {"name": run.name, "recipe": recipe, "overrides": overrides, "init": init,
              **({"epochs": args.epochs} if args.epochs else {"minutes": args.minutes}),
              "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "steps": hist[-1]["step"], "epoch": hist[-1]["epoch"], "test": metrics}
    done.write_text(json.dumps(result, indent=1))
    print(f"{name}: R1 {metrics['t2i']['R1']:.2f} after {result['steps']} steps ({wall / 60:.1f} min wall)",
          flush=True)
    return result


def table(results: list[dict]) -> str:
    rows = ["| run | steps (epoch) | CPU min | R1 | R5 | R10 | mAP | mINP |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["test"]["t2i"]
        cpu = f"{r['cpu_s'] / 60:.1f}" if "cpu_s" in r else "-"
        rows.append(f"| {r['name']} | {r['steps']} ({r['epoch']:.2f}) | {cpu} | {m['R1']:.2f} | {m['R5']:.2f} | "
                    f"{m['R10']:.2f} | {m['mAP']:.2f} | {m['mINP']:.2f} |")
    return "\n".join(rows)


def curves(results: list[dict], out: str) -> str:
    """Val text-to-image R1 after each whole epoch: the arms compared at equal data seen."""
    hist = {r["name"]: [json.loads(x) for x in (Path(out) / r["name"] / "metrics.jsonl").read_text().splitlines()]
            for r in results}
    n = max((int(h["epoch"]) for rows in hist.values() for h in rows if h["epoch"] == int(h["epoch"])), default=0)
    head = "| run | " + " | ".join(f"epoch {e}" for e in range(1, n + 1)) + " |"
    rows = [head, "|---|" + "---|" * n]
    for name, rows_ in hist.items():
        by = {int(h["epoch"]): h["val_t2i_R1"] for h in rows_ if h["epoch"] == int(h["epoch"])}
        rows.append(f"| {name} | " + " | ".join(f"{by[e]:.2f}" if e in by else "-" for e in range(1, n + 1)) + " |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", required=True, nargs="+", choices=sorted(ARMS), help="which ablation(s)")
    p.add_argument("--data", required=True, help="dataset root (e.g. from `tbps synth`)")
    p.add_argument("--out", default="runs/ablation", help="folder of the run folders")
    p.add_argument("--minutes", type=float, default=8.0, help="CPU minutes per arm")
    p.add_argument("--epochs", type=int, help="train N whole epochs per arm instead of --minutes (equal data)")
    p.add_argument("--parallel", type=int, default=2, help="arms trained at once (one core each)")
    p.add_argument("--only", nargs="*", help="arm names to run (default: all of the set)")
    p.add_argument("--report", action="store_true", help="print the table of finished arms, train nothing")
    args = p.parse_args()
    arms = [(*a, None)[:4] for s in args.set for a in ARMS[s] if not args.only or a[0] in args.only]
    if args.report:
        results = [json.loads(f.read_text()) for a in arms if (f := _run_dir(a[0], args) / "result.json").exists()]
    else:
        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(lambda a: train_arm(*a, args), arms))
    if args.epochs:
        length = f"{args.epochs} epoch(s) per arm"
    else:
        length = "/".join(sorted({f"{r.get('minutes', args.minutes):g}" for r in results})) or f"{args.minutes:g}"
        length += " CPU-minutes per arm"
    print(f"\n{' + '.join(args.set)}: {length}, test split, text-to-image")
    print(table(results))
    print("\nval text-to-image R1 after each whole epoch (equal data seen, not equal compute)")
    print(curves(results, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
