"""Per-step cost of N-ITC's soft targets: this pass's similarities (same_pass) against TBPS-CLIP's second
no-grad forward pass (second_pass), side by side in one process on the tiny CPU model.

    python bench/nitc_soft_targets.py [--recipe tbps-clip-cpu] [--batch 32] [--steps 6] [--threads 1]

Steps of the two modes alternate (so machine load hits both alike); prints the median seconds per
optimiser step of each and their ratio. Random images and tokens, the recipe's model and losses.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tbps-clip-cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from tbps.engine.optim import build_optimizer
    from tbps.models.factory import create_model
    from tbps.objectives import StepContext, build_objective
    from tbps.recipes.config import load_recipe

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, ["model.text_attn_dropout=0.05"])  # dropout, so the passes differ
    torch.manual_seed(0)
    model = create_model(recipe.model).train()
    h, w = model.image_size
    batch = {"image": torch.randn(args.batch, 3, h, w), "pid": torch.arange(args.batch) // 2,
             "tokens": torch.randint(1, 400, (args.batch, model.context_length))}
    objs = {m: build_objective(recipe.objective, model, {**recipe.losses, "nitc": {**recipe.losses.get("nitc", {}),
                                                                                  "soft_targets": m}},
                               num_identities=args.batch // 2) for m in ("same_pass", "second_pass")}
    opt = build_optimizer({"model": model}, recipe.optim)
    times: dict[str, list[float]] = {m: [] for m in objs}
    for i in range(args.steps + 1):
        for mode, obj in objs.items():
            t0 = time.perf_counter()
            out = obj(model, batch, StepContext(epoch=1.5, total_epochs=2, step=i))
            opt.zero_grad()
            sum(v for k, v in out.items() if k.endswith("_loss")).backward()
            opt.step()
            if i:  # the first round warms up
                times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"{args.recipe}, batch {args.batch}, {args.threads} thread(s), median of {args.steps} steps each")
    for m, t in med.items():
        print(f"  {m:<12} {t:.3f} s/step")
    print(f"  second_pass / same_pass = {med['second_pass'] / med['same_pass']:.2f}")


if __name__ == "__main__":
    main()
