"""A staged recipe against its own base stage, the two arms forked at the switch.

``bench/seeds.py`` run twice (the recipe, then the recipe with ``'stages=[]'`` and the later stage's
losses off) compares two runs that share only their seed: under a wall-clock budget the learning-rate
schedule and the stages read the clock, so the two runs part from the first step, and by the switch
their validation R@1 can already differ by 5-9 points. Here, per seed, the staged recipe trains until
its next stage begins (``stop_at_stage_switch``: last.pt saved there, the budget's clock with it) and
its run folder is copied twice: ``staged/`` continues with the recipe as it is, ``base/`` with the base
recipe written into its last.pt. Both resume under the same whole-run budget (the time before the
switch counts), from the same weights, optimiser moments, random state, batch order and validation
history, so their difference is what the later stage does from the switch on. Each arm's ``best.pt``
(picked on **val**, over the shared evaluations before the switch and its own after) is evaluated on
test.

    tbps synth /tmp/demo-data --ids 1000
    python bench/forked_pairs.py mefa-cpu --data /tmp/demo-data --seeds 0 1 2 --minutes 8 --out /tmp/fork \\
        --base 'stages=[]' losses.imr_text.weight=0 losses.imr_image.weight=0 losses.cmr.weight=0 \\
        losses.dcc.weight=0
    python bench/forked_pairs.py mefa-cpu --out /tmp/fork --report

The table lists, per seed, the steps before the switch, each arm's steps and test text-to-image R@1,
and the difference (staged minus base) of every metric, then mean ± sample std over the seeds.
A seed whose arms already hold results for the same settings is not retrained (a folder holding a
pair of other settings is refused).

``--arm NAME KEY=VALUE ...`` (repeatable) adds an arm forked from the same trunk: the staged recipe with
those overrides from the switch on (``--arm no-mpm losses.mpm.weight=0`` drops one loss of the later
stage). It goes into ``OUT/seed-S/NAME`` and its differences against the base arm are tabled too. A
folder whose trunk is already there only trains the arms it lacks, so arms can be added to finished pairs
(an arm rerun in another hour, as ``--arm base-again 'stages=[]' ...``, shows how much the hour moved the
others).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import METRICS, mean_std  # noqa: E402  (bench/seeds.py: the same statistics)

ARMS = ("staged", "base")


def run_pair(recipe_name: str, data: str, out: Path, seed: int, minutes: float | None, epochs: int | None,
             overrides: list[str], base_overrides: list[str], extra: dict[str, list[str]] | None = None) -> dict:
    """The trunk to the switch, then every arm from it; returns (and writes ``pair.json``) the results.

    ``extra`` maps an arm's name to its overrides of the staged recipe, applied from the switch on.
    """
    import tbps
    from tbps.files import write_json
    from tbps.models.checkpoint import load_checkpoint, save_checkpoint

    root = out / f"seed-{seed}"
    staged = tbps.load_recipe(recipe_name, [*overrides, f"train.seed={seed}"])
    base = tbps.load_recipe(recipe_name, [*overrides, *base_overrides, f"train.seed={seed}"])
    if not staged.stages:
        raise SystemExit(f"{recipe_name} with {overrides or 'no overrides'} has no stages: nothing to fork")
    trunk, key = root / "trunk", {"recipe": recipe_name, "data": str(Path(data).resolve()), "minutes": minutes,
                                  "epochs": epochs, "overrides": overrides, "base": base_overrides}
    if (root / "trunk.json").exists() and json.loads((root / "trunk.json").read_text()).get("key") != key:
        raise SystemExit(f"{root} holds a pair made with other settings: choose another --out")
    if not (trunk / "last.pt").exists() or not (root / "trunk.json").exists():
        shutil.rmtree(trunk, ignore_errors=True)
        t = tbps.train(data, staged, trunk, epochs=epochs, time_budget=minutes, progress=False,
                       stop_at_stage_switch=True)
        if t["finished"] or t["stopped_by_budget"]:
            raise SystemExit(f"seed {seed}: the run ended before its next stage began: nothing to fork")
        write_json(root / "trunk.json", {"key": key, "steps": t["global_step"], "elapsed_s": t["elapsed_s"]})
    at_switch = json.loads((root / "trunk.json").read_text())
    result = {"seed": seed, "switch_step": at_switch["steps"], "switch_s": at_switch["elapsed_s"]}
    arms = {"staged": (staged, []), "base": (base, base_overrides)}
    for name, more in (extra or {}).items():
        arms[name] = (tbps.load_recipe(recipe_name, [*overrides, *more, f"train.seed={seed}"]), more)
    for arm, (recipe, more) in arms.items():
        d = root / arm
        done = d / "arm_result.json"
        if arm not in ARMS and done.exists() and json.loads(done.read_text()).get("overrides") != more:
            raise SystemExit(f"{d} holds an arm made with other overrides: choose another arm name")
        if not done.exists():
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(trunk, d)
            if arm != "staged":  # the trunk's last.pt already holds the staged recipe
                ck = load_checkpoint(d / "last.pt")
                save_checkpoint(d / "last.pt", {**ck, "recipe": recipe.to_dict()})
            s = tbps.train(data, recipe, d, epochs=epochs, time_budget=minutes, progress=False, resume=True)
            test = tbps.evaluate(d / "best.pt", data, "test")
            best = s.get("best_info") or {}
            write_json(done, {"steps": s["global_step"], "picked_epoch": best.get("epoch"), "overrides": more,
                              "val_score": best.get("score"), "test_t2i": test["t2i"]})
        result[arm] = json.loads(done.read_text())
    for d in sorted(root.iterdir()):  # arms forked by an earlier call stay in pair.json
        if d.name not in result and d.name != "trunk" and (d / "arm_result.json").exists():
            result[d.name] = json.loads((d / "arm_result.json").read_text())
    write_json(root / "pair.json", result)
    return result


def pm(values: list[float], sign: str = "") -> str:
    """``mean ± std`` of ``values`` to two decimals; ``sign="+"`` signs the mean (for differences)."""
    m, sd = mean_std(values)
    return f"{m:{sign}.2f} ± {sd:.2f}"


def arm_names(pair: dict) -> list[str]:
    """The arms a pair holds (its other entries are the seed and the switch's step and time)."""
    return [a for a, v in pair.items() if isinstance(v, dict)]


def table(pairs: list[dict]) -> str:
    head = ["seed", "steps to the switch", "steps staged / base", "picked at staged / base",
            "test R1 staged", "test R1 base"] + [f"d{m}" for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    diffs = {m: [] for m in METRICS}
    for p in sorted(pairs, key=lambda p: p["seed"]):
        s, b = p["staged"], p["base"]
        d = {m: s["test_t2i"][m] - b["test_t2i"][m] for m in METRICS}
        for m in METRICS:
            diffs[m].append(d[m])
        lines.append("| " + " | ".join([str(p["seed"]), str(p["switch_step"]), f"{s['steps']} / {b['steps']}",
                                        f"{s['picked_epoch']} / {b['picked_epoch']}", f"{s['test_t2i']['R1']:.2f}",
                                        f"{b['test_t2i']['R1']:.2f}"] + [f"{d[m]:+.2f}" for m in METRICS]) + " |")
    r1 = {arm: pm([p[arm]["test_t2i"]["R1"] for p in pairs]) for arm in ARMS}
    lines.append("| " + " | ".join([f"mean ± std (n={len(pairs)})", "", "", "", r1["staged"], r1["base"]]
                                   + [pm(diffs[m], "+") for m in METRICS]) + " |")
    return "\n".join(lines)


def arms_table(pairs: list[dict]) -> str:
    """Every arm that all the pairs hold, against the base arm, paired by seed."""
    names = [a for a in arm_names(pairs[0]) if a != "base" and all(a in p for p in pairs)]
    pairs = sorted(pairs, key=lambda p: p["seed"])
    head = ["arm", "steps", "test R1", "dR1 vs base, per seed", "dR1 vs base", "dmAP vs base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in ["base", *names]:
        r1 = [p[a]["test_t2i"]["R1"] for p in pairs]
        d = {m: [p[a]["test_t2i"][m] - p["base"]["test_t2i"][m] for p in pairs] for m in ("R1", "mAP")}
        steps = [p[a]["steps"] for p in pairs]
        cells = [a, f"{min(steps)}-{max(steps)}", pm(r1)]
        if a == "base":
            cells += ["", "", ""]
        else:
            cells += [", ".join(f"{x:+.2f}" for x in d["R1"]), pm(d["R1"], "+"), pm(d["mAP"], "+")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("recipe", help="a staged recipe's name or YAML path")
    p.add_argument("--data", help="dataset folder (with a val split for the choice of best.pt)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="train every run for this many epochs")
    length.add_argument("--minutes", type=float, default=None, help="wall-clock budget of every run, whole")
    p.add_argument("--out", required=True, help="folder of the pairs (OUT/seed-S/{trunk,staged,base})")
    p.add_argument("--base", nargs="+", default=["stages=[]"], metavar="KEY=VALUE",
                   help="overrides that make the base arm (default: 'stages=[]'; add the later stage's "
                   "losses at weight 0, as the recipe's header says)")
    p.add_argument("--arm", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="one more arm forked at the switch: its name, then its overrides of the staged recipe "
                   "(repeatable; into OUT/seed-S/NAME)")
    p.add_argument("--report", action="store_true", help="only print the table of finished pairs")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for both arms")
    args = p.parse_intermixed_args(argv)
    from tbps.engine.runtime import passive_openmp_waits

    passive_openmp_waits()  # as the tbps command does, before torch loads
    out = Path(args.out)
    extra = {a[0]: a[1:] for a in args.arm}
    if set(extra) & {*ARMS, "trunk"}:
        p.error(f"--arm: the names {', '.join(ARMS)} and trunk are taken")
    for name in extra:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            p.error(f"--arm {name!r}: an arm's name is a folder name (letters, digits, '_', '.', '-')")
    pairs = []
    if args.report:
        pairs = [json.loads(f.read_text()) for f in sorted(out.glob("seed-*/pair.json"))]
    else:
        if not args.data:
            p.error("--data is needed to train (or pass --report)")
        for s in args.seeds:
            arms = "the staged, the base and the other arms" if extra else "the staged and the base arm"
            print(f"seed {s}: trunk to the switch, then {arms}, into {out / f'seed-{s}'}", flush=True)
            pairs.append(run_pair(args.recipe, args.data, out, s, args.minutes, args.epochs, args.overrides,
                                  args.base, extra))
            d = pairs[-1]["staged"]["test_t2i"]["R1"] - pairs[-1]["base"]["test_t2i"]["R1"]
            print(f"seed {s}: done, dR1 {d:+.2f}", flush=True)
    if not pairs:
        print(f"no finished pairs in {out}", file=sys.stderr)
        return 1
    print(f"\n{args.recipe}, forked at the switch; best.pt picked on val; test split, text->image, percent")
    print(table(pairs))
    if len({a for p in pairs for a in arm_names(p)}) > len(ARMS):
        print("\nevery arm against the base arm, paired by seed")
        print(arms_table(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
