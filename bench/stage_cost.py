"""What each stage of a staged recipe costs per training step, and so how many steps a time budget gives it.

A staged recipe (``stages:``, tbps/recipes/stages.py) switches losses on part-way through a run; a
stage whose losses need more passes (IRRA's MLM, LAIP's phrase stream, MeFa's paths) costs more per
step, so under a wall-clock budget the staged run gets fewer steps than its base stage alone would.
This bench builds the recipe's model and objective once per segment of the run (the losses in force
between two stage boundaries), takes the same few training batches for all, and times full training
steps (objective forward, backward, AdamW step) segment after segment in rounds, so that every
segment is measured under the same load. The batches are built once, untimed; the data pipeline's
cost per batch (dataset + collate, with each segment's batch hook) is timed apart, and so is the
objective's work at an epoch's start (MeFa's image-bank refresh), spread over the epoch's steps.

Prints each segment's median step time, its ratio to the first segment's, and the share of the base
stage's steps that a time budget gives the staged run: sum over segments of (its fraction of the run)
x (first segment's step time / its step time), with the epoch-start work and, where the recipe loads in
the training process (``data.num_workers: 0``; workers overlap it), the data time added to the step's.
The validation passes a run makes are the same in every segment and are left out.

    python bench/stage_cost.py laip-cpu --data data/abl
    python bench/stage_cost.py irra-cpu --data data/abl --steps 12 losses.mlm.prob=0.3
    python bench/stage_cost.py mefa-cpu --data data/abl optim.fused=true train.attention=math

Run it on an otherwise idle machine: it is a timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a staged recipe (its stages: list)")
    p.add_argument("--data", required=True, help="a dataset folder (tbps synth makes one)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per segment (default 8), after 2 untimed")
    p.add_argument("--batches", type=int, default=4, help="distinct training batches to cycle through (default 4)")
    p.add_argument("overrides", nargs="*", help="recipe KEY=VALUE overrides")
    a = p.parse_intermixed_args(argv)

    import torch
    from _parts import training_parts

    from tbps.data.layouts import load_annotations
    from tbps.engine.epoch import attention_kernel
    from tbps.engine.optim import build_optimizer
    from tbps.objectives import StepContext
    from tbps.objectives.base import merge_losses
    from tbps.recipes.config import ConfigError, load_recipe
    from tbps.recipes.stages import segment

    try:
        recipe = load_recipe(a.recipe, a.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not recipe.stages:
        print(f"error: {a.recipe} has no stages: nothing to compare", file=sys.stderr)
        return 2
    total = float(recipe.train.epochs)
    segments, pos = [], 0.0  # (start, end) in epochs
    while pos < total:
        lo, hi = segment(recipe.stages, pos, total)
        segments.append((lo, hi))
        pos = hi
    if recipe.train.cpu_threads:
        torch.set_num_threads(recipe.train.cpu_threads)
    records = load_annotations(a.data).split("train")
    arms = []
    for lo, hi in segments:
        losses = recipe.losses_at(lo, total)
        parts = training_parts(recipe, records, losses)
        model, ds, objective, collate = parts.model, parts.dataset, parts.objective, parts.collate
        t0 = time.perf_counter()
        objective.on_epoch_start(model, ds, epoch=int(lo), device="cpu")  # e.g. MeFa's image bank refresh
        epoch_s = time.perf_counter() - t0
        optimizer = build_optimizer({"model": model, "objective": objective}, recipe.optim)
        bs = recipe.data.batch_size
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        if len(order) < bs * a.batches:
            print(f"error: {a.data} has {len(order)} training pairs, fewer than {a.batches} batches of {bs}",
                  file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        batches = [collate(ds.__getitems__(order[b * bs:(b + 1) * bs])) for b in range(a.batches)]  # as a DataLoader asks
        data_s = (time.perf_counter() - t0) / a.batches
        merged = merge_losses(objective.defaults, losses)
        on = sorted(k for k, v in merged.items() if isinstance(v, dict) and v.get("weight", 0) > 0)
        arms.append({"span": (lo / total, hi / total), "losses": on, "model": model, "objective": objective,
                     "optimizer": optimizer, "batches": batches, "data_s": data_s,
                     "epoch_s": epoch_s / max(1, len(ds) // bs), "times": []})

    for r in range(a.steps + 2):
        for arm in arms:
            model, objective, optimizer = arm["model"], arm["objective"], arm["optimizer"]
            batch = arm["batches"][r % a.batches]
            t = time.perf_counter()
            with attention_kernel(recipe.train.attention):  # as the trainer runs a step
                out = objective(model, batch, StepContext(arm["span"][0] * total, 1, r))
                loss = sum(v for k, v in out.items() if k.endswith("_loss"))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            if r >= 2:
                arm["times"].append(time.perf_counter() - t)

    serial = recipe.data.num_workers == 0  # the batch is made between the steps, not beside them

    def cost(arm: dict, step: float) -> float:
        return step + serial * arm["data_s"] + arm["epoch_s"]

    first = cost(arms[0], statistics.median(arms[0]["times"]))
    share = 0.0
    print(f"{a.recipe}: {len(segments)} segments, batch {recipe.data.batch_size}, {a.steps} timed steps each, "
          f"{torch.get_num_threads()} threads")
    print(f"{'segment':>12s} {'step ms':>8s} {'data ms':>8s} {'epoch ms':>8s} {'x first':>8s}  losses on")
    for arm in arms:
        step = statistics.median(arm["times"])
        ratio = cost(arm, step) / first
        lo, hi = arm["span"]
        share += (hi - lo) / ratio
        print(f"{lo:5.2f}-{hi:<5.2f} {step * 1000:8.1f} {arm['data_s'] * 1000:8.1f} {arm['epoch_s'] * 1000:8.1f} "
              f"{ratio:8.2f}  {', '.join(arm['losses'])}")
    print(f"a time budget gives the staged run {share:.3f} of the steps its first segment alone would get")
    return 0


if __name__ == "__main__":
    sys.exit(main())
