"""The run folder's record of a training run: history rows (``metrics.jsonl``, ``metrics.csv``),
TensorBoard scalars, evaluation on val with the choice of ``best.pt``, and what a checkpoint holds.

Only the main rank writes; the other ranks keep the same counters and write nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from tbps.data.records import Record
from tbps.engine.distributed import DistInfo
from tbps.engine.epoch import Loop
from tbps.files import atomic_write
from tbps.models.checkpoint import load_checkpoint, rng_state, save_checkpoint

# Keys of last.pt that only resuming needs: best.pt (for use) leaves them out.
RESUME_ONLY = ("optimizer", "scaler", "rng", "stage", "ema", "path", "format", "version")


def say(msg: str, dist: DistInfo) -> None:
    """One line on stderr from the main rank, above any progress bar."""
    if dist.is_main:
        tqdm.write(msg, file=sys.stderr)


class RunLog:
    """History, metrics files, TensorBoard and checkpoints of one run folder.

    ``meta`` (data root, layout, identities, epochs) goes into every checkpoint; ``history`` and
    ``best`` continue a resumed run's. Without ``val_records`` nothing is evaluated and ``best.pt``
    is the last epoch (:meth:`close`): never chosen on test.
    """

    def __init__(self, out: Path, dist: DistInfo, *, tokenizer, val_records: Sequence[Record] | None,
                 meta: dict[str, Any], history: list[dict] | None = None, best: dict | None = None,
                 progress: bool = True):
        self.out, self.dist = out, dist
        self.tokenizer, self.val_records = tokenizer, val_records
        self.meta = meta
        self.history: list[dict] = history if history is not None else []
        self.best = best
        self.progress = progress
        self.writer = _tensorboard(out) if dist.is_main else None

    def state(self, loop: Loop, epoch: int, step_in_epoch: int, *, full: bool = True) -> dict:
        """What a checkpoint holds at (``epoch``, ``step_in_epoch``); ``full`` adds what resuming
        needs (optimiser, scaler, RNG states, budget clock)."""
        s = {"model_spec": loop.model.spec.to_dict(), "model": loop.model.state_dict(),
             "objective": loop.objective.state_dict(), "recipe": loop.recipe.to_dict(), "epoch": epoch,
             "step_in_epoch": step_in_epoch, "global_step": loop.global_step, "history": self.history,
             "best": self.best, **self.meta}
        if full:
            s.update(optimizer=loop.optimizer.state_dict(), scaler=loop.scaler.state_dict(), rng=rng_state(),
                     elapsed=loop.elapsed(), stage=list(loop.stage))
            if loop.ema is not None:
                s["ema"] = loop.ema.state_dict()
        return s

    def save_last(self, loop: Loop, epoch: int, step_in_epoch: int) -> None:
        """``last.pt``: the full state to resume from."""
        if self.dist.is_main:
            save_checkpoint(self.out / "last.pt", self.state(loop, epoch, step_in_epoch))

    def train_scalars(self, step: int, loss: float, lr: float) -> None:
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def evaluate(self, loop: Loop, epoch_progress: float) -> dict | None:
        """Evaluate on val, append the row, and save ``best.pt`` when the selection metric improved
        (ties go to the higher mAP); the caller then saves ``last.pt`` and :meth:`write_history`.
        Returns the metrics (None without val, or off the main rank). With ``train.ema``, of the
        weights' moving average, which ``best.pt`` then holds."""
        if self.val_records is None or not self.dist.is_main:
            return None
        with loop.ema.swapped_in(loop.model) if loop.ema is not None else contextlib.nullcontext():
            return self._evaluate(loop, epoch_progress)  # train.ema: the average is evaluated and kept

    def _evaluate(self, loop: Loop, epoch_progress: float) -> dict:
        from tbps.engine.evaluate import evaluate

        data, tcfg = loop.recipe.data, loop.recipe.train
        m = evaluate(loop.model, self.tokenizer, self.val_records, batch_size=data.eval_batch_size,
                     device=loop.device, max_words=data.max_words, progress=self.progress).metrics
        score = m["t2i"][tcfg.select_metric]
        # Ties on the selection metric (common on small val splits) go to the higher mAP.
        improved = self.best is None or (score, m["t2i"]["mAP"]) > (self.best["score"],
                                                                    self.best["metrics"]["t2i"]["mAP"])
        self._add_row({"epoch": round(epoch_progress, 3), "step": loop.global_step, **_flat(m, "val")},
                      loop.global_step)
        if improved:
            self.best = {"score": score, "metric": f"val t2i {tcfg.select_metric}", "epoch": round(epoch_progress, 3),
                         "metrics": m}
            save_checkpoint(self.out / "best.pt", self.state(loop, int(epoch_progress), 0, full=False))
        say(f"epoch {epoch_progress:.2f}: val text->image R1 {m['t2i']['R1']:.2f} R5 {m['t2i']['R5']:.2f} "
            f"mAP {m['t2i']['mAP']:.2f}" + ("  (best so far)" if improved else ""), self.dist)
        return m

    def write_history(self) -> None:
        """``metrics.jsonl`` and ``metrics.csv`` from the history (the trainer calls it after saving
        ``last.pt``, which holds the same history: a resumed run rewrites them from there)."""
        if self.dist.is_main and self.history:
            write_history(self.out, self.history)

    def _add_row(self, row: dict, step: int) -> None:
        self.history.append(row)
        if self.writer:
            for k, v in row.items():
                if k.startswith("val_"):
                    self.writer.add_scalar(k.replace("_", "/", 2), v, step)

    def close(self) -> None:
        """Without a val split, ``best.pt`` is ``last.pt`` for use (its weight average in place of the
        weights, with ``train.ema``); close TensorBoard."""
        if self.dist.is_main and self.val_records is None and (self.out / "last.pt").exists():
            last = load_checkpoint(self.out / "last.pt")
            best = {k: v for k, v in last.items() if k not in RESUME_ONLY}
            if "ema" in last:
                best["model"] = {**last["model"], **last["ema"]["tensors"]}
            save_checkpoint(self.out / "best.pt", best)
        if self.writer:
            self.writer.close()


def write_history(out: Path, history: list[dict]) -> None:
    """``metrics.jsonl`` (one JSON row per evaluation) and ``metrics.csv`` (the union of the keys)."""
    with atomic_write(out / "metrics.jsonl", "w") as f:
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


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV/JSONL only
        return None
    return SummaryWriter(str(out / "tb"))
