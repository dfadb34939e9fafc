"""`tbps train`: train a recipe on a dataset folder."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a recipe on a dataset",
        description="Train a TBPS recipe. Writes RUN/last.pt, RUN/best.pt (best on the val split; the last "
        "epoch when the dataset has no val split: never chosen on test), RUN/config.yaml and "
        "RUN/metrics.{jsonl,csv}. Under torchrun it trains on every GPU with gathered features.",
        epilog="examples:\n"
        "  tbps train --data data/synth --out runs/cpu --time-budget 8\n"
        "  tbps train --data /data/CUHK-PEDES --recipe tbps-clip --out runs/cuhk optim.lr=5e-5\n"
        "  torchrun --nproc_per_node 4 -m tbps.cli.main train --data /data/CUHK-PEDES --recipe tbps-clip\n"
        "  tbps train --resume runs/cuhk        # continue a killed run\n"
        "  tbps train --data data/synth --recipe mefa-cpu --init runs/cpu/best.pt   # fine-tune a trained model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", help="dataset root (layout detected: CUHK-PEDES, ICFG-PEDES, RSTPReid, "
                   "TBPS-CLIP bundle, JSONL)")
    p.add_argument("--layout", help="force a layout: cuhk-pedes, icfg-pedes, rstpreid, tbps-clip, jsonl")
    p.add_argument("--recipe", default=None,
                   help="recipe name (see `tbps train --list-recipes`) or YAML path (default: tbps-clip-cpu)")
    p.add_argument("--model", help="architecture, e.g. ViT-B-16, RN50, EVA02-B-16, tiny-vit")
    p.add_argument("--pretrained", help="open_clip weights tag (e.g. openai) or local checkpoint path")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (a positive integer)")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="stop cleanly after this much time, > 0 (saves and evaluates); the whole run's: a "
                   "resumed run counts the time it ran before, as its learning-rate schedule does")
    p.add_argument("--budget-clock", choices=("wall", "cpu"), default="wall",
                   help="what --time-budget counts: wall-clock time (default), or this process's CPU time "
                   "summed over its threads, so that ablations at equal budget get equal compute on a "
                   "shared machine (use with data.num_workers=0: worker processes are not counted)")
    p.add_argument("--out", default=None, help="run folder (default: runs/RECIPE)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last.pt (with its own recipe)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a non-empty run folder is refused)")
    p.add_argument("--init", metavar="CKPT",
                   help="fine-tune: start from the weights of a tbps checkpoint (a run's best.pt or last.pt) with "
                   "a fresh optimiser, schedule and epoch count; modules the checkpoint lacks start fresh")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--strict", action="store_true", help="a missing or corrupt image is an error, not a skip")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes, each with its description, and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. optim.lr=3e-4 data.batch_size=32")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import os
    from pathlib import Path

    from tbps.cli.common import UserError, check_device
    from tbps.recipes.config import DEFAULT_RECIPE, list_recipes, load_recipe, load_recipe_dict
    from tbps.engine.train import TrainJob, train

    if args.list_recipes:
        names = list_recipes()
        width = max(map(len, names))
        for name in names:
            print(f"{name:<{width}}  {load_recipe_dict(name).get('description', '')}".rstrip())
        return 0
    check_device(args.device, None)
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.arch={args.model}")
    if args.pretrained:
        overrides.append(f"model.pretrained={args.pretrained}")
    if args.resume and args.init:
        raise UserError("--resume continues a run with its own state; --init starts a new one: pass one of them")
    if args.init and not Path(args.init).is_file():
        raise UserError(f"--init {args.init}: no such checkpoint file")
    if args.resume:
        if overrides or args.recipe:
            raise UserError("--resume continues a run with its own recipe: --recipe, --model, --pretrained and "
                            "KEY=VALUE overrides are not applied (start a new run with --init RUN/last.pt instead)")
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UserError(f"--resume {args.resume} continues in its own folder: drop --out {args.out}")
        out, data = args.resume, args.data or _resumed_data_root(Path(args.resume))
        recipe = load_recipe(DEFAULT_RECIPE)  # replaced by the run's own recipe
    else:
        if not args.data:
            raise UserError("--data ROOT is required (or --resume RUN)")
        data = args.data
        recipe = load_recipe(args.recipe or DEFAULT_RECIPE, overrides)
        out = args.out or f"runs/{recipe.name}"
    job = TrainJob(data_root=data, recipe=recipe, out_dir=out, layout=args.layout, epochs=args.epochs,
                   time_budget=args.time_budget, budget_clock=args.budget_clock, resume=bool(args.resume),
                   overwrite=args.overwrite, init_from=args.init, device=args.device, strict=args.strict,
                   progress=not args.no_progress)
    summary = train(job)  # checks every option, the device and the run folder before any work
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    print(json.dumps({k: v for k, v in summary.items() if k != "best_info"}, indent=2))
    print(steps_line(summary, args.time_budget, args.budget_clock))
    if summary["best_info"]:
        b = summary["best_info"]
        print(f"best.pt: {b['metric']} {b['score']:.2f} at epoch {b['epoch']}")
    return 0


def steps_line(summary: dict, budget: float | None, clock: str) -> str:
    """How much training the run got: under a time budget a machine's load decides it."""
    from tbps.engine.runtime import format_duration

    got = (f"trained {summary['global_step']} of {summary['total_steps']} steps "
           f"({summary['epochs_trained']:g} epochs) in {format_duration(summary['elapsed_s'])}")
    if summary["stopped_by_budget"]:
        return got + f": the {clock} time budget of {budget:g} min ended it"
    return got + (f", within the {clock} time budget of {budget:g} min" if budget else "")


def _resumed_data_root(run) -> str:
    """The dataset a run was trained on, from its ``config.yaml`` (``--resume`` without ``--data``)."""
    import yaml

    from tbps.cli.common import UserError

    if not run.is_dir():
        raise UserError(f"--resume {run}: no such run folder")
    if not (run / "last.pt").is_file():
        raise UserError(f"--resume {run}: no last.pt there to continue from")
    try:
        root = yaml.safe_load((run / "config.yaml").read_text()).get("data_root")
    except (OSError, yaml.YAMLError, AttributeError):
        root = None
    if not isinstance(root, str):
        raise UserError(f"--resume {run}: its config.yaml does not name the dataset; pass --data ROOT")
    return root
