"""What gradient caching costs per step: plain vs ``train.grad_cache_chunk`` side by side.

One training step (forward, backward; no optimiser step) of a recipe's objective on a random batch,
timed plain and cached with several chunk sizes, interleaved round by round so that both see the
same machine load. Reports the median over rounds of this process's CPU time per step (one torch
thread: stable on a shared machine) and of wall time, and the ratio to the plain step. The extra
cost of caching is a second encoder forward per chunk (the replay); the loss-side work is done once.

    python bench/gradcache_cost.py                                  # tbps-clip-cpu, batch 64, chunks 32 16 8
    python bench/gradcache_cost.py --recipe tbps-clip-cpu --batch 64 --chunks 32 16 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def make_step(recipe_name: str, overrides: list[str], batch_size: int, chunk: int):
    """A closure that runs one forward+backward (plain when chunk is 0) and a fresh batch."""
    import torch

    from tbps.engine import gradcache
    from tbps.models import create_model, get_tokenizer
    from tbps.objectives import StepContext, build_objective
    from tbps.recipes.config import load_recipe

    recipe = load_recipe(recipe_name, overrides)
    torch.manual_seed(0)
    model = create_model(recipe.model)
    objective = build_objective(recipe.objective, model, recipe.losses, num_identities=batch_size // 2)
    model.train()
    h, w = model.image_size
    g = torch.Generator().manual_seed(0)
    caps = [f"a person in a {c} coat with {b} shoes" for c, b in
            zip(["red", "blue", "green", "black"] * batch_size, ["white", "grey", "brown"] * batch_size)][:batch_size]
    batch = {"image": torch.randn(batch_size, 3, h, w, generator=g), "tokens": get_tokenizer(model.spec)(caps),
             "pid": torch.arange(batch_size) // 2, "captions": caps}
    ctx = StepContext(epoch=1.0, total_epochs=5, step=0)

    def step() -> None:
        for p in list(model.parameters()) + list(objective.parameters()):
            p.grad = None
        if chunk:
            gradcache.forward_backward(objective, model, batch, ctx, chunk)
        else:
            out = objective(model, batch, ctx)
            sum(v for k, v in out.items() if k.endswith("_loss")).backward()

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tbps-clip-cpu")
    p.add_argument("--batch", type=int, default=64, help="pairs per step")
    p.add_argument("--chunks", type=int, nargs="+", default=[32, 16, 8], help="grad_cache_chunk values")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_intermixed_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    arms = {0: make_step(args.recipe, args.overrides, args.batch, 0)}
    arms.update({c: make_step(args.recipe, args.overrides, args.batch, c) for c in args.chunks})
    for step in arms.values():
        step()  # warm-up
    cpu: dict[int, list[float]] = {c: [] for c in arms}
    wall: dict[int, list[float]] = {c: [] for c in arms}
    for _ in range(args.rounds):
        for c, step in arms.items():
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            cpu[c].append(time.process_time() - c0)
            wall[c].append(time.perf_counter() - w0)
    base_cpu, base_wall = statistics.median(cpu[0]), statistics.median(wall[0])
    print(f"{args.recipe}, batch {args.batch}, {args.threads} thread(s), median of {args.rounds} interleaved rounds; "
          "forward + backward per step")
    print("| grad_cache_chunk | CPU s/step | x plain | wall s/step | x plain |")
    print("|---|---|---|---|---|")
    for c in arms:
        mc, mw = statistics.median(cpu[c]), statistics.median(wall[c])
        print(f"| {c or 'off (plain)'} | {mc:.3f} | {mc / base_cpu:.2f} | {mw:.3f} | {mw / base_wall:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
