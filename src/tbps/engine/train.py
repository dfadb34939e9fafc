"""The training run: one process on CPU or GPU, or several under torchrun.

:func:`train` sets a run up (resume or init, data, model, objective, optimiser, DDP, AMP), then
drives the epochs: the objective's per-epoch hooks, :func:`tbps.engine.epoch.train_one_epoch`, and
the run log (:mod:`tbps.engine.runlog`). It writes into the run folder: ``config.yaml`` (the
resolved recipe), ``last.pt`` (every epoch, and when stopped by the time budget), ``best.pt`` (best
on the val split; the last epoch where the dataset has no val split: never chosen on test),
``metrics.jsonl`` and ``metrics.csv`` (one row per evaluation), and TensorBoard events when it is
installed.

The order of the random draws is part of the contract (a seeded run is bit-identical): seeding,
model creation, the logit-scale fill, the dataset, the sampler, the objective, the optimiser, then
the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tbps.engine import fresh_modules, gradcache
from tbps.engine.distributed import DistInfo, barrier, init_distributed, leave_distributed
from tbps.engine.ema import WeightAverage
from tbps.engine.epoch import Amp, Loop, train_one_epoch
from tbps.engine.optim import build_optimizer
from tbps.engine.runlog import RunLog, say
from tbps.engine.runtime import Budget, Eta, check_device, cpu_threads, seed_everything
from tbps.files import atomic_write
from tbps.models.checkpoint import CheckpointError, load_checkpoint, set_rng_state
from tbps.models.conv_stem import is_channel_list
from tbps.recipes.config import ConfigError, Recipe, recipe_from_dict


# What a run writes into its folder: a run started with overwrite=True removes these first, and a
# run that fails before its first last.pt removes what it wrote.
RUN_FILES = ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "metrics.csv")
RUN_DIRS = ("tb",)


class TrainError(ValueError):
    """A training job that cannot start as given (an option out of range, a run folder in the way);
    the message names the option (one line, exit 2)."""

    user_error = True


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
    overwrite: bool = False  # replace the run in a non-empty out_dir (else that is an error)
    init_from: str | None = None  # a tbps checkpoint whose weights this run starts from (fine-tuning)
    device: str | None = None  # None: cuda when available
    strict: bool = False
    progress: bool = True
    stop_after_epochs: int | None = None  # stop (as if killed) after this many epochs in this call
    stop_at_stage_switch: bool = False  # stop (as if killed) where the recipe's next stage begins, last.pt
    #   saved there: a run forked into arms that share everything before the switch (bench/forked_pairs.py)


class _TrainModule(nn.Module):
    """Model + objective as one module, so DDP sees the whole computation."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch, ctx):
        return self.objective(self.model, batch, ctx)


@dataclass
class _Data:
    """The annotations and the training pipeline built from them."""

    ann: Any  # tbps.data.layouts.Annotations
    val_records: list | None
    dataset: Any  # tbps.data.dataset.TrainPairs
    sampler: Any  # tbps.data.sampler.GlobalBatchSampler
    tokenizer: Any
    token_cache: dict = field(default_factory=dict)  # caption -> token row, across epochs (tbps.data.dataset.Collate)


@dataclass
class _Start:
    """Where the loop starts: a fresh run's zeros, or a resumed run's counters and history."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    history: list | None = None
    best: dict | None = None
    elapsed: float = 0.0


def train(job: TrainJob) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary with paths and final val metrics.

    Everything is checked before any work (:func:`check_job`): a non-empty ``out_dir`` is refused
    unless ``resume`` or ``overwrite``. A run that fails before its first ``last.pt`` leaves no files.
    """
    out = Path(job.out_dir)
    fresh = check_job(job)
    dist = init_distributed(job.device)
    device = torch.device(check_device(job.device))
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    try:
        return _train(job, out, dist, device, fresh)
    except BaseException:
        if fresh and fresh.wrote and dist.is_main and not (out / "last.pt").exists():
            _remove_run_files(out, remove_dir=not fresh.existed)
        raise
    finally:
        leave_distributed(dist)


def _train(job: TrainJob, out: Path, dist: DistInfo, device: torch.device, fresh: "_Fresh | None") -> dict[str, Any]:
    resume_ckpt = _resume_checkpoint(job, out)
    recipe, tcfg = job.recipe, job.recipe.train
    gradcache.check_supported(recipe)  # refused in one line before the data is loaded
    epochs = job.epochs if job.epochs is not None else (resume_ckpt or {}).get("epochs") or tcfg.epochs
    seed_everything(tcfg.seed)  # same initial weights on every rank
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(tcfg.cpu_threads, recipe.data.num_workers, dist.world_size))
        say(f"torch threads: {torch.get_num_threads()}" + ("" if tcfg.cpu_threads else
            " (the free cores now; checked again every epoch; train.cpu_threads=N fixes it)"), dist)

    model, data = _model_and_data(job, recipe, dist, pretrained=resume_ckpt is None)
    loop = _loop(recipe, model, data, device, dist, epochs)
    fresh_modules.check(loop.module, recipe.stages, weight_average=tcfg.ema > 0)  # before any work
    start = _restore(loop, resume_ckpt, job, out) if resume_ckpt is not None else _Start()
    if resume_ckpt is None and job.init_from:
        parts = {"model": model, "objective": loop.objective}
        say(_init_weights(parts, job.init_from, recipe.model.conv_stem), dist)
        loop.objective.after_init(model)
    if tcfg.ema > 0:  # from the weights the run starts with (fresh, --init's, or last.pt's average)
        loop.ema = WeightAverage(model, tcfg.ema)
        if resume_ckpt is not None:
            if "ema" not in resume_ckpt:
                raise CheckpointError(f"{out / 'last.pt'}: no weight average to resume (the run began without train.ema)")
            try:
                loop.ema.load_state_dict(resume_ckpt["ema"])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{out / 'last.pt'}: {e}") from None
    if fresh:
        fresh.wrote = True
    _write_config(job, out, data, epochs, dist)
    log = RunLog(out, dist, tokenizer=data.tokenizer, val_records=data.val_records, history=start.history,
                 best=start.best, progress=job.progress,
                 meta={"data_root": str(job.data_root), "layout": data.ann.layout,
                       "num_identities": data.dataset.num_identities, "epochs": epochs})
    if resume_ckpt is not None:
        log.write_history()  # the metrics files as last.pt knows them (a kill may have come between the two)

    _prepare_data(loop, data.dataset)  # one-off data work (e.g. parsing captions), before the clock starts
    loop.budget = Budget(job.time_budget, job.budget_clock, before=start.elapsed)
    loop.schedule_budget = loop.budget.seconds if job.time_budget and tcfg.budget_schedule else None
    loop.global_step = start.global_step
    if job.budget_clock == "cpu" and recipe.data.num_workers > 0:
        say(f"note: a CPU-time budget does not count the {recipe.data.num_workers} DataLoader worker(s); "
            "set data.num_workers=0 for equal-compute comparisons", dist)

    completed, stopped = _run_epochs(job, loop, log, data, start)
    log.close()
    barrier(dist)
    return {
        "out": str(out),
        "last": str(out / "last.pt"),
        "best": str(out / "best.pt"),
        "best_info": log.best,
        "finished": completed >= epochs,
        "stopped_by_budget": stopped,
        "global_step": loop.global_step,
        "epochs_trained": round(loop.global_step / loop.steps_per_epoch, 3),
        "total_steps": epochs * loop.steps_per_epoch,
        "elapsed_s": loop.elapsed(),
        "layout": data.ann.layout,
        "skipped_images": len(data.ann.skipped),
    }


def _resume_checkpoint(job: TrainJob, out: Path) -> dict | None:
    """``last.pt`` of the run folder when resuming (the job then takes the run's own recipe)."""
    if not job.resume:
        return None
    ckpt = load_checkpoint(out / "last.pt")
    job.recipe = recipe_from_dict(ckpt["recipe"])  # a run continues with its own recipe
    return ckpt


@dataclass
class _Fresh:
    """A new run's folder (not a resumed one): whether it existed before this run, and whether this
    run has started writing into it."""

    existed: bool
    wrote: bool = False


def check_job(job: TrainJob) -> _Fresh | None:
    """Check a job's options, device, architecture and run folder before any work; raises
    :class:`TrainError` (or ``DeviceError``, ``ModelError``) naming the option. Returns
    :class:`_Fresh` for a new run (None when resuming). Writes nothing."""
    from tbps.models.spec import check_image_size

    def positive_int(name: str, v: Any) -> None:
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise TrainError(f"{name} must be a positive integer, got {v!r}")

    positive_int("--epochs", job.epochs)
    positive_int("stop_after_epochs", job.stop_after_epochs)
    b = job.time_budget
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0):
        raise TrainError(f"--time-budget must be a finite number of minutes > 0, got {b!r}")
    if job.budget_clock not in Budget.CLOCKS:
        raise TrainError(f"--budget-clock must be one of {list(Budget.CLOCKS)}, got {job.budget_clock!r}")
    if job.resume and job.overwrite:
        raise TrainError("--resume continues the run in the folder and --overwrite replaces it: pass one of them")
    check_device(job.device)
    out = Path(job.out_dir)
    if out.exists() and not out.is_dir():
        raise TrainError(f"run folder {out} exists and is not a folder")
    if job.resume:
        if not (out / "last.pt").is_file():
            raise TrainError(f"--resume {out}: no last.pt there to continue from")
        return None
    check_image_size(job.recipe.model)
    existed = out.exists()
    held = sorted(p.name for p in out.iterdir()) if existed else []
    if held and not job.overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise TrainError(f"run folder {out} is not empty ({shown}): continue that run with --resume, replace it "
                         "with --overwrite (resume=True / overwrite=True in the API), or choose another folder")
    return _Fresh(existed)


def _remove_run_files(out: Path, *, remove_dir: bool) -> None:
    """Remove what a run writes in ``out`` (:data:`RUN_FILES`, :data:`RUN_DIRS`), nothing else;
    the folder too when ``remove_dir`` and it is then empty."""
    import shutil

    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name, ignore_errors=True)
    if remove_dir and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _model_and_data(job: TrainJob, recipe: Recipe, dist: DistInfo, *, pretrained: bool) -> tuple[nn.Module, _Data]:
    """The annotations, the model (logit scale set from the recipe) and the training pipeline."""
    from tbps.data.dataset import TrainPairs
    from tbps.data.layouts import load_annotations
    from tbps.data.sampler import GlobalBatchSampler
    from tbps.models.factory import create_model, get_tokenizer

    tcfg, dcfg = recipe.train, recipe.data
    ann = load_annotations(job.data_root, job.layout, strict=job.strict, progress=job.progress and dist.is_main)
    if ann.skipped:
        say(f"skipped {len(ann.skipped)} unreadable image(s); first: {ann.skipped[0][0]} ({ann.skipped[0][1]})", dist)
    train_records = ann.split("train")
    val_records = ann.split("val") if "val" in ann.splits() else None
    if val_records is None:
        say(f"{ann.layout}: no val split, so best.pt will be the last epoch (never chosen on test)", dist)

    model = create_model(recipe.model, load_pretrained=pretrained)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(tcfg.logit_scale_init))
    if tcfg.logit_scale_clamp not in ("step", "forward"):
        raise ConfigError(f"train.logit_scale_clamp must be step or forward, got {tcfg.logit_scale_clamp!r}")
    model.logit_scale_cap = tcfg.logit_scale_max if tcfg.logit_scale_clamp == "forward" else None
    tokenizer = get_tokenizer(model.spec)
    dataset = TrainPairs(train_records, model.image_size, mean=model.spec.mean, std=model.spec.std,
                         augment=dcfg.augment, text_augment=dcfg.text_augment, max_words=dcfg.max_words,
                         seed=tcfg.seed)
    if dcfg.cache_images:
        dataset.cache_images(progress=job.progress and dist.is_main)
    _prepare_vocabulary(model, train_records, dist)
    sampler = GlobalBatchSampler(dataset.item_pids(), dcfg.batch_size, seed=tcfg.seed, identity_k=dcfg.identity_k,
                                 rank=dist.rank, world_size=dist.world_size)
    if sampler.num_batches() == 0:
        raise TrainError(f"{job.data_root}: {len(dataset)} training pair(s) are fewer than one global batch of "
                         f"{sampler.global_batch}: lower data.batch_size or use a larger dataset")
    return model, _Data(ann, val_records, dataset, sampler, tokenizer)


def _prepare_vocabulary(model: nn.Module, records, dist: DistInfo) -> None:
    """A frozen word-dictionary text tower (TextReID) encodes the training vocabulary once, here in
    the main process, so DataLoader workers only look words up (no-op for CLIP text towers)."""
    from tbps.data.text import clean_caption

    captions = [c for r in records for c in (r.captions + (r.captions_bt or ()))]
    vocab = model.prepare_vocabulary([clean_caption(c, 10**6) for c in captions])
    if vocab:
        say(f"word dictionary: {vocab['words']} words ({'from cache' if vocab['cached'] else 'encoded'})", dist)


def _loop(recipe: Recipe, model: nn.Module, data: _Data, device: torch.device, dist: DistInfo, epochs: int) -> Loop:
    """The objective, optimiser, DDP wrapper and AMP settings around ``model``."""
    from tbps.objectives import build_objective

    objective = build_objective(recipe.objective, model, recipe.losses_at(0, epochs),
                                num_identities=data.dataset.num_identities)
    module = _TrainModule(model, objective).to(device)
    if recipe.train.compile:
        say(f"compiling {', '.join(model.compile_towers())} at the first step (train.compile)", dist)
    optimizer = build_optimizer({"model": model, "objective": objective}, recipe.optim)
    train_module: nn.Module = module
    if dist.enabled:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_module = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True, **ddp_kwargs)
    amp = Amp.choose(recipe.train.amp, device, recipe.train.amp_dtype)
    return Loop(model=model, objective=objective, module=module, train_module=train_module, optimizer=optimizer,
                scaler=amp.scaler(), amp=amp, device=device, dist=dist, recipe=recipe, epochs=epochs,
                steps_per_epoch=data.sampler.num_batches(),
                budget=Budget(None))  # train() starts the real clock after the objective's prepare_data


def _restore(loop: Loop, ckpt: dict, job: TrainJob, out: Path) -> _Start:
    """Load a resumed run's weights, optimiser, scaler and RNG states; return its counters."""
    loop.model.load_state_dict(ckpt["model"])
    loop.objective.load_state_dict(ckpt["objective"])
    loop.optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        loop.scaler.load_state_dict(ckpt["scaler"])
    start = _Start(ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"], ckpt["history"], ckpt["best"],
                   ckpt.get("elapsed", 0.0))
    set_rng_state(ckpt["rng"])
    loop.stage = tuple(ckpt.get("stage", ()))  # the stages the optimiser state was built in
    say(f"resuming {out} at epoch {start.epoch + 1}, batch {start.batch}", loop.dist)
    return start


def _stem_setting(stem: Any) -> str:
    """``model.conv_stem`` as an override a user can paste (``=null`` for the architecture's own)."""
    return "model.conv_stem=" + ("[" + ",".join(map(str, stem)) + "]" if stem else "null")


def _init_weights(parts: dict[str, nn.Module], path: str, stem: list[int] | None) -> str:
    """Load the weights of a tbps checkpoint into ``parts`` (model, objective) by name, for
    fine-tuning: tensors present on both sides must have the same shape; modules only this
    run has keep their fresh initialisation, and tensors only the checkpoint has are dropped.
    Objective run state (``_extra_state``, e.g. a feature bank) is not carried over. The image
    stem (``model.conv_stem``, this run's is ``stem``) must be the checkpoint's: otherwise the
    first layer would start from scratch under trained layers. Returns a one-line summary."""
    ckpt = load_checkpoint(path)
    spec = ckpt.get("model_spec")
    theirs = spec.get("conv_stem") if isinstance(spec, dict) else None
    # Compared where the checkpoint names no stem or one this message can name (a damaged entry is left to the
    # shape checks below, and a checkpoint without a spec is not checked here).
    named = isinstance(spec, dict) and (not theirs or is_channel_list(theirs))
    if named and _stem_setting(theirs) != _stem_setting(stem):
        raise CheckpointError(f"--init {path}: its image stem is {_stem_setting(theirs)} and this run's is "
                              f"{_stem_setting(stem)}; give the run the checkpoint's ({_stem_setting(theirs)}) "
                              "so that its first layer is the trained one")
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


def _write_config(job: TrainJob, out: Path, data: _Data, epochs: int, dist: DistInfo) -> None:
    """``config.yaml``: the resolved recipe and what the run was started with."""
    import yaml

    if not dist.is_main:
        return
    if job.overwrite:  # checked by check_job: the old run's files go now that the new run can start
        _remove_run_files(out, remove_dir=False)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "config.yaml", "w") as f:
        yaml.safe_dump({**job.recipe.to_dict(), "data_root": str(job.data_root), "layout": data.ann.layout,
                        "epochs": epochs, "world_size": dist.world_size,
                        **({"init_from": str(job.init_from)} if job.init_from else {})}, f, sort_keys=False)


def _prepare_data(loop: Loop, dataset) -> None:
    """The objective's one-off data work for every losses section the recipe's stages use (each
    after ``configure`` with it), so a later stage's data work is not done on the time budget."""
    from tbps.recipes.stages import segment_starts

    recipe, seen = loop.recipe, []
    for position in segment_starts(recipe.stages, loop.epochs):
        losses = recipe.losses_at(position, loop.epochs)
        if losses not in seen:
            seen.append(losses)
            loop.objective.configure(losses)
            loop.objective.prepare_data(dataset)


def _epoch_loader(job: TrainJob, loop: Loop, data: _Data, epoch: int, start_batch: int, position: float):
    """Set the losses in force at run position ``position`` (its stages) and the epoch's data (the
    objective's per-epoch hooks), then the DataLoader from ``start_batch``."""
    from torch.utils.data import DataLoader

    from tbps.data.dataset import Collate
    from tbps.recipes.stages import fresh_modules_entered, fresh_optimizer

    objective, dataset, recipe = loop.objective, data.dataset, loop.recipe
    stage = recipe.stage_at(position, loop.epochs)
    if recipe.stages and stage != loop.stage:
        fresh = fresh_optimizer(recipe.stages, loop.stage, stage)
        if fresh:
            loop.optimizer.state.clear()  # every moment estimate starts again at the next step
        reset = fresh_modules_entered(recipe.stages, loop.stage, stage)
        if reset:
            fresh_modules.reinitialise(loop.module, reset, loop.optimizer, loop.dist)
        say(f"stage {'+'.join(str(i + 1) for i in stage) or 'none'} of {len(recipe.stages)} from step "
            f"{loop.global_step} (run position {position / loop.epochs:.3f})"
            f"{', optimiser state cleared' if fresh else ''}"
            f"{', re-initialised ' + ', '.join(reset) if reset else ''}", loop.dist)
    loop.stage = stage
    objective.configure(recipe.losses_at(position, loop.epochs))
    dataset.set_epoch(epoch)
    objective.on_epoch_start(loop.model, dataset, epoch=epoch, device=loop.device,
                             progress=job.progress and loop.dist.is_main)
    data.sampler.set_epoch(epoch, start_batch)
    return DataLoader(dataset, batch_sampler=data.sampler, num_workers=loop.recipe.data.num_workers,
                      collate_fn=Collate(data.tokenizer, objective.batch_hook(dataset),
                                         # in-process only: a worker would get (and drop) a copy each epoch
                                         data.token_cache if loop.recipe.data.num_workers == 0 else None),
                      pin_memory=loop.device.type == "cuda", persistent_workers=False)


def _adapt_threads(loop: Loop) -> None:
    """On CPU without a fixed train.cpu_threads: follow the cores other work leaves free (a thread
    on a core another process wants makes each step wait for its slowest slice)."""
    tcfg, workers = loop.recipe.train, loop.recipe.data.num_workers
    if loop.device.type != "cpu" or tcfg.cpu_threads:
        return
    before = torch.get_num_threads()
    now = cpu_threads(0, workers, loop.dist.world_size, own_threads=before + workers)
    if now != before:
        torch.set_num_threads(now)
        say(f"torch threads {before} -> {now}: other work {'took' if now < before else 'left'} a core", loop.dist)


def _budget_left(loop: Loop) -> float | None:
    return None if loop.budget.seconds is None else loop.budget.seconds - loop.elapsed()


def _run_epochs(job: TrainJob, loop: Loop, log: RunLog, data: _Data, start: _Start) -> tuple[int, bool]:
    """Train from ``start`` to the last epoch, the time budget or ``job.stop_after_epochs``; save
    ``last.pt`` after every epoch and evaluate every ``train.eval_every``. Returns (epochs fully
    trained, whether the budget stopped the run)."""
    tcfg, dist = loop.recipe.train, loop.dist
    completed, done_here, start_batch = start.epoch, 0, start.batch
    eta = Eta(loop.epochs * loop.steps_per_epoch, first_step=loop.global_step)

    def on_log(step: int, loss: float, lr: float) -> None:
        log.train_scalars(step, loss, lr)
        eta.tick(step)
        if (line := eta.first_report(step, _budget_left(loop))) is not None:
            say(line, dist)

    epoch, first_step = start.epoch, loop.global_step
    while epoch < loop.epochs:
        # One reading of the run's position decides both whether to stop at a stage switch and which
        # stage's losses to train on: under a time budget a second reading could already lie in the
        # next stage (the thread check below takes a moment), and the run would cross the switch.
        position = loop.agreed_position()
        if job.stop_at_stage_switch and loop.global_step > first_step and loop.stage_changed(position):
            log.save_last(loop, epoch, start_batch)
            log.write_history()
            say(f"stopped where the next stage begins, after {loop.global_step} steps (run position "
                f"{position / loop.epochs:.3f}): saved last.pt", dist)
            return completed, False
        if epoch > start.epoch and start_batch == 0:
            _adapt_threads(loop)
        loader = _epoch_loader(job, loop, data, epoch, start_batch, position)
        loop.train_module.train()
        end = train_one_epoch(loop, loader, epoch=epoch, start_batch=start_batch,
                              progress=job.progress and dist.is_main, on_log=on_log)
        if end.stage_switch:  # the next stage's losses from the next batch of this epoch
            start_batch = end.step_in_epoch
            continue
        start_batch = 0
        # Evaluate, then save last.pt, then the metrics files: last.pt always holds the history and the
        # best-so-far of every evaluation before it, so a run killed at any point resumes them exactly.
        if end.stopped_by_budget:
            at = epoch + end.step_in_epoch / loop.steps_per_epoch
            log.evaluate(loop, at)
            log.save_last(loop, epoch, end.step_in_epoch)
            log.write_history()
            say(f"{job.budget_clock} time budget of {job.time_budget:g} min spent after {loop.global_step} steps "
                f"(epoch {at:.2f} of {loop.epochs}; the full run is {eta.total} steps): saved last.pt", dist)
            return completed, True
        completed = epoch + 1
        if (epoch + 1) % tcfg.eval_every == 0 or epoch + 1 == loop.epochs:
            log.evaluate(loop, epoch + 1)
        log.save_last(loop, epoch + 1, 0)
        log.write_history()
        if epoch + 1 < loop.epochs and (line := eta.line(loop.global_step, _budget_left(loop))) is not None:
            say(f"epoch {epoch + 1}/{loop.epochs} done: {line}", dist)
        done_here += 1
        if job.stop_after_epochs is not None and done_here >= job.stop_after_epochs:
            break
        barrier(dist)
        epoch += 1
    return completed, False
