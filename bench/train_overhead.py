"""Steps/s of ``tbps train``'s real loop against a bare PyTorch loop on the same model, batches and loss.

Makes a small synthetic dataset (``tbps synth``), then runs the two loops step by step in turn
(a bare step, then a tbps step, ...), so that each pair shares the machine's load:

  tbps   ``tbps.engine.train.train`` (the CLI's training entry): sampler, dataset (cached
         images, augmentation), collate and tokenising, the tbps-clip objective, the
         learning-rate schedule, AdamW over the recipe's parameter groups, the logit-scale
         clamp, logging. Only the epochs' step loops are timed (``train_one_epoch``), not the
         set-up, the evaluation or ``last.pt``; the first epoch is a warm-up.
  bare   a loop written here: the same model (same seed), the same batches (taken once from
         the library's pipeline and kept in memory), the same loss terms (N-ITC + R-ITC +
         C-ITC with the recipe's weights, from ``tbps.losses``), ``loss.backward()``,
         ``AdamW.step()``; nothing else.

Both run with the same torch thread count (``train.cpu_threads``, default: every core) and, as
``tbps`` itself sets it, OpenMP's passive wait policy (unless OMP_WAIT_POLICY is set).
The overhead is (tbps time - bare time) / bare time over all the side-by-side steps (wall clock,
with the per-step median and quartiles; CPU time too, which a busy machine disturbs less at one
thread); the issue's target is at most 10%. Steps are the same in number and size. The data
pipeline's time alone (main process, token cache warm) is printed after: the bare loop reads
batches made once, so that is the part of the overhead that is data.

    python bench/train_overhead.py                      # tbps-clip-cpu, 120 ids, 6 epochs
    python bench/train_overhead.py --threads 1 data.augment.num_ops=0
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def run_side_by_side(data: Path, recipe, out: Path, epochs: int, bare) -> list[tuple]:
    """``train`` for ``epochs`` epochs with one step of the bare loop run just before each of its
    steps, so that each pair of steps shares the machine's load. One row per pair after the first
    (warm-up) epoch: (bare wall, bare CPU, tbps wall, tbps CPU) seconds, where a tbps step runs
    from asking the DataLoader for its batch to asking for the next one (the step, logging, the
    budget and stage checks: everything ``train_one_epoch`` does per batch)."""
    import tbps.engine.train as train_mod
    from tbps.engine.train import TrainJob, train

    inner = train_mod.train_one_epoch
    rows: list[tuple] = []

    def interleaved(loader, epoch: int):
        it = iter(loader)
        for i in range(len(bare.batches)):
            bare_wall, bare_cpu = bare.step(epoch, i)
            t, c = time.perf_counter(), time.process_time()
            try:
                batch = next(it)
            except StopIteration:
                return
            yield batch  # resumed when the trainer asks for the next batch: its step ends here
            if epoch > 0:
                rows.append((bare_wall, bare_cpu, time.perf_counter() - t, time.process_time() - c))

    def paired(loop, loader, **kw):
        return inner(loop, interleaved(loader, kw["epoch"]), **kw)

    train_mod.train_one_epoch = paired
    try:
        train(TrainJob(str(data), recipe, str(out), epochs=epochs, progress=False, overwrite=True))
    finally:
        train_mod.train_one_epoch = inner
    return rows


def library_loader(data: Path, recipe, cache: dict | None = None):
    """The library's pipeline as ``tbps train`` builds it (dataset with cached images, sampler,
    Collate with its token cache), as a function epoch -> DataLoader."""
    from _parts import training_parts
    from torch.utils.data import DataLoader

    from tbps.data.layouts import load_annotations
    from tbps.data.sampler import GlobalBatchSampler

    d, t = recipe.data, recipe.train
    records = load_annotations(str(data), None, progress=False).split("train")
    parts = training_parts(recipe, records, objective=False, cache_images=d.cache_images, token_cache=cache)
    ds = parts.dataset
    sampler = GlobalBatchSampler(ds.item_pids(), d.batch_size, seed=t.seed, identity_k=d.identity_k)

    def epoch(e: int):
        ds.set_epoch(e)
        sampler.set_epoch(e, 0)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=parts.collate)
    return epoch


def bare_batches(data: Path, recipe) -> list[dict]:
    """One epoch of the library's batches (epoch 0's order and augmentation), as tensors in memory."""
    keep = ("image", "tokens", "pid")
    return [{k: b[k] for k in keep} for b in library_loader(data, recipe)(0)]


def data_ms_per_step(data: Path, recipe, epochs: int = 3) -> float:
    """Wall ms a step of the library's data pipeline alone (main process), epochs after the first
    (whose captions fill the token cache, as in training)."""
    loader = library_loader(data, recipe, cache={})
    list(loader(0))
    t, n = time.perf_counter(), 0
    for e in range(1, epochs + 1):
        n += sum(1 for _ in loader(e))
    return 1000 * (time.perf_counter() - t) / n


class BareLoop:
    """The plain loop: model, AdamW, the loss written out; ``step(e, i)`` runs one step on batch ``i``."""

    def __init__(self, recipe, batches: list[dict]):
        import torch

        from tbps.models.factory import create_model

        self.recipe, self.batches = recipe, batches
        t, o = recipe.train, recipe.optim
        torch.manual_seed(t.seed)
        self.model = create_model(recipe.model, load_pretrained=False)
        with torch.no_grad():
            self.model.logit_scale.fill_(math.log(t.logit_scale_init))
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay)

    def step(self, epoch: int, i: int) -> tuple[float, float]:
        """(wall, CPU) seconds of one step on batch ``i`` at epoch ``epoch``."""
        import torch
        import torch.nn.functional as F

        from tbps.losses import citc_loss, nitc_loss, ritc_loss

        L, model, opt = self.recipe.losses_at(epoch), self.model, self.opt
        w_n, w_r, w_c = L["nitc"]["weight"], L["ritc"]["weight"], L["citc"]["weight"]
        t0, c0 = time.perf_counter(), time.process_time()
        b = self.batches[i]
        img = F.normalize(model.encode_image(b["image"]), dim=-1)
        txt = F.normalize(model.encode_text(b["tokens"]), dim=-1)
        scale = model.logit_scale.exp()
        alpha = L["nitc"]["alpha"] * min(1.0, (epoch + i / len(self.batches)) / L["nitc"]["ramp_epochs"])
        pid = b["pid"]
        loss = (w_n * nitc_loss(img, txt, img, txt, pid, pid, scale, alpha)
                + w_r * ritc_loss(img, txt, img, txt, pid, pid, scale, L["ritc"]["eps"])
                + w_c * citc_loss(img, txt, img, txt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(self.recipe.train.logit_scale_max))
        return time.perf_counter() - t0, time.process_time() - c0


def check_recipe(recipe) -> None:
    """The bare loop writes out the tbps-clip objective without its optional passes."""
    L = recipe.losses_at(0)
    if recipe.objective != "tbps-clip" or L["mvs"]["enabled"] or L["ss"]["weight"] > 0 \
            or L["nitc"]["soft_targets"] != "same_pass" or recipe.train.grad_cache_chunk > 0:
        raise SystemExit("this bench's bare loop is the tbps-clip objective with N-ITC (same_pass), R-ITC and "
                         "C-ITC only: pick such a recipe (tbps-clip-cpu)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tbps-clip-cpu")
    p.add_argument("--ids", type=int, default=120, help="identities of the synthetic dataset")
    p.add_argument("--images-per-id", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6, help="epochs (each side); the first is a warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: every core)")
    p.add_argument("overrides", nargs="*", help="recipe overrides (key=value), applied to both sides")
    args = p.parse_args(argv)

    from tbps.engine.runtime import passive_openmp_waits, usable_cores

    passive_openmp_waits()  # as the tbps command does, before torch loads: both loops run under it
    import torch

    from tbps.recipes.config import load_recipe
    from tbps.synth import synthesize

    threads = args.threads or usable_cores()
    recipe = load_recipe(args.recipe, [f"train.cpu_threads={threads}", *args.overrides])
    check_recipe(recipe)
    work = Path(tempfile.mkdtemp(prefix="tbps-bench-"))
    try:
        synthesize(work / "data", ids=args.ids, images_per_id=args.images_per_id, seed=0, workers=1, progress=False)
        batches = bare_batches(work / "data", recipe)
        print(f"{args.recipe}: {len(batches)} steps/epoch of batch {recipe.data.batch_size}, "
              f"data.num_workers={recipe.data.num_workers}, {threads} torch thread(s) on both sides, "
              f"{args.epochs - 1} timed epoch(s)")
        torch.set_num_threads(threads)
        rows = run_side_by_side(work / "data", recipe, work / "run", args.epochs, BareLoop(recipe, batches))
        for j, name in ((0, "bare PyTorch loop"), (2, "tbps train loop  ")):
            wall, cpu = sum(r[j] for r in rows), sum(r[j + 1] for r in rows)
            print(f"{name}: {len(rows) / wall:7.3f} steps/s ({1000 * wall / len(rows):7.1f} ms/step wall, "
                  f"{1000 * cpu / len(rows):7.1f} ms/step CPU) over {len(rows)} steps")
        q = statistics.quantiles([r[2] / r[0] - 1 for r in rows], n=4)
        total = sum(r[2] for r in rows) / sum(r[0] for r in rows) - 1
        cpu_total = sum(r[3] for r in rows) / sum(r[1] for r in rows) - 1
        print(f"overhead over {len(rows)} side-by-side steps: {total:+.1%} of the bare loop's wall time "
              f"(per step: median {q[1]:+.1%}, quartiles {q[0]:+.1%} to {q[2]:+.1%}), {cpu_total:+.1%} of its "
              f"CPU time (target: at most +10%)")
        if recipe.data.num_workers == 0:
            ms = data_ms_per_step(work / "data", recipe)
            bare_ms = 1000 * sum(r[0] for r in rows) / len(rows)
            print(f"of which the data pipeline in the main process (sampler, augmentation, collate; measured "
                  f"alone after the runs): {ms:.1f} ms/step, {ms / bare_ms:.1%} of the bare step")
        print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
