"""Re-ranking: retrieval figures and cost per query of each method against none.

With checkpoints: evaluates each on --data and re-ranks the test similarity with every
method. With --synthetic Q G: times the re-ranks alone on random clustered features of
that size (e.g. CUHK-PEDES test: 6156 queries x 3074 images).

    python bench/rerank_cost.py --data /tmp/textreid-data800 run=/tmp/runs/minilm/best.pt
    python bench/rerank_cost.py --synthetic 6156 3074
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _args import named_path  # bench/_args.py


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", type=named_path, metavar="NAME=PATH", help="checkpoints, each named")
    ap.add_argument("--data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--synthetic", nargs=2, type=int, metavar=("Q", "G"))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    from tbps.retrieval.rerank import rerank, rerank_evaluation

    out: dict = {}
    if args.checkpoints:
        from tbps.data.layouts import load_annotations
        from tbps.engine.evaluate import evaluate
        from tbps.models.checkpoint import load_model
        from tbps.models.checkpoint import max_words as checkpoint_max_words
        from tbps.models.factory import get_tokenizer

        if not args.data:
            ap.error("checkpoints need --data")
        records = load_annotations(args.data, progress=False).split(args.split)
    for name, path in args.checkpoints:
        model, ckpt = load_model(path)
        res = evaluate(model, get_tokenizer(model.spec), records, progress=False,
                       max_words=checkpoint_max_words(ckpt))
        out[name] = {"none": {"t2i": res.metrics["t2i"], "seconds_per_query": 0.0}}
        for method in ("jaccard", "kreciprocal"):
            out[name][method] = rerank_evaluation(res, method)
        for method, r in out[name].items():
            print(f"{name:<14} {method:<12} R1 {r['t2i']['R1']:6.2f}  R5 {r['t2i']['R5']:6.2f}  "
                  f"mAP {r['t2i']['mAP']:6.2f}  mINP {r['t2i']['mINP']:6.2f}  "
                  f"{1000 * r['seconds_per_query']:.3f} ms/query", flush=True)
    if args.synthetic:
        q, g = args.synthetic
        gen = torch.Generator().manual_seed(0)
        centres = torch.randn((g + 2) // 3, 256, generator=gen)  # three images per identity
        gal = torch.nn.functional.normalize(centres.repeat_interleave(3, 0)[:g] + torch.randn(g, 256, generator=gen), dim=-1)
        qry = torch.nn.functional.normalize(centres[torch.randint(0, len(centres), (q,), generator=gen)]
                                            + 1.2 * torch.randn(q, 256, generator=gen), dim=-1)
        sim = qry @ gal.t()
        out["synthetic"] = {"queries": q, "gallery": g}
        for method in ("jaccard", "kreciprocal"):
            t0 = time.perf_counter()
            rerank(method, sim, gal)
            s = time.perf_counter() - t0
            out["synthetic"][method] = {"seconds": s, "ms_per_query": 1000 * s / q}
            print(f"synthetic {q}x{g} {method:<12} {s:7.2f} s total, {1000 * s / q:.3f} ms/query", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
