"""The training loop: one process on CPU or GPU, or several under torchrun.

Writes into the run folder: ``config.yaml`` (the resolved recipe), ``last.pt`` (every
epoch, and when stopped by the time budget), ``best.pt`` (best on the val split; the last
epoch where the dataset has no val split: never chosen on test), ``metrics.jsonl`` and
``metrics.csv`` (one row per evaluation), and TensorBoard events when it is installed.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from tbps.recipes.config import Recipe, recipe_from_dict
from tbps.models.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from tbps.engine.distributed import DistInfo, init_distributed
from tbps.engine.optim import build_optimizer, lr_at, set_lr
from tbps.engine.runtime import Budget, cpu_threads, seed_everything
from tbps.files import atomic_write


@dataclass
class TrainJob:
    """A training run as plain arguments (the CLI builds one from flags)."""

    data_root: str
    recipe: Recipe
    out_dir: str
    layout: str | None = None
    epochs: int | None = None  # overrides recipe.train.epochs
    time_budget: float | None = None  # minutes for the whole run, on budget_clock
    budget_clock: str = "wall"  # wall | cpu (this process's CPU time: equal compute on a shared machine)
    resume: bool = False
    init_from: str | None = None  # a tbps checkpoint whose weights this run starts from (fine-tuning)
    device: str | None = None  # None: cuda when available
    strict: bool = False
    progress: bool = True
    stop_after_epochs: int | None = None  # stop (as if killed) after this many epochs in this call


class _TrainModule(nn.Module):
    """Model + objective as one module, so DDP sees the whole computation."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch, ctx):
        return self.objective(self.model, batch, ctx)


def _log(msg: str, dist: DistInfo) -> None:
    if dist.is_main:
        tqdm.write(msg, file=sys.stderr)


def _write_history(out: Path, history: list[dict]) -> None:
    with atomic_write(out / "metrics.jsonl", "w") as f:
        import json

        for row in history:
            f.write(json.dumps(row) + "\n")
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    with atomic_write(out / "metrics.csv", "w") as f:
        f.write(buf.getvalue())


def _flat(metrics: dict, prefix: str) -> dict:
    return {f"{prefix}_{d}_{k}": round(v, 4) for d in ("t2i", "i2t") for k, v in metrics[d].items()}


def _stage_losses(recipe: Recipe, epoch: int) -> dict:
    """The ``losses`` section in force at ``epoch``: the recipe's, overridden by the stage
    whose [start_epoch, end_epoch) holds the epoch."""
    from tbps.recipes.config import _deep_merge

    losses = recipe.losses
    for stage in recipe.stages:
        if stage.get("start_epoch", 0) <= epoch < stage.get("end_epoch", math.inf):
            losses = _deep_merge(losses, stage.get("losses", {}))
    return losses


def _batch_hook(objective, dataset):
    """The objective's data-pipeline hook for this epoch's losses (None for most objectives)."""
    make = getattr(objective, "batch_hook", None)
    return make(dataset) if make is not None else None


def _init_weights(parts: dict[str, nn.Module], path: str) -> str:
    """Load the weights of a tbps checkpoint into ``parts`` (model, objective) by name, for
    fine-tuning: tensors present on both sides must have the same shape; modules only this
    run has keep their fresh initialisation, and tensors only the checkpoint has are dropped.
    Objective run state (``_extra_state``, e.g. a feature bank) is not carried over. Returns a
    one-line summary."""
    ckpt = load_checkpoint(path)
    loaded, fresh, dropped = 0, [], []
    for name, part in parts.items():
        own = part.state_dict()
        src = {k: v for k, v in (ckpt.get(name) or {}).items() if not k.endswith("_extra_state")}
        bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in src.items()
               if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
        if bad:
            raise CheckpointError(f"--init {path}: {len(bad)} tensor(s) differ in shape from this recipe's model "
                             f"(another architecture?), e.g. {bad[0]}")
        missing, unexpected = part.load_state_dict(src, strict=False)
        loaded += len(src) - len(unexpected)
        fresh += [k for k in missing if not k.endswith("_extra_state")]
        dropped += list(unexpected)
    if not loaded:
        raise CheckpointError(f"--init {path}: no tensor of the checkpoint matches this recipe's model")
    msg = f"initialised from {path}: {loaded} tensors loaded"
    if fresh:
        msg += f", {len(fresh)} new here (fresh init, e.g. {fresh[0]})"
    if dropped:
        msg += f", {len(dropped)} unused (e.g. {dropped[0]})"
    return msg


def train(job: TrainJob) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary with paths and final val metrics."""
    import yaml

    from tbps.data.dataset import Collate, TrainPairs
    from tbps.data.layouts import load_annotations
    from tbps.data.sampler import GlobalBatchSampler
    from tbps.engine.evaluate import evaluate
    from tbps.models.factory import create_model, get_tokenizer
    from tbps.objectives import StepContext, build_objective

    dist = init_distributed(job.device)
    device = torch.device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    out = Path(job.out_dir)
    resume_ckpt = None
    if job.resume:
        if not (out / "last.pt").exists():
            raise FileNotFoundError(f"--resume {out}: no last.pt there to continue from")
        resume_ckpt = load_checkpoint(out / "last.pt")
        job.recipe = recipe_from_dict(resume_ckpt["recipe"])  # a run continues with its own recipe
    recipe = job.recipe
    tcfg = recipe.train
    epochs = job.epochs or (resume_ckpt or {}).get("epochs") or tcfg.epochs
    seed_everything(tcfg.seed)  # same initial weights on every rank
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(tcfg.cpu_threads, recipe.data.num_workers, dist.world_size))

    ann = load_annotations(job.data_root, job.layout, strict=job.strict, progress=job.progress and dist.is_main)
    if ann.skipped:
        _log(f"skipped {len(ann.skipped)} unreadable image(s); first: {ann.skipped[0][0]} ({ann.skipped[0][1]})", dist)
    train_records = ann.split("train")
    val_records = ann.split("val") if "val" in ann.splits() else None
    if val_records is None:
        _log(f"{ann.layout}: no val split, so best.pt will be the last epoch (never chosen on test)", dist)

    model = create_model(recipe.model, load_pretrained=resume_ckpt is None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(tcfg.logit_scale_init))
    tokenizer = get_tokenizer(model.spec)
    spec = model.spec
    dataset = TrainPairs(
        train_records, model.image_size, mean=spec.mean, std=spec.std, augment=recipe.data.augment,
        text_augment=recipe.data.text_augment, max_words=recipe.data.max_words, seed=tcfg.seed,
    )
    if recipe.data.cache_images:
        dataset.cache_images(progress=job.progress and dist.is_main)
    # A frozen word-dictionary text tower (TextReID) encodes the training vocabulary once, here in
    # the main process, so DataLoader workers only look words up (no-op for CLIP text towers).
    from tbps.data.text import clean_caption
    vocab = model.prepare_vocabulary([clean_caption(c, 10**6) for r in train_records for c in (r.captions + (r.captions_bt or ()))])
    if vocab:
        _log(f"word dictionary: {vocab['words']} words ({'from cache' if vocab['cached'] else 'encoded'})", dist)
    sampler = GlobalBatchSampler(
        dataset.item_pids(), recipe.data.batch_size, seed=tcfg.seed, identity_k=recipe.data.identity_k,
        rank=dist.rank, world_size=dist.world_size,
    )
    steps_per_epoch = sampler.num_batches()
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} training pairs are fewer than one global batch of {sampler.global_batch}: "
            "lower data.batch_size"
        )
    objective = build_objective(recipe.objective, model, _stage_losses(recipe, 0), num_identities=dataset.num_identities)
    module = _TrainModule(model, objective).to(device)
    optimizer = build_optimizer({"model": model, "objective": objective}, recipe.optim)
    train_module: nn.Module = module
    if dist.enabled:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_module = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True, **ddp_kwargs)

    use_amp = tcfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start_epoch, start_batch, global_step, history, best = 0, 0, 0, [], None
    elapsed_before = 0.0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        objective.load_state_dict(resume_ckpt["objective"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        if "scaler" in resume_ckpt:
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch, start_batch = resume_ckpt["epoch"], resume_ckpt["step_in_epoch"]
        global_step, history, best = resume_ckpt["global_step"], resume_ckpt["history"], resume_ckpt["best"]
        elapsed_before = resume_ckpt.get("elapsed", 0.0)
        set_rng_state(resume_ckpt["rng"])
        _log(f"resuming {out} at epoch {start_epoch + 1}, batch {start_batch}", dist)
    elif job.init_from:
        _log(_init_weights({"model": model, "objective": objective}, job.init_from), dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "config.yaml", "w") as f:
            yaml.safe_dump({**recipe.to_dict(), "data_root": str(job.data_root), "layout": ann.layout,
                            "epochs": epochs, "world_size": dist.world_size,
                            **({"init_from": str(job.init_from)} if job.init_from else {})}, f, sort_keys=False)
    writer = _tensorboard(out) if dist.is_main else None

    if hasattr(objective, "prepare_data"):  # one-off data work (e.g. parsing captions), before the clock starts
        objective.prepare_data(dataset)
    budget = Budget(job.time_budget, job.budget_clock)
    if job.budget_clock == "cpu" and recipe.data.num_workers > 0:
        _log(f"note: a CPU-time budget does not count the {recipe.data.num_workers} DataLoader worker(s); "
             "set data.num_workers=0 for equal-compute comparisons", dist)
    extra_meta = {"data_root": str(job.data_root), "layout": ann.layout, "num_identities": dataset.num_identities,
                  "epochs": epochs}

    def state(epoch: int, step_in_epoch: int, *, full: bool = True) -> dict:
        s = {"model_spec": spec.to_dict(), "model": model.state_dict(), "objective": objective.state_dict(),
             "recipe": recipe.to_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
             "global_step": global_step, "history": history, "best": best, **extra_meta}
        if full:
            s.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng_state(),
                     elapsed=elapsed_before + budget.elapsed())
        return s

    def run_eval(epoch_progress: float) -> dict | None:
        nonlocal best
        if val_records is None or not dist.is_main:
            return None
        res = evaluate(model, tokenizer, val_records, batch_size=recipe.data.eval_batch_size, device=device,
                       max_words=recipe.data.max_words, progress=job.progress)
        m = res.metrics
        score = m["t2i"][tcfg.select_metric]
        # Ties on the selection metric (common on small val splits) go to the higher mAP.
        improved = best is None or (score, m["t2i"]["mAP"]) > (best["score"], best["metrics"]["t2i"]["mAP"])
        row = {"epoch": round(epoch_progress, 3), "step": global_step, **_flat(m, "val")}
        history.append(row)
        if writer:
            for k, v in row.items():
                if k.startswith("val_"):
                    writer.add_scalar(k.replace("_", "/", 2), v, global_step)
        if improved:
            best = {"score": score, "metric": f"val t2i {tcfg.select_metric}", "epoch": round(epoch_progress, 3),
                    "metrics": m}
            save_checkpoint(out / "best.pt", state(int(epoch_progress), 0, full=False))
        _log(f"epoch {epoch_progress:.2f}: val text->image R1 {m['t2i']['R1']:.2f} R5 {m['t2i']['R5']:.2f} "
             f"mAP {m['t2i']['mAP']:.2f}" + ("  (best so far)" if improved else ""), dist)
        _write_history(out, history)
        return m

    stopped_by_budget = False
    epochs_this_call = 0
    completed = start_epoch  # epochs fully trained so far
    for epoch in range(start_epoch, epochs):
        objective.configure(_stage_losses(recipe, epoch))
        dataset.set_epoch(epoch)
        if hasattr(objective, "on_epoch_start"):  # per-epoch data work with the current model (MeFa's banks)
            objective.on_epoch_start(model, dataset, epoch=epoch, device=device, progress=job.progress and dist.is_main)
        sampler.set_epoch(epoch, start_batch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=recipe.data.num_workers,
                            collate_fn=Collate(tokenizer, _batch_hook(objective, dataset)), pin_memory=device.type == "cuda",
                            persistent_workers=False)
        train_module.train()
        bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                   disable=not (job.progress and dist.is_main), leave=False, dynamic_ncols=True)
        seen, t0 = 0, time.perf_counter()
        step_in_epoch = start_batch
        for batch in loader:
            progress = epoch + step_in_epoch / steps_per_epoch
            sched = progress
            if job.time_budget and tcfg.budget_schedule:
                # Finish the schedule by the deadline when the budget is the tighter limit.
                sched = max(progress, epochs * (elapsed_before + budget.elapsed()) / budget.seconds)
            lr = lr_at(sched, epochs, recipe.optim)
            set_lr(optimizer, lr)
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            ctx = StepContext(epoch=progress, total_epochs=epochs, step=global_step)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                outputs = train_module(batch, ctx)
            loss = sum(v for k, v in outputs.items() if k.endswith("_loss"))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tcfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(module.parameters(), tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(tcfg.logit_scale_max))
            objective.after_step(model)
            global_step += 1
            step_in_epoch += 1
            seen += batch["tokens"].shape[0] * dist.world_size
            if global_step % tcfg.log_every == 0 or step_in_epoch == steps_per_epoch:
                ips = seen / max(time.perf_counter() - t0, 1e-9)
                parts = {k.removesuffix("_loss"): f"{v.item():.3f}" for k, v in outputs.items() if k.endswith("_loss")}
                bar.set_postfix(loss=f"{loss.item():.3f}", **parts, lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                if writer:
                    writer.add_scalar("train/loss", loss.item(), global_step)
                    writer.add_scalar("train/lr", lr, global_step)
            bar.update(1)
            if _all_agree(budget.spent(), dist, device):
                stopped_by_budget = True
                break
        bar.close()
        start_batch = 0
        if stopped_by_budget:
            if dist.is_main:
                save_checkpoint(out / "last.pt", state(epoch, step_in_epoch))
            _log(f"{job.budget_clock} time budget of {job.time_budget:g} min spent at epoch {epoch + step_in_epoch / steps_per_epoch:.2f}: "
                 "saved last.pt", dist)
            run_eval(epoch + step_in_epoch / steps_per_epoch)
            break
        completed = epoch + 1
        if dist.is_main:
            save_checkpoint(out / "last.pt", state(epoch + 1, 0))
        if (epoch + 1) % tcfg.eval_every == 0 or epoch + 1 == epochs:
            run_eval(epoch + 1)
        epochs_this_call += 1
        if job.stop_after_epochs is not None and epochs_this_call >= job.stop_after_epochs:
            break
        if dist.enabled:
            torch.distributed.barrier()

    finished = completed >= epochs
    if dist.is_main and val_records is None and (out / "last.pt").exists():
        save_checkpoint(out / "best.pt", {k: v for k, v in load_checkpoint(out / "last.pt").items()
                                          if k not in ("optimizer", "scaler", "rng", "path", "format", "version")})
    if writer:
        writer.close()
    if dist.enabled:
        torch.distributed.barrier()
    return {
        "out": str(out),
        "last": str(out / "last.pt"),
        "best": str(out / "best.pt"),
        "best_info": best,
        "finished": finished,
        "stopped_by_budget": stopped_by_budget,
        "global_step": global_step,
        "elapsed_s": elapsed_before + budget.elapsed(),
        "layout": ann.layout,
        "skipped_images": len(ann.skipped),
    }



def _all_agree(flag: bool, dist: DistInfo, device: torch.device) -> bool:
    """True on every rank when it is true on any: ranks must stop at the same step, or the
    next feature gather would wait forever."""
    if not dist.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV/JSONL only
        return None
    return SummaryWriter(str(out / "tb"))
