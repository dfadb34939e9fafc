"""`tbps synth`: write a procedural synthetic pedestrian dataset (CUHK-PEDES layout)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic pedestrian dataset (CUHK-PEDES layout)",
        description="Write a procedural synthetic pedestrian dataset in the CUHK-PEDES layout "
        "(OUT/imgs/..., OUT/reid_raw.json): identities with fine-grained attributes, several camera "
        "views each, two human-like captions per image, split by identity into train/val/test.",
        epilog="example: tbps synth data/synth --ids 600 --images-per-id 4 --seed 0",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--ids", type=int, default=300, help="number of identities")
    p.add_argument("--images-per-id", type=int, default=4, help="camera views per identity")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    p.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"), help="image size")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tbps.cli.common import UserError
    from tbps.synth import synthesize

    if args.ids < 3 or args.images_per_id < 1:
        raise UserError("--ids must be at least 3 (one per split) and --images-per-id at least 1")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 or more (0 or 1: in this process), got {args.workers}")
    stats = synthesize(args.out, ids=args.ids, images_per_id=args.images_per_id, seed=args.seed,
                       image_size=tuple(args.size), workers=args.workers)
    print(_summary(stats))
    return 0


def _summary(stats: dict) -> str:
    parts = [f"{k}: {v}" for k, v in stats.items() if not isinstance(v, (dict, list))]
    for k, v in stats.items():
        if isinstance(v, dict):
            parts.append(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items()))
    return "\n".join(parts)
