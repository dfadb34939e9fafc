"""How big each loss's gradient is at a stage switch, against the optimiser state the run carries there.

A staged recipe switches losses on mid-run. AdamW divides each gradient by the square root of its
second-moment estimate, which (beta2 0.999) follows the gradients of the last ~1,000 steps: a loss
whose gradients are k times the earlier ones is stepped about k times too far until the estimate
catches up. This bench loads a run's ``last.pt`` (weights, objective state and AdamW moments: a base
stage's run is the state a switch meets), puts every loss of RECIPE on, and prints for each loss over a
few training batches: its value, the norm of its gradient on the model's parameters, and the norm of
that gradient divided elementwise by sqrt(v_hat) + eps (the step AdamW would take per unit of lr
before its moments adapt) over the parameter entries the moments already know (v > 0); entries the
base stage never trained (v = 0: a word only a new loss uses) are counted apart, since AdamW's first
step there is lr-sized whatever the gradient.

    python bench/switch_grads.py runs/p3/laip-cpu-w0-base/seed-1/last.pt laip-cpu --data data/abl
    python bench/switch_grads.py RUN/last.pt irra-cpu --data data/abl --batches 4 data.num_workers=0

Compare each new loss's normalised norm with the base losses': a ratio far above 1 is what
``fresh_optimizer: true`` on the stage is for (tbps/recipes/stages.py). ``--top K`` also lists, per loss,
the K model parameters its normalised gradient is largest on (which weights a new loss pushes hardest; like
the norms above, the model's parameters only, not the objective's own, as a fusion encoder).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run's last.pt (it holds the AdamW moments)")
    p.add_argument("recipe", help="the recipe whose losses (its `losses:` section, every stage's loss on) to measure")
    p.add_argument("--data", required=True, help="the dataset the run trained on")
    p.add_argument("--batches", type=int, default=4, help="training batches to average over (default 4)")
    p.add_argument("--top", type=int, default=0, help="also list each loss's K parameters with the largest "
                   "|g/sqrt(v)| (default 0: none)")
    p.add_argument("overrides", nargs="*", help="recipe KEY=VALUE overrides (as the run had them)")
    a = p.parse_intermixed_args(argv)

    import torch
    from _parts import training_parts

    from tbps.data.layouts import load_annotations
    from tbps.engine.optim import build_optimizer
    from tbps.models.checkpoint import CheckpointError, load_checkpoint
    from tbps.objectives import StepContext
    from tbps.recipes.config import ConfigError, load_recipe

    try:
        ckpt = load_checkpoint(a.checkpoint)
        recipe = load_recipe(a.recipe, [*a.overrides, "stages=[]"])  # the recipe's losses section: all on
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "optimizer" not in ckpt:
        print(f"{a.checkpoint}: no optimiser state (a best.pt or an export): give the run's last.pt", file=sys.stderr)
        return 2
    records = load_annotations(a.data).split("train")
    parts = training_parts(recipe, records, recipe.losses)
    model, ds, objective, collate = parts.model, parts.dataset, parts.objective, parts.collate
    model.load_state_dict(ckpt["model"])
    objective.load_state_dict(ckpt["objective"])
    optimizer = build_optimizer({"model": model, "objective": objective}, recipe.optim)
    optimizer.load_state_dict(ckpt["optimizer"])
    objective.on_epoch_start(model, ds, epoch=int(ckpt["epoch"]), device="cpu")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    betas = optimizer.param_groups[0].get("betas", (0.9, 0.999))

    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    bs = recipe.data.batch_size
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    per_param: dict[str, dict[str, float]] = {}  # loss -> parameter -> sum over batches of |g/sqrt(v)|^2
    for b in range(a.batches):
        batch = collate(ds.__getitems__([int(i) for i in order[b * bs:(b + 1) * bs]]))  # as a DataLoader asks
        out = objective(model, batch, StepContext(float(ckpt["epoch"]), 1, 0))
        for name, value in out.items():
            if not name.endswith("_loss"):
                continue
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            raw = known = fresh = 0.0
            for n, p, g in zip(names, params, grads):
                if g is None:
                    continue
                raw += float(g.pow(2).sum())
                st = optimizer.state.get(p)
                if not st:
                    fresh += float(g.pow(2).sum())
                    continue
                v = st["exp_avg_sq"] / (1 - betas[1] ** float(st["step"]))
                seen = v > 0
                sq = float((g[seen] / (v[seen].sqrt() + 1e-8)).pow(2).sum())
                known += sq
                mine = per_param.setdefault(name, {})
                mine[n] = mine.get(n, 0.0) + sq
                fresh += float(g[~seen].pow(2).sum())
            rows.setdefault(name, []).append((float(value.detach()), raw ** 0.5, known ** 0.5, fresh ** 0.5))
    print(f"{a.checkpoint} (step {ckpt['global_step']}), {a.recipe}, {a.batches} batches of {bs}, means:")
    print(f"{'loss':16s} {'value':>8s} {'|g|':>9s} {'|g/sqrt(v)|':>12s} {'|g| where v=0':>14s}")
    for name, r in rows.items():
        m = [sum(x[i] for x in r) / len(r) for i in range(4)]
        print(f"{name:16s} {m[0]:8.3f} {m[1]:9.3f} {m[2]:12.1f} {m[3]:14.3f}")
    if a.top > 0:
        for name, table in per_param.items():
            top = sorted(table.items(), key=lambda kv: -kv[1])[:a.top]
            print(f"{name}: " + ", ".join(f"{n} {(v / a.batches) ** 0.5:.1f}" for n, v in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
