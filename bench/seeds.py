"""One recipe, several seeds: mean ± std of the test metrics, each run's checkpoint picked on val.

Every seed trains the same recipe on the same data (``train.seed=S``: weights, batches, augmentation
and dropout change; the dataset does not), through the library API (:func:`tbps.train`), then its
``best.pt`` (chosen on the **val** split, never on test) is evaluated on test (:func:`tbps.evaluate`).
The table lists each run (steps, epochs, the val score that picked it, test text-to-image R@1, R@5,
R@10, mAP, mINP) and the mean ± sample standard deviation (n-1) over the seeds.

    tbps synth /tmp/demo-data --ids 1000            # the demo's data (tbps demo: 1,000 ids x 4 views, seed 0)
    python bench/seeds.py tbps-clip-cpu --data /tmp/demo-data --seeds 0 1 2 --epochs 7 \\
        --jobs 3 --out /tmp/seeds train.cpu_threads=1
    python bench/seeds.py tbps-clip-cpu --data /tmp/demo-data --seeds 0 1 2 --minutes 8   # wall-clock budget
    python bench/seeds.py tbps-clip-cpu --data /tmp/demo-data --seeds 0 1 2 --epochs 7 --out /tmp/seeds --report

A fixed number of epochs is the reproducible amount of work; a wall-clock budget (``--minutes``)
gives each run as many steps as the machine allows, which varies with the load. A run whose folder
already holds a finished result for the same recipe, overrides and length is not retrained
(``--retrain`` forces it); ``--report`` only prints the table of the finished runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def run_seed(recipe_name: str, data: str, out: str, seed: int, epochs: int | None, minutes: float | None,
             overrides: list[str]) -> dict:
    """Train one seed and evaluate its val-picked ``best.pt`` on test; the result is also written to
    ``OUT/seed-S/seed_result.json``."""
    import tbps
    from tbps.files import write_json

    run_dir = Path(out) / f"seed-{seed}"
    recipe = tbps.load_recipe(recipe_name, [*overrides, f"train.seed={seed}"])
    t0 = time.time()
    summary = tbps.train(data, recipe, run_dir, epochs=epochs, time_budget=minutes, progress=False)
    test = tbps.evaluate(run_dir / "best.pt", data, "test")
    best = summary.get("best_info") or {}
    result = {
        "key": _key(recipe_name, data, epochs, minutes, overrides), "seed": seed,
        "steps": summary["global_step"], "epochs_trained": _epochs_at_stop(run_dir),
        "stopped_by_budget": summary["stopped_by_budget"], "minutes": round((time.time() - t0) / 60, 2),
        "picked_on": best.get("metric", "last epoch (no val split)"), "picked_epoch": best.get("epoch"),
        "val_score": best.get("score"), "test_t2i": test["t2i"], "test": test,
    }
    write_json(run_dir / "seed_result.json", result)
    return result


def _epochs_at_stop(run_dir: Path) -> float | None:
    """Fractional epochs trained: the last evaluated position of the run's history."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    return rows[-1].get("epoch") if rows else None


def _key(recipe: str, data: str, epochs, minutes, overrides: list[str]) -> dict:
    return {"recipe": recipe, "data": str(Path(data).resolve()), "epochs": epochs, "minutes": minutes,
            "overrides": list(overrides)}


def _finished(out: Path, seed: int, key: dict) -> dict | None:
    path = out / f"seed-{seed}" / "seed_result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("key") == key else None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1; 0 for one value)."""
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, math.sqrt(var)


def table(results: list[dict]) -> str:
    """Each run's row, then mean ± std over the runs."""
    head = ["seed", "steps", "epochs", "picked at", "val score"] + [f"test {m}" for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=lambda r: r["seed"]):
        ep = "-" if r["epochs_trained"] is None else f"{r['epochs_trained']:g}"
        val = "-" if r["val_score"] is None else f"{r['val_score']:.2f}"
        cells = [str(r["seed"]), str(r["steps"]), ep, str(r["picked_epoch"]), val]
        lines.append("| " + " | ".join(cells + [f"{r['test_t2i'][m]:.2f}" for m in METRICS]) + " |")
    stats = {m: mean_std([r["test_t2i"][m] for r in results]) for m in METRICS}
    steps = mean_std([float(r["steps"]) for r in results])
    cells = [f"mean ± std (n={len(results)})", f"{steps[0]:.0f} ± {steps[1]:.0f}", "", "", ""]
    lines.append("| " + " | ".join(cells + [f"{stats[m][0]:.2f} ± {stats[m][1]:.2f}" for m in METRICS]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("recipe", help="recipe name or YAML path")
    p.add_argument("--data", required=True, help="dataset folder (with a val split for the choice of best.pt)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (at least 2 for a std)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="train every run for this many epochs")
    length.add_argument("--minutes", type=float, default=None, help="wall-clock budget of every run")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (separate processes)")
    p.add_argument("--out", default=None, help="folder of the runs (default: runs/seeds/RECIPE)")
    p.add_argument("--retrain", action="store_true", help="retrain runs that already have a result")
    p.add_argument("--report", action="store_true", help="only print the table of finished runs")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for every run")
    args = p.parse_intermixed_args(argv)
    from tbps.engine.runtime import passive_openmp_waits

    passive_openmp_waits()  # as the tbps command does, before torch loads (spawned runs inherit it)
    if any(o.startswith("train.seed=") for o in args.overrides):
        p.error("train.seed is set per run by --seeds")
    out = Path(args.out or Path("runs/seeds") / Path(args.recipe).stem)
    key = _key(args.recipe, args.data, args.epochs, args.minutes, args.overrides)
    done = {s: r for s in args.seeds if not args.retrain and (r := _finished(out, s, key)) is not None}
    todo = [] if args.report else [s for s in args.seeds if s not in done]
    for s in sorted(done):
        print(f"seed {s}: finished result in {out / f'seed-{s}'} (not retrained)")
    if todo:
        print(f"training {args.recipe} with seeds {todo}, {args.jobs} at a time, into {out}", flush=True)
        jobs = [(args.recipe, args.data, str(out), s, args.epochs, args.minutes, args.overrides) for s in todo]
        if args.jobs > 1:
            with ProcessPoolExecutor(min(args.jobs, len(todo)), mp_context=get_context("spawn")) as pool:
                futures = {s: pool.submit(run_seed, *j) for s, j in zip(todo, jobs)}
                for s, f in futures.items():
                    done[s] = f.result()
                    print(f"seed {s}: done, test R@1 {done[s]['test_t2i']['R1']:.2f}", flush=True)
        else:
            for s, j in zip(todo, jobs):
                done[s] = run_seed(*j)
                print(f"seed {s}: done, test R@1 {done[s]['test_t2i']['R1']:.2f}", flush=True)
    if not done:
        print("no finished runs", file=sys.stderr)
        return 1
    length = f"{args.epochs} epochs" if args.epochs else (f"{args.minutes:g} min wall clock" if args.minutes
                                                          else "the recipe's epochs")
    print(f"\n{args.recipe} on {args.data}, {length}, overrides {args.overrides or 'none'}; "
          f"best.pt picked on val; test split, text->image, percent")
    print(table(list(done.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
