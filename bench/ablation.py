"""Component ablations in the papers' regime: every arm fine-tunes ONE shared base checkpoint.

The papers add their components to a pretrained model (MeFa: EVA-CLIP; LAIP: ALBEF; IRRA: CLIP).
The stand-in here is one **base checkpoint per backbone**, trained once with the plain contrastive
stage (N-ITC + R-ITC: ``mefa-cpu`` with every path off, one stage) on the training split. Every
arm of every method then starts from that checkpoint (``tbps train --init``) and trains the same
number of epochs on the same data, so every arm takes the **same number of optimiser steps** (the
table prints them). Arms run strictly **one at a time** (one process, all the cores: never two
trainings sharing them), for each of ``--seeds`` (``train.seed``: batch order, augmentation and
the new heads' initialisation change; the base and the data do not). best.pt is chosen on val; the
table is the test split, text-to-image, mean ± sample std (n-1) over the seeds, and each arm's R1
difference from its method's baseline arm paired by seed (mean ± std of the per-seed differences).

    tbps synth data/abl --ids 1000                       # the demo's data
    python bench/ablation.py --set mefa laip irra --data data/abl --out runs/abl \\
        --base-epochs 8 --epochs 2 --seeds 0 1 2
    python bench/ablation.py --set mefa laip irra --data data/abl --out runs/abl --epochs 2 --seeds 0 1 2 --report
    # a smoke run: the micro architecture, tiny data, one epoch each
    python bench/ablation.py --set irra --data /tmp/tiny --out /tmp/abl --base-epochs 1 --epochs 1 --seeds 0 1 \\
        --overrides model.arch=micro-vit model.image_size=[32,16] model.context_length=32 data.batch_size=8 \\
        losses.fusion.width=32 losses.fusion.heads=2

Fine-tuning settings (every arm, the baselines included): one stage at ``lr_scale`` 0.2 (a
fine-tuning lr: a fifth of the -cpu recipes' from-scratch peak), warm-up ``--warmup`` epochs, then cosine.
``--fresh PREFIX ...`` starts every arm with the base's model tensors under those prefixes left out, so
those parts begin at their fresh initialisation (drawn with each arm's seed) while the rest is the base's:
a paper whose method puts a new module on a pretrained one (TextReID: a new BiGRU text stream on CLIP's
image encoder; ``--fresh text_stream.gru text_stream.proj``). The arms' momentum copies are made from the
loaded weights, fresh parts included, as at any ``--init``.
``--overrides KEY=VALUE ...`` are applied to every run (a ``losses.X`` one only where the objective has
loss X; the base takes none of the ``losses.*`` ones).
A run whose folder already holds a result for the same command is not retrained (``--retrain``
forces it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

_LAIP_OFF = ["losses.triplet.weight=0", "losses.bidiratt.weight=0", "losses.mpm.weight=0"]
_MEFA_PATHS = ("imr_text", "imr_image", "cmr", "dcc")


def _mefa_only(*on: str) -> list[str]:
    """MeFa's paths ``on`` at the paper's weight 1, the others off (`mefa-cpu` itself ships IMR(T) and IMR(V) off)."""
    return [f"losses.{k}.weight={1 if k in on else 0}" for k in _MEFA_PATHS]


def _bidiratt(mode: str, *more: str) -> list[str]:
    """LAIP's baseline (ITC + ITM) plus BidirAtt in ``mode``, with ``more`` overrides."""
    return _LAIP_OFF + ["losses.bidiratt.weight=1", f"losses.bidiratt.mode={mode}", *more]


# TBPS-CLIP's components over N-ITC: off as in the -cpu recipe, on at the paper's weights (tbps-clip.yaml).
_TC_OFF = {"ritc": ["losses.ritc.weight=0"], "citc": ["losses.citc.weight=0"], "ss": ["losses.ss.weight=0"],
           "mvs": ["losses.mvs.enabled=false"]}
_TC_ON = {"ritc": ["losses.ritc.weight=1"], "citc": ["losses.citc.weight=0.1"],
          "ss": ["losses.ss.weight=0.4", "data.augment.ss_views=true"],
          "mvs": ["losses.mvs.enabled=true", "data.augment.mvs=true"]}


def _tbpsclip_only(*on: str) -> list[str]:
    return [o for k in _TC_OFF for o in (_TC_ON[k] if k in on else _TC_OFF[k])]


ARMS: dict[str, list[tuple[str, str, list[str]]]] = {
    # (arm, recipe, overrides); the first arm of a set is its baseline
    "mefa": [
        ("mefa-base", "mefa-cpu", _mefa_only()),
        ("mefa-imr-t", "mefa-cpu", _mefa_only("imr_text")),
        ("mefa-imr-v", "mefa-cpu", _mefa_only("imr_image")),
        ("mefa-cmr", "mefa-cpu", _mefa_only("cmr")),
        ("mefa-dcc", "mefa-cpu", _mefa_only("dcc")),
        ("mefa-all", "mefa-cpu", _mefa_only(*_MEFA_PATHS)),
    ],
    "laip": [
        ("laip-base", "laip-cpu", _LAIP_OFF),
        ("laip-fwd", "laip-cpu", _bidiratt("forward")),
        ("laip-bwd", "laip-cpu", _bidiratt("backward")),
        ("laip-both", "laip-cpu", _bidiratt("both")),
        ("laip-mpm", "laip-cpu", _LAIP_OFF + ["losses.mpm.weight=1"]),
        ("laip-all", "laip-cpu", ["losses.bidiratt.weight=1"]),  # the paper's weights (laip-cpu ships 0.1)
        # the two issue-13 changes to BidirAtt undone one at a time (docs/laip-irra.md, "Checked against the papers")
        ("laip-both-undetached", "laip-cpu", _bidiratt("both", "losses.bidiratt.detach=false")),
        ("laip-both-mean-first", "laip-cpu", _bidiratt("both", "losses.bidiratt.heads=mean_first")),
    ],
    "tbpsclip": [
        ("tbpsclip-nitc", "tbps-clip-cpu", _tbpsclip_only()),
        ("tbpsclip-ritc", "tbps-clip-cpu", _tbpsclip_only("ritc")),
        ("tbpsclip-citc", "tbps-clip-cpu", _tbpsclip_only("citc")),
        ("tbpsclip-ss", "tbps-clip-cpu", _tbpsclip_only("ss")),
        ("tbpsclip-mvs", "tbps-clip-cpu", _tbpsclip_only("mvs")),
        ("tbpsclip-all", "tbps-clip-cpu", _tbpsclip_only("ritc", "citc", "ss", "mvs")),
    ],
    # TextReID's backbone has its own base (the frozen MiniLM words + BiGRU text stream). The -cpu
    # recipe trains without the alignment loss (from scratch it stalls); from a trained base it is an arm.
    "textreid": [
        ("textreid-id", "textreid-cpu", ["losses.cmmoco.weight=0"]),
        ("textreid-cmmoco", "textreid-cpu", []),
        ("textreid-cmmoco-align", "textreid-cpu", ["losses.align.weight=1"]),
    ],
    "irra": [
        ("irra-sdm", "irra-cpu", ["losses.id.weight=0", "losses.mlm.weight=0"]),
        ("irra-sdm-id", "irra-cpu", ["losses.mlm.weight=0"]),
        ("irra-sdm-id-mlm", "irra-cpu", []),
    ],
}
# The shared base: N-ITC + R-ITC in one stage (mefa-cpu with every path off).
BASE_RECIPE, BASE_OVERRIDES = "mefa-cpu", ["stages=[]", *_mefa_only()]
FT_STAGE = "stages=[{start: 0.0, lr_scale: 0.2}]"
METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def _tbps() -> list[str]:
    return [sys.executable, "-m", "tbps.cli.main"]


def backbone(recipe: str, overrides: list[str]) -> tuple[str, dict]:
    """A name for the recipe's backbone (architecture, image size, text length) and its model section."""
    from tbps.recipes.config import load_recipe

    model = load_recipe(recipe, overrides).to_dict()["model"]
    h, w = model["image_size"]
    tower = model.get("text_tower") or {}
    text = f"-{tower['type']}-{tower.get('source', '')}".rstrip("-") if tower else ""
    stem = "-stem" + "-".join(map(str, model["conv_stem"])) if model.get("conv_stem") else ""  # tbps-clip-cpu's own
    return f"{model['arch']}{stem}-{h}x{w}-c{model['context_length']}{text}", model


def run(name: str, out: Path, cmd_args: list[str], args) -> dict:
    """Train one run (one process, alone on the machine), evaluate its best.pt on test; cached in
    ``out/result.json`` keyed by the command."""
    done = out / "result.json"
    if done.exists() and not args.retrain:
        result = json.loads(done.read_text())
        if result.get("args") == cmd_args:
            return result
    cmd = _tbps() + ["train", "--data", args.data, "--out", str(out), "--overwrite", "--no-progress", *cmd_args]
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    log_path = out.parent / f"{out.name}.log"
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"{name}: tbps train failed, see {log_path}")
    wall = time.time() - t0
    ev = subprocess.run(_tbps() + ["eval", str(out / "best.pt"), "--data", args.data, "--json"],
                        check=True, capture_output=True, text=True, env=env)
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = {"name": name, "args": cmd_args, "wall_s": round(wall, 1), "steps": hist[-1]["step"],
              "epoch": hist[-1]["epoch"], "val_R1": hist[-1].get("val_t2i_R1"),
              "test": json.loads(ev.stdout.strip().splitlines()[-1])["t2i"]}
    done.write_text(json.dumps(result, indent=1))
    print(f"{name}: test R1 {result['test']['R1']:.2f} after {result['steps']} steps "
          f"({wall / 60:.1f} min wall)", flush=True)
    return result


def train_base(key: str, model: dict, args) -> Path:
    """The shared base checkpoint of one backbone (trained once, seed ``--base-seed``)."""
    out = Path(args.out) / f"base-{key}"
    shared = [o for o in args.overrides if not o.startswith("losses.")]  # the arms' losses are not the base's
    cmd = ["--recipe", BASE_RECIPE, "--epochs", str(args.base_epochs), *COMMON(args), *BASE_OVERRIDES,
           *shared, f"model={json.dumps(model)}", f"train.seed={args.base_seed}"]
    if not args.report:
        run(f"base {key}", out, cmd, args)
    return out / "best.pt"


def without(base: Path, prefixes: list[str], args) -> Path:
    """``base`` with the model tensors under ``prefixes`` left out (``--fresh``), written once into ``--out``."""
    slug = "-".join(p.replace(".", "_") for p in prefixes)
    target = Path(args.out) / f"{base.parent.name}-without-{slug}.pt"
    if args.report or target.exists():
        return target
    from tbps.models.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(base)
    ckpt.pop("path", None)
    model = ckpt["model"]
    under = {p: [k for k in model if k == p or k.startswith(p + ".")] for p in prefixes}
    unmatched = [p for p, keys in under.items() if not keys]
    if unmatched:
        raise SystemExit(f"--fresh {' '.join(unmatched)}: no tensor of {base}'s model is under it "
                         f"(its top-level parts: {', '.join(sorted({k.split('.')[0] for k in model}))})")
    gone = {k for keys in under.values() for k in keys}
    ckpt["model"] = {k: v for k, v in model.items() if k not in gone}
    save_checkpoint(target, ckpt)
    print(f"{target}: {base} without {len(gone)} tensor(s) under {', '.join(prefixes)}", flush=True)
    return target


def COMMON(args) -> list[str]:  # noqa: N802  every run: no DataLoader workers, all cores to torch
    return ["data.num_workers=0", f"train.cpu_threads={args.threads or len(os.sched_getaffinity(0))}"]


def for_recipe(recipe: str, overrides: list[str]) -> list[str]:
    """The overrides that apply to ``recipe``: a ``losses.X...`` one only if its objective has loss X."""
    from tbps.objectives import OBJECTIVES
    from tbps.recipes.config import load_recipe

    known = OBJECTIVES[load_recipe(recipe).objective].defaults
    return [o for o in overrides if not o.startswith("losses.") or o.split(".")[1].split("=")[0] in known]


def arm_runs(args) -> list[tuple[str, str, str, list[str], int]]:
    """(set, arm, run folder name, tbps train arguments, seed) for every arm and seed, base first."""
    runs = []
    for s in args.set:
        for arm, recipe, over in ARMS[s]:
            if args.only and arm not in args.only:
                continue
            mine = for_recipe(recipe, args.overrides)
            key, model = backbone(recipe, mine)
            base = train_base(key, model, args)
            if args.fresh:
                base = without(base, args.fresh, args)
            for seed in args.seeds:
                cmd = ["--recipe", recipe, "--epochs", str(args.epochs), "--init", str(base), *COMMON(args),
                       *mine, *over, FT_STAGE, f"optim.warmup_epochs={args.warmup}",
                       f"train.seed={seed}"]
                runs.append((s, arm, f"{arm}/seed-{seed}", cmd, seed))
    return runs


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def table(results: dict[tuple[str, str], dict[int, dict]]) -> str:
    """One row per arm: steps, seeds, test t2i metrics mean ± std, and the R1 difference from the set's
    baseline arm paired by seed (the same seed gives both runs the same batch order and augmentation, so
    the paired spread is the one that says whether a component moved R1)."""
    rows = ["| arm | steps per seed | seeds | R1 | dR1 vs base, paired by seed | R5 | R10 | mAP | mINP |",
            "|---|---|---|---|---|---|---|---|---|"]
    base: dict[str, dict[int, dict]] = {}
    for (s, arm), by_seed in results.items():
        base.setdefault(s, by_seed)
        rs = list(by_seed.values())
        stats = {m: mean_std([r["test"][m] for r in rs]) for m in METRICS}
        steps = "/".join(sorted({str(r["steps"]) for r in rs}))
        cell = {m: f"{a:.2f} ± {b:.2f}" for m, (a, b) in stats.items()}
        both = sorted(set(by_seed) & set(base[s]))
        d, sd = mean_std([by_seed[k]["test"]["R1"] - base[s][k]["test"]["R1"] for k in both]) if both else (0, 0)
        rows.append(f"| {arm} | {steps} | {len(rs)} | {cell['R1']} | {d:+.2f} ± {sd:.2f} | "
                    f"{cell['R5']} | {cell['R10']} | {cell['mAP']} | {cell['mINP']} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", required=True, nargs="+", choices=sorted(ARMS), help="which method(s)")
    p.add_argument("--data", required=True, help="dataset root (e.g. from `tbps synth`)")
    p.add_argument("--out", default="runs/ablation", help="folder of the run folders")
    p.add_argument("--base-epochs", type=int, default=8, help="epochs of the shared base (plain contrastive)")
    p.add_argument("--base-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of every arm (equal steps)")
    p.add_argument("--warmup", type=float, default=0.2, help="fine-tuning warm-up, epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: every core; runs are serial)")
    p.add_argument("--only", nargs="*", help="arm names to run (default: all of the set; a set's baseline for "
                   "dR1 is then its first arm that ran)")
    p.add_argument("--fresh", nargs="+", default=[], metavar="PREFIX",
                   help="start every arm with the base's model tensors under these prefixes left out (their fresh "
                   "initialisation), e.g. text_stream.gru text_stream.proj")
    p.add_argument("--report", action="store_true", help="print the table of finished runs, train nothing")
    p.add_argument("--retrain", action="store_true", help="train again even where a result exists")
    p.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for every run (the base: all but losses.*)")
    args = p.parse_args()
    results: dict[tuple[str, str], dict[int, dict]] = {}
    for s, arm, folder, cmd, seed in arm_runs(args):  # strictly one run at a time
        out = Path(args.out) / folder
        if args.report:
            f = out / "result.json"
            if f.exists():
                results.setdefault((s, arm), {})[seed] = json.loads(f.read_text())
            continue
        results.setdefault((s, arm), {})[seed] = run(f"{arm} seed {seed}", out, cmd, args)
    fresh = f" with {', '.join(args.fresh)} started afresh" if args.fresh else ""
    print(f"\n{' + '.join(args.set)}: each arm fine-tuned {args.epochs} epoch(s) from the shared base "
          f"({args.base_epochs} epochs of N-ITC + R-ITC){fresh}, seeds {args.seeds}; test split, text-to-image")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
