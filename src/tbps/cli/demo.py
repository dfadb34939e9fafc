"""`tbps demo`: the main job offline, end to end, in about ten minutes on 2 idle CPU cores.

By default the demo is a fixed amount of work (the settings in ``demo_expected.json``, seeded), so
it gives the same figures on any machine, however busy: a busy one only takes longer. The same file
holds the figures those settings gave, which the demo prints before and after training and the
README shows (a test checks that the two agree). ``--minutes`` trains for a wall-clock budget instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXPECTED_FILE = Path(__file__).with_name("demo_expected.json")


def expected() -> dict:
    """The demo's default settings and the test figures they gave (``demo_expected.json``)."""
    return json.loads(EXPECTED_FILE.read_text())


def register(sub) -> None:
    d = expected()["settings"]
    p = sub.add_parser(
        "demo",
        help="synthesise data, train the CPU recipe, evaluate, draw the results (offline)",
        description="The whole job offline: write a synthetic pedestrian dataset, train the tbps-clip-cpu "
        f"recipe on it for a fixed amount of work ({d['epochs']} epochs, seeded: the same figures on any "
        "machine, a busy one only takes longer; the time left shows after the first steps), print the test "
        "metrics beside the ones to expect, and save a picture of test captions with their top-5 retrieved "
        "images (correct ones framed green).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="demo", help="folder for the data, the run and the picture")
    p.add_argument("--ids", type=int, default=d["ids"], help="synthetic identities")
    p.add_argument("--images-per-id", type=int, default=d["images_per_id"], help="camera views per identity")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None,
                        help=f"train this many epochs (default {d['epochs']}, with the schedule settings "
                        f"{' '.join(d['overrides']) or 'of the recipe'})")
    length.add_argument("--minutes", type=float, default=None,
                        help="train for this wall-clock budget instead (the recipe's schedule compressed into it): "
                        "how many steps that buys depends on how busy the machine is")
    p.add_argument("--recipe", default=d["recipe"], help="recipe to train (see `tbps train --list-recipes`)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of the dataset and of training")
    p.add_argument("--queries", type=int, default=6, help="test captions shown in the picture")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run of an earlier demo in OUT/run (the dataset in OUT/data is reused)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    import random
    import time

    import torch

    from tbps.recipes.config import load_recipe
    from tbps.data.layouts import load_annotations
    from tbps.synth import synthesize
    from tbps.models.checkpoint import load_model
    from tbps.engine.evaluate import evaluate, format_table
    from tbps.engine.train import TrainJob, train
    from tbps.models.factory import get_tokenizer
    from tbps.files import write_json
    from tbps.retrieval.viz import retrieval_grid

    t_start = time.time()
    out = Path(args.out)
    data, run_dir = out / "data", out / "run"
    spec = expected()
    fixed = args.minutes is None
    epochs = (args.epochs or spec["settings"]["epochs"]) if fixed else args.epochs
    schedule = list(spec["settings"]["overrides"]) if fixed else []
    recipe = load_recipe(args.recipe, [*schedule, f"train.seed={args.seed}", *args.overrides])
    job = TrainJob(data_root=str(data), recipe=recipe, out_dir=str(run_dir), epochs=epochs, time_budget=args.minutes,
                   overwrite=args.overwrite)
    _check_args(args, recipe, job)  # everything before any work: nothing is written on a mistake
    to_expect = expected_figures(spec, _settings(args, epochs))
    if (data / "reid_raw.json").exists():
        print(f"[1/4] using the synthetic dataset already in {data}")
    else:
        print(f"[1/4] writing {args.ids} synthetic identities x {args.images_per_id} views to {data}")
        stats = synthesize(data, ids=args.ids, images_per_id=args.images_per_id, seed=args.seed)
        print(f"      {stats['images']} images, {stats['captions']} captions in {stats['seconds']:.1f}s")

    if fixed:
        print(f"[2/4] training {args.recipe} for {epochs} epochs, seed {args.seed} "
              f"({' '.join(schedule) or 'the recipe schedule'}): a fixed amount of work, the time left shows "
              "after the first steps")
    else:
        print(f"[2/4] training {args.recipe} for at most {args.minutes:g} min of wall-clock time "
              "(how many steps that buys depends on the machine's load)")
    print(f"      {to_expect}")
    summary = train(job)
    print(f"      trained {summary['global_step']} of {summary['total_steps']} steps "
          f"({summary['epochs_trained']:g} epochs)" + (", stopped by the time budget" if summary["stopped_by_budget"]
                                                     else ""))

    print("[3/4] evaluating best.pt (chosen on val) on the test split")
    model, ckpt = load_model(run_dir / "best.pt")
    ann = load_annotations(data)
    test = ann.split("test")
    res = evaluate(model, get_tokenizer(model.spec), test, max_words=recipe.data.max_words, progress=False)
    print(format_table(res.metrics, "test split"))
    print(f"      {to_expect}")

    print("[4/4] drawing retrieval examples")
    rng = random.Random(args.seed)
    picks = sorted(rng.sample(range(len(res.captions)), min(args.queries, len(res.captions))))
    top = torch.topk(res.similarity[picks], k=min(5, res.similarity.shape[1]), dim=1)
    ranked = [[res.image_paths[j] for j in row] for row in top.indices.tolist()]
    correct = [[res.image_ids[j] == res.caption_ids[q] for j in row] for q, row in zip(picks, top.indices.tolist())]
    m = res.metrics["t2i"]
    picture = retrieval_grid(
        out / "retrieval.png", [res.captions[q] for q in picks], ranked, correct, top.values.tolist(),
        title=f"tbps demo: test text->image R@1 {m['R1']:.1f}%, mAP {m['mAP']:.1f}% "
              f"({res.metrics['queries']} queries, {res.metrics['gallery']} images); green = same person",
    )
    write_json(out / "results.json", {"test": res.metrics, "train": {k: v for k, v in summary.items()},
                                     "recipe": recipe.name, "settings": _settings(args, epochs), "expected": to_expect,
                                     "minutes_total": round((time.time() - t_start) / 60, 2)})
    print(f"\npicture: {picture.resolve()}")
    print(f"metrics: {(out / 'results.json').resolve()}")
    print(f"checkpoint: {(run_dir / 'best.pt').resolve()}  (try: tbps eval {run_dir / 'best.pt'} --data {data})")
    return 0


def _settings(args, epochs: int | None) -> dict:
    """What decides the demo's figures, in the shape of ``demo_expected.json``'s settings."""
    return {"recipe": args.recipe, "ids": args.ids, "images_per_id": args.images_per_id, "seed": args.seed,
            "epochs": epochs, "minutes": args.minutes, "user_overrides": list(args.overrides)}


def expected_figures(spec: dict, settings: dict) -> str:
    """The line that tells what test text->image figures to expect for ``settings``: the measured
    ones when the settings are the measured ones (a time budget never is: its steps depend on the
    machine), else what differs."""
    want = spec["settings"]
    differ = [k for k in ("recipe", "ids", "images_per_id", "epochs") if settings[k] != want[k]]
    differ += ["time budget"] if settings["minutes"] is not None else []
    differ += ["recipe overrides"] if settings["user_overrides"] else []
    if differ:
        return (f"no measured figures to expect for these settings ({', '.join(differ)} differ from the measured "
                f"demo's: {want['recipe']}, {want['ids']} ids x {want['images_per_id']} views, "
                f"{want['epochs']} epochs, no time budget)")
    fig, spread = spec["figures"], spec["spread"]
    line = (f"to expect (README, 'The demo run'): test text->image R@1 {fig['R1']:.2f}, mAP {fig['mAP']:.2f} "
            f"(seed {want['seed']}, {fig['threads']} torch thread(s)); another thread count or CPU rounds "
            f"differently and lands within about ±{2 * spread['R1_std']:.1f} R@1 ({spread['what']})")
    if settings["seed"] != want["seed"]:
        line += f"; --seed {settings['seed']} also changes the dataset"
    return line


def _check_args(args, recipe, job) -> None:
    """The demo's options, its output folder, the training job and the size of the dataset to be
    written, checked before any work."""
    import math
    from pathlib import Path

    from tbps.cli.common import UserError
    from tbps.engine.train import check_job
    from tbps.synth import planned_splits

    if args.ids < 3 or args.images_per_id < 1:
        raise UserError("--ids must be at least 3 (one per split) and --images-per-id at least 1")
    if args.minutes is not None and (not math.isfinite(args.minutes) or args.minutes <= 0):
        raise UserError(f"--minutes must be a finite number > 0, got {args.minutes}")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    if args.queries < 1:
        raise UserError(f"--queries must be at least 1, got {args.queries}")
    out = Path(args.out)
    for p in (out, out / "data", out / "run"):
        if p.exists() and not p.is_dir():
            raise UserError(f"--out {args.out}: {p} exists and is not a folder")
    if Path(job.out_dir).is_dir() and any(Path(job.out_dir).iterdir()) and not args.overwrite:
        raise UserError(f"{job.out_dir} holds the run of an earlier demo: pass --overwrite to replace it "
                        "(the dataset is reused), or another --out")
    check_job(job)
    if not (out / "data" / "reid_raw.json").exists():
        train_images = planned_splits(args.ids, args.images_per_id, args.seed)["train"]
        if 2 * train_images < recipe.data.batch_size:  # two captions per image
            raise UserError(f"--ids {args.ids} x --images-per-id {args.images_per_id} gives {2 * train_images} "
                            f"training pairs, fewer than one batch of {recipe.data.batch_size}: "
                            "use more identities or a smaller data.batch_size")
