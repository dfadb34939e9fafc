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
        "  tbps eval runs/cuhk/best.pt --data /data/CUHK-PEDES --split test --json\n"
        "  tbps eval runs/cpu/best.pt --data data/synth --tta flip   # gallery averaged with its mirror images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a .pt file from `tbps train`, or a run folder (uses best.pt)")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--layout", help="force a layout (see `tbps train --help`)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=int, default=256, help="images or captions encoded at once (default 256)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--strict", action="store_true", help="a missing or corrupt image is an error")
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="flip: average each gallery image's features with its mirror image's (as `tbps index build "
                   "--tta flip`); twice the image encoding; never what training validates with (default: none)")
    p.add_argument("--rescore", type=int, metavar="K", default=0,
                   help="re-score each query's top K images with the fusion encoder's ITM head "
                   "(checkpoints of the laip/irra recipes; 128 in RaSa/APTM); prints both tables and the cost per query")
    p.add_argument("--rescore-mode", choices=["itm", "itm+itc"], default="itm",
                   help="rank candidates by ITM alone (RaSa) or ITM + w * ITC after min-max (APTM)")
    p.add_argument("--rescore-weight", type=float, default=0.002, help="w of --rescore-mode itm+itc")
    # the names of tbps.retrieval.rerank.METHODS, written out to keep torch out of `tbps --help`
    p.add_argument("--rerank", default="none", choices=["none", "jaccard", "kreciprocal"],
                   help="also report text->image after re-ranking: jaccard (TextReID's neighbour Jaccard, k=5, "
                   "alpha=0.05) or kreciprocal (cross-modal k-reciprocal, k1=20, k2=6, lambda=0.3); "
                   "prints both tables and the cost per query")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    from tbps.engine.evaluate import evaluate_checkpoint, format_table

    device = _check_args(args)
    ev = evaluate_checkpoint(args.checkpoint, args.data, args.split, layout=args.layout, strict=args.strict,
                             batch_size=args.batch_size, device=device,
                             progress=sys.stderr.isatty() and not args.json, load_progress=not args.json,
                             image_tta=args.tta)
    res, model, ckpt, max_words = ev.result, ev.model, ev.checkpoint, ev.max_words
    rescored = None
    if args.rescore:
        from tbps.retrieval.rescore import load_fusion, rescore_evaluation

        rescored = rescore_evaluation(model, load_fusion(ckpt, model), ev.tokenizer, res,
                                      k=args.rescore, mode=args.rescore_mode, weight=args.rescore_weight,
                                      max_words=max_words, device=device)
    reranked = None
    if getattr(args, "rerank", "none") != "none":
        from tbps.retrieval.rerank import rerank_evaluation

        reranked = rerank_evaluation(res, args.rerank)
    if args.json:
        out = dict(res.metrics) if args.tta == "none" else {**res.metrics, "image_tta": args.tta}
        out = out if rescored is None else {**out, "rescored": rescored}
        print(json.dumps(out if reranked is None else {**out, "reranked": reranked}))
    else:
        tta = "" if args.tta == "none" else f", gallery averaged with its mirror images (--tta {args.tta})"
        print(format_table(res.metrics, f"{ckpt['path']} on {args.data} [{args.split}]{tta}"))
        if rescored is not None:
            print(format_table({"t2i": rescored["t2i"], "queries": res.metrics["queries"],
                                "gallery": res.metrics["gallery"]},
                               f"re-scored: top {rescored['k']} by {rescored['mode']}, "
                               f"{1000 * rescored['seconds_per_query']:.2f} ms per query"))
        if reranked is not None:
            print(format_table({"t2i": reranked["t2i"], "queries": res.metrics["queries"],
                                "gallery": res.metrics["gallery"]},
                               f"re-ranked: {reranked['method']}, {1000 * reranked['seconds_per_query']:.3f} ms per query"))
    return 0


def _check_args(args) -> str:
    """Every option checked before the model loads; returns the device."""
    import math
    from pathlib import Path

    from tbps.cli.common import UserError, check_device

    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.rescore < 0:
        raise UserError(f"--rescore must be a positive integer (0: off), got {args.rescore}")
    if not math.isfinite(args.rescore_weight) or args.rescore_weight < 0:
        raise UserError(f"--rescore-weight must be a finite number >= 0, got {args.rescore_weight}")
    if not Path(args.checkpoint).exists():
        raise UserError(f"{args.checkpoint}: no such checkpoint")
    if not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: no such dataset folder")
    return check_device(args.device, None)
