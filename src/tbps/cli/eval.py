"""`tbps eval`: retrieval metrics of a checkpoint on a dataset split."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (R@1/5/10, mAP, mINP)",
        description="Evaluate a checkpoint on a split: text-to-image (the headline) and image-to-text "
        "R@1, R@5, R@10, mAP and mINP in percent. Metrics are computed in bounded memory.",
        epilog="examples:\n  tbps eval runs/cpu/best.pt --data data/synth\n"
        "  tbps eval runs/cuhk/best.pt --data /data/CUHK-PEDES --split test --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a .pt file from `tbps train`, or a run folder (uses best.pt)")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--layout", help="force a layout (see `tbps train --help`)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--strict", action="store_true", help="a missing or corrupt image is an error")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    import torch

    from tbps.data.layouts import load_annotations
    from tbps.engine.checkpoint import load_model
    from tbps.engine.evaluate import evaluate, format_table
    from tbps.models.factory import get_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, ckpt = load_model(args.checkpoint, device)
    ann = load_annotations(args.data, args.layout, strict=args.strict, progress=not args.json)
    records = ann.split(args.split)
    max_words = ckpt.get("recipe", {}).get("data", {}).get("max_words", 77)
    res = evaluate(model, get_tokenizer(model.spec), records, batch_size=args.batch_size, device=device,
                   max_words=max_words, progress=sys.stderr.isatty() and not args.json)
    if args.json:
        print(json.dumps(res.metrics))
    else:
        print(format_table(res.metrics, f"{ckpt['path']} on {args.data} [{args.split}]"))
    return 0
