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
    python bench/stage_cost.py laip-cpu --data data/abl --modules model.clip.visual.transformer,\
    model.clip.transformer,objective.fusion,objective.momentum.module.clip.visual,objective.momentum.module.clip.transformer

``--modules`` adds, per segment, the forward time of each named submodule per timed step (paths from
``model`` or ``objective``, comma-separated; a module the step never calls through ``__call__`` reads
0 calls: LAIP's image tower is run block by block, so name its ``transformer``). Its backward is not split off:
the step's forward and backward totals are printed beside it.

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
    p.add_argument("--modules", type=lambda v: [m for m in v.split(",") if m], default=[], metavar="PATH,...",
                   help="submodules whose forward time per step to report, comma-separated, e.g. "
                        "objective.fusion,model.clip.transformer")
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
        try:
            timers = {path: ModuleTimer(_submodule({"model": model, "objective": objective}, path))
                      for path in a.modules}
        except LookupError as e:
            print(f"error: --modules: {e}", file=sys.stderr)
            return 2
        arms.append({"span": (lo / total, hi / total), "losses": on, "model": model, "objective": objective,
                     "optimizer": optimizer, "batches": batches, "data_s": data_s,
                     "epoch_s": epoch_s / max(1, len(ds) // bs), "times": [], "fwd": [], "timers": timers})

    for r in range(a.steps + 2):
        for arm in arms:
            model, objective, optimizer = arm["model"], arm["objective"], arm["optimizer"]
            batch = arm["batches"][r % a.batches]
            for timer in arm["timers"].values():
                timer.on = r >= 2
            t = time.perf_counter()
            with attention_kernel(recipe.train.attention):  # as the trainer runs a step
                out = objective(model, batch, StepContext(arm["span"][0] * total, 1, r))
                loss = sum(v for k, v in out.items() if k.endswith("_loss"))
                fwd = time.perf_counter() - t
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            if r >= 2:
                arm["times"].append(time.perf_counter() - t)
                arm["fwd"].append(fwd)

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
    if a.modules:
        print("forward ms per step (median step: forward + backward and AdamW)")
        width = max(len(m) for m in a.modules)
        for arm in arms:
            lo, hi = arm["span"]
            step, fwd = statistics.median(arm["times"]), statistics.median(arm["fwd"])
            print(f"{lo:5.2f}-{hi:<5.2f} step {step * 1000:.1f} = forward {fwd * 1000:.1f} + {(step - fwd) * 1000:.1f}")
            for path, timer in arm["timers"].items():
                print(f"    {path:<{width}s} {timer.seconds / a.steps * 1000:8.1f} ms  ({timer.calls / a.steps:g} calls)")
    return 0


class ModuleTimer:
    """Wall time spent in a module's forward calls while ``on`` (hooks; calls nested in it count once)."""

    def __init__(self, module) -> None:
        self.on, self.seconds, self.calls, self._depth, self._t = False, 0.0, 0, 0, 0.0
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._leave)

    def _enter(self, module, args) -> None:
        self._depth += 1
        if self._depth == 1:
            self._t = time.perf_counter()

    def _leave(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0 and self.on:
            self.seconds += time.perf_counter() - self._t
            self.calls += 1


def _submodule(roots: dict, path: str):
    """``model.clip.visual`` -> that module; LookupError naming what is missing."""
    head, _, rest = path.partition(".")
    if head not in roots:
        raise LookupError(f"{path!r} does not start with one of {sorted(roots)}")
    try:
        return roots[head].get_submodule(rest)  # "" is the root itself
    except AttributeError as e:
        raise LookupError(f"{path!r}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
