"""`tbps export`: a checkpoint for deployment (ONNX graphs of both encoders, or safetensors weights)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint: ONNX encoders for embedding without PyTorch, or .safetensors weights",
        description="Export a tbps checkpoint (a .pt/.safetensors file or a run folder, which uses its best).\n\n"
        "  onnx CHECKPOINT OUTDIR         image_encoder.onnx and text_encoder.onnx (dynamic batch; L2-normalised\n"
        "                                 float32 features, as the index stores), preprocess.json (image size,\n"
        "                                 resize, mean/std, caption cleaning, tokenizer, context length) and CLIP's\n"
        "                                 BPE vocabulary. Both graphs are checked against PyTorch in onnxruntime\n"
        "                                 (the [deploy] extra) when it is installed. CLIP text towers only.\n"
        "  safetensors CHECKPOINT OUT     the checkpoint as OUT.safetensors (no pickle), without its resume-only\n"
        "                                 state (optimiser, RNG): it works wherever a .pt does (eval, index build,\n"
        "                                 search, serve, train --init).",
        epilog="examples:\n  tbps export onnx runs/cpu/best.pt deploy/\n"
        "  tbps export safetensors runs/cpu runs/cpu/best.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("format", choices=["onnx", "safetensors"], help="what to write")
    p.add_argument("checkpoint", help="a tbps checkpoint (.pt or .safetensors) or a run folder")
    p.add_argument("out", help="onnx: the output folder; safetensors: the output file (*.safetensors)")
    p.add_argument("--no-check", action="store_true", help="onnx: skip the onnxruntime comparison with PyTorch")
    p.set_defaults(func=run)


def run(args) -> int:
    import pathlib

    from tbps.cli.common import UserError

    if args.format == "safetensors":
        from tbps.retrieval.export import export_safetensors

        out = export_safetensors(args.checkpoint, args.out)
        print(f"wrote {out}")
        return 0
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (onnx writes a folder)")
    from tbps.retrieval.export import export_onnx

    settings = export_onnx(args.checkpoint, out, check=not args.no_check)
    diff = settings.get("check_max_abs_diff")
    checked = ("not checked (onnxruntime not installed: pip install 'tbps[deploy]')" if diff is None and not
               args.no_check else "not checked" if diff is None else f"onnxruntime vs PyTorch max |diff| {diff:.1e}")
    print(f"wrote {out}/: image_encoder.onnx, text_encoder.onnx, preprocess.json ({checked})")
    return 0
