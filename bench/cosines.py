"""Where checkpoints' text-image cosines lie, against a margin loss's absolute targets.

TextReID's alignment loss (``tbps/losses/alignment.py``) pulls every same-identity cosine above
``m_p`` = 0.6 (scale ``a_p`` = 10) and pushes every other one below ``m_n`` = 0.4 (scale ``a_n`` = 40):
targets on the cosine itself, not on a ranking. Whether it mostly lifts positives or mostly pushes
negatives down depends on where a model's cosines already are. For each checkpoint this prints, over
every caption of a split against every image (positives: same identity), the quantiles of the
positive and the negative cosines, the share of each on the wrong side of its margin, and the loss's
gradient on the cosines, d/ds softplus(-a_p (s - m_p)) = -a_p sigmoid(-a_p (s - m_p)) on a positive and
a_n sigmoid(a_n (s - m_n)) on a negative: its mean magnitude per pair and the share of a P x K
training batch's total that the negatives hold (a batch of P ids x K images with one caption each has
P K^2 positive pairs of its B^2).

    python bench/ablation.py --set textreid --data data/abl --out runs/abl --base-epochs 8 --epochs 1 --seeds 0
    python bench/cosines.py base=runs/abl/base-KEY/best.pt cmmoco=runs/abl/textreid-cmmoco/seed-0/best.pt \\
        align=runs/abl/textreid-cmmoco-align/seed-0/best.pt --data data/abl --split val

The table is Markdown; the gradient columns are mean |dL/ds| per pair.
"""

from __future__ import annotations

import argparse
import sys

from _args import named_path  # bench/_args.py

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def cosine_stats(sim, qids, gids, *, margin_pos: float, margin_neg: float, scale_pos: float, scale_neg: float,
                 ids: int, k: int) -> dict:
    """sim (Q, G) cosines, qids (Q,), gids (G,) -> the statistics the table prints (floats)."""
    import torch

    pos_mask = qids[:, None] == gids[None, :]
    pos, neg = sim[pos_mask].double(), sim[~pos_mask].double()
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    neg_q = neg  # a fixed random subsample keeps torch.quantile within its input limit on large galleries
    if neg.numel() > 4_000_000:
        neg_q = neg[torch.randint(neg.numel(), (4_000_000,), generator=torch.Generator().manual_seed(0))]
    g_pos = scale_pos * torch.sigmoid(-scale_pos * (pos - margin_pos))  # |dL/ds| per positive pair
    g_neg = scale_neg * torch.sigmoid(scale_neg * (neg - margin_neg))  # per negative pair
    n_pos = ids * k * k
    n_neg = (ids * k) ** 2 - n_pos
    mass_pos, mass_neg = n_pos * g_pos.mean().item(), n_neg * g_neg.mean().item()
    return {
        "pos_q": torch.quantile(pos, q).tolist(), "neg_q": torch.quantile(neg_q, q).tolist(),
        "pos_below": (pos < margin_pos).double().mean().item(), "neg_above": (neg > margin_neg).double().mean().item(),
        "grad_pos": g_pos.mean().item(), "grad_neg": g_neg.mean().item(),
        "neg_share": mass_neg / (mass_pos + mass_neg),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("checkpoints", nargs="+", type=named_path, metavar="NAME=PATH",
                   help="checkpoints (or run folders), each named")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", default="val", help="split to measure on (default val)")
    p.add_argument("--margins", type=float, nargs=2, metavar=("M_POS", "M_NEG"),
                   help="the loss's margins (default: the textreid objective's, 0.6 0.4)")
    p.add_argument("--scales", type=float, nargs=2, metavar=("A_POS", "A_NEG"),
                   help="the loss's scales (default: the textreid objective's, 10 40)")
    p.add_argument("--batch", type=int, nargs=2, default=(16, 4), metavar=("P", "K"),
                   help="the training batch's identities and images per identity (default 16 4)")
    a = p.parse_intermixed_args(argv)

    import torch

    from tbps.data.records import DataError
    from tbps.engine.evaluate import evaluate_checkpoint
    from tbps.objectives.textreid import DEFAULTS

    align = DEFAULTS["align"]
    mp, mn = a.margins or (align["margin_pos"], align["margin_neg"])
    ap, an = a.scales or (align["scale_pos"], align["scale_neg"])
    ids, k = a.batch
    head = (["checkpoint", "R1"] + [f"{side} q{int(q * 100)}" for side in ("pos", "neg") for q in QUANTILES]
            + [f"pos < {mp}", f"neg > {mn}", "grad per pos", "grad per neg", "negatives' share of a batch's grad"])
    print(f"{a.split} split, every caption against every image; margins {mp} / {mn}, scales {ap} / {an}, "
          f"batch {ids} x {k}")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, path in a.checkpoints:
        try:
            ev = evaluate_checkpoint(path, a.data, a.split)
        except (DataError, OSError, ValueError) as e:  # CheckpointError and the other tbps errors are ValueErrors
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        r = ev.result
        s = cosine_stats(r.similarity, torch.tensor(r.caption_ids), torch.tensor(r.image_ids), margin_pos=mp,
                         margin_neg=mn, scale_pos=ap, scale_neg=an, ids=ids, k=k)
        cells = ([name, f"{r.metrics['t2i']['R1']:.2f}"] + [f"{x:.3f}" for x in s["pos_q"]]
                 + [f"{x:.3f}" for x in s["neg_q"]]
                 + [f"{s['pos_below']:.3f}", f"{s['neg_above']:.4f}", f"{s['grad_pos']:.3f}", f"{s['grad_neg']:.4f}",
                    f"{s['neg_share']:.3f}"])
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
