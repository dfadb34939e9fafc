"""Forked pairs evaluated as the ALBEF-style papers evaluate: the dual encoder's top K, re-scored by ITM.

LAIP's stage losses (BidirAtt, MPM) train the fusion encoder's phrase-level matching; the paper (like
RaSa and APTM, ``../shared/METHODS.md``) reports retrieval after re-scoring each query's top 128 by
the ITM head, where ``bench/forked_pairs.py`` reads the dual encoder's cosine ranking alone. This
takes the arms of finished forked pairs (``OUT/seed-S/ARM/best.pt``, each picked on val as
forked_pairs picked it) and evaluates each on test once, scores the ITM head on every query's top
``--kmax`` candidates once, and from those scores derives every re-scored ranking asked for (top K
for each K <= kmax, ITM alone as RaSa, or min-max ITM + w * min-max ITC as APTM): the top K of a
query are the first K of its top kmax, so one pass of the fusion encoder serves them all.

    python bench/rescore_pairs.py /tmp/fork/stem/d1=/tmp/d1 /tmp/fork/stem/d2=/tmp/d2 \\
        --arms staged base --ks 16 32 128 --weights 0.002 1.0 --json /tmp/rescore.json

Prints, per protocol, each arm's test text-to-image R@1 and mAP per seed, and each arm minus the base
arm paired by seed: per dataset and over all seeds, mean ± sample std. ``--report FILE`` reprints a
saved ``--json`` without evaluating.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import mean_std  # noqa: E402  (bench/seeds.py: the same statistics)


def protocols(ks: list[int], weights: list[float]) -> list[tuple[str, int, str, float]]:
    """(name, k, mode, weight) of every re-scored ranking, after the plain one."""
    out = []
    for k in ks:
        out.append((f"itm@{k}", k, "itm", 0.0))
        out += [(f"itm+{w:g}itc@{k}", k, "itm+itc", w) for w in weights]
    return out


def evaluate_arm(ckpt_path: Path, data: str, kmax: int, protos, device: str = "cpu") -> dict:
    """{protocol: t2i metrics} for one checkpoint, "plain" included, and the ITM pass's seconds."""
    import torch

    from tbps.engine.evaluate import evaluate_checkpoint
    from tbps.retrieval.metrics import retrieval_metrics
    from tbps.retrieval.rescore import FusionScorer, encode_tokens, load_fusion, rescore_topk

    ev = evaluate_checkpoint(ckpt_path, data, "test", device=device)
    res, model = ev.result, ev.model
    fusion = load_fusion(ev.checkpoint, model).to(device)
    t0 = time.perf_counter()
    words, mask, memory = encode_tokens(model, ev.tokenizer, res.captions, res.image_paths,
                                        max_words=ev.max_words, device=device)
    scorer = FusionScorer(fusion, words, mask, memory, device)
    sim = res.similarity.float()
    table = torch.full_like(sim, float("nan"))

    def scored(q, g):  # the fusion pass, each score kept for every ranking below
        out = scorer(q, g).float().cpu()
        table[q, g] = out
        return out

    rescore_topk(sim, scored, k=kmax)  # fills the table with each query's top kmax
    seconds = time.perf_counter() - t0

    def cached(q, g):  # the pass above, looked up; a pair outside it would be a NaN, and is refused
        out = table[q, g]
        if torch.isnan(out).any():
            raise RuntimeError("a re-scored candidate outside the cached top kmax (ties at the cut)")
        return out

    cap, img = torch.tensor(res.caption_ids), torch.tensor(res.image_ids)
    out = {"plain": res.metrics["t2i"]}
    for name, k, mode, w in protos:
        out[name] = retrieval_metrics(rescore_topk(sim, cached, k=k, mode=mode, weight=w), cap, img)
    return {"metrics": out, "itm_seconds": seconds, "pairs": int((~table.isnan()).sum())}


def report(results: dict, arms: list[str], names: list[str], base: str = "base") -> None:
    """Per protocol: each arm's R1 per seed, then arm minus base paired by seed."""
    for name in names:
        print(f"\n== {name}: test text-to-image R1 (mAP) per seed ==")
        for arm in arms:
            cells, r1 = [], []
            for root, seeds in results.items():
                for seed, by_arm in sorted(seeds.items()):
                    if arm in by_arm:
                        m = by_arm[arm]["metrics"][name]
                        cells.append(f"{Path(root).name}/s{seed} {m['R1']:.2f} ({m['mAP']:.2f})")
                        r1.append(m["R1"])
            if not r1:
                continue
            mu, sd = mean_std(r1)
            print(f"{arm:>14}: " + ", ".join(cells) + f"  | {mu:.2f} ± {sd:.2f}")
        for arm in arms:
            if arm == base:
                continue
            all_d, parts = [], []
            for root, seeds in results.items():
                d = [by[arm]["metrics"][name]["R1"] - by[base]["metrics"][name]["R1"]
                     for _, by in sorted(seeds.items()) if arm in by and base in by]
                if d:
                    mu, sd = mean_std(d)
                    parts.append(f"{Path(root).name} {mu:+.2f} ± {sd:.2f} ({', '.join(f'{x:+.2f}' for x in d)})")
                    all_d += d
            if all_d:
                mu, sd = mean_std(all_d)
                print(f"{arm + ' - ' + base:>22}: " + "; ".join(parts) + f"; all {len(all_d)}: {mu:+.2f} ± {sd:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="*", help="OUT=DATA: a forked_pairs output folder and the dataset it trained on")
    p.add_argument("--arms", nargs="+", default=["staged", "base"], help="arm folders to evaluate (base: the "
                   "arm the others are paired against)")
    p.add_argument("--kmax", type=int, default=128, help="candidates scored by ITM per query (default 128)")
    p.add_argument("--ks", type=int, nargs="+", default=[16, 32, 128], help="re-score depths, each <= --kmax")
    p.add_argument("--weights", type=float, nargs="*", default=[0.002, 1.0], help="w of the ITM + w * ITC rankings")
    p.add_argument("--json", help="write every figure here (and reuse the arms it already holds)")
    p.add_argument("--report", help="reprint a saved --json and stop")
    args = p.parse_args(argv)
    if "base" not in args.arms:
        p.error("--arms must include base (the arm the others are paired against)")
    if any(k > args.kmax or k < 1 for k in args.ks):
        p.error(f"--ks must lie in 1..--kmax ({args.kmax})")
    protos = protocols(args.ks, args.weights)
    names = ["plain"] + [n for n, *_ in protos]
    if args.report:
        report(json.loads(Path(args.report).read_text()), args.arms, names)
        return 0
    results: dict = {}
    if args.json and Path(args.json).exists():
        results = json.loads(Path(args.json).read_text())
    for spec in args.pairs:
        root, sep, data = spec.partition("=")
        if not sep:
            p.error(f"{spec!r}: give OUT=DATA")
        for seed_dir in sorted(Path(root).glob("seed-*")):
            seed = seed_dir.name.split("-", 1)[1]
            for arm in args.arms:
                ckpt = seed_dir / arm / "best.pt"
                done = results.get(root, {}).get(seed, {}).get(arm)
                if done is not None or not ckpt.exists():
                    continue
                t0 = time.perf_counter()
                r = evaluate_arm(ckpt, data, args.kmax, protos)
                results.setdefault(root, {}).setdefault(seed, {})[arm] = r
                print(f"{seed_dir}/{arm}: plain R1 {r['metrics']['plain']['R1']:.2f}, "
                      f"itm@{max(args.ks)} {r['metrics'][f'itm@{max(args.ks)}']['R1']:.2f} "
                      f"({time.perf_counter() - t0:.0f} s, ITM pass {r['itm_seconds']:.0f} s)", flush=True)
                if args.json:
                    from tbps.files import write_json

                    write_json(args.json, results)
    report(results, args.arms, names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
