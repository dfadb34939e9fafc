"""Per-image (and per-caption) CPU time of PyTorch vs onnxruntime for an exported tbps model.

    PYTHONPATH=src python bench/onnx_speed.py [--arch tiny-vit] [--batch 32] [--repeats 5] [--threads 2]

Writes a random-weight checkpoint of ``--arch`` (or takes ``--checkpoint``), exports it with
``tbps.retrieval.export.export_onnx`` into a temporary folder, then times both runtimes side by
side in this one process on the same inputs, alternating them each repeat (a shared machine's
noise hits both alike), and prints the median ms per image / caption, the ratio and the largest
feature difference. Figures are only comparable as ratios within one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny-vit")
    p.add_argument("--checkpoint", help="an existing tbps checkpoint instead of random weights")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    from tbps.retrieval.encoder import Encoder, create_untrained_checkpoint, tokenize_captions
    from tbps.retrieval.export import export_onnx

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or create_untrained_checkpoint(Path(tmp) / "best.pt", arch=args.arch)
        export_onnx(ckpt, Path(tmp) / "onnx", check=False)
        enc = Encoder.from_checkpoint(ckpt)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = {k: ort.InferenceSession(str(Path(tmp) / "onnx" / f"{k}_encoder.onnx"), opts,
                                        providers=["CPUExecutionProvider"]) for k in ("image", "text")}
        pixels = torch.randn(args.batch, 3, *enc.image_size)
        captions = [f"a person number {i} in a red coat with a black bag and white shoes" for i in range(args.batch)]
        tokens = tokenize_captions(enc.tokenizer, captions, enc.max_words)
        runs = {
            "image": (lambda: enc.encode_images(pixels), lambda: sess["image"].run(None, {"pixels": pixels.numpy()})[0]),
            "text": (lambda: text_torch(enc, tokens), lambda: sess["text"].run(None, {"tokens": tokens.numpy()})[0]),
        }
        print(f"{args.checkpoint or args.arch}: batch {args.batch}, {args.repeats} repeats, {args.threads} threads, "
              f"image {enc.image_size}, context {enc.model.context_length}")
        print(f"{'encoder':8} {'pytorch ms/item':>16} {'onnxruntime ms/item':>20} {'torch/ort':>10} {'max|diff|':>10}")
        for name, (pt, ox) in runs.items():
            diff = float(np.abs(pt() - ox()).max())  # also the warm-up
            t_pt, t_ox = [], []
            for _ in range(args.repeats):
                t_pt.append(_timed(pt))
                t_ox.append(_timed(ox))
            a, b = statistics.median(t_pt) / args.batch * 1e3, statistics.median(t_ox) / args.batch * 1e3
            print(f"{name:8} {a:16.3f} {b:20.3f} {a / b:10.2f} {diff:10.1e}")


def text_torch(enc, tokens):
    """PyTorch's text features of already tokenised captions (the graph's input), as numpy."""
    import torch

    from tbps.retrieval.encoder import text_features

    with torch.no_grad():
        return text_features(enc.model, tokens).numpy()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
