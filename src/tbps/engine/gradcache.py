"""Gradient caching (GradCache, Gao et al. 2021): the loss and gradients of a large batch, in chunks.

A contrastive loss couples every pair of the global batch, so its batch cannot simply be split into
accumulation steps. With ``train.grad_cache_chunk=N`` one step runs as:

1. **embed**: each chunk of N pairs goes through the objective's declared encoder calls
   (:meth:`Objective.embed`) without a graph; the torch CPU and CUDA random states are saved before
   each chunk (BatchNorm running statistics are put back afterwards, so only step 3 updates them);
2. **loss**: the chunks' features, concatenated as leaf tensors, go through the objective's own loss
   code (:meth:`Objective.loss_from_features`, i.e. ``forward`` with the encoders answered from the
   cache), which gathers them across processes as the normal path does; backward gives the
   gradients of the loss w.r.t. the features (and the loss-side parameters: logit scale, heads);
3. **replay**: each chunk is embedded again with a graph from its saved random state (the same
   dropout masks) and its slice of the cached feature gradients is back-propagated.

The parameter gradients then equal one backward pass through the whole batch (up to float
summation order), at the cost of a second encoder forward per chunk; activation memory is that
of one chunk, plus the features of the batch. Under torchrun the replay runs on the unwrapped
module and the gradients are averaged across processes here, as DDP would (its per-backward
all-reduce cannot follow several backward passes per step); buffers are broadcast from rank 0 as
DDP does.

What is not the same as one pass over the whole batch: BatchNorm in train mode normalises with
each chunk's statistics (as DDP without SyncBatchNorm uses each GPU's), and randomness drawn in
the loss step (not in the encoders) is drawn once, after all chunks.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn as nn

from tbps.objectives.base import Objective, StepContext


def check_supported(recipe) -> None:
    """Refuse ``train.grad_cache_chunk`` with one line when the recipe's objective cannot be cached."""
    from tbps.objectives import OBJECTIVES
    from tbps.recipes.config import ConfigError
    from tbps.recipes.stages import segment_starts

    chunk = recipe.train.grad_cache_chunk
    cls = OBJECTIVES.get(recipe.objective)
    if not chunk or cls is None:
        return
    sections = [recipe.losses_at(p) for p in segment_starts(recipe.stages, recipe.train.epochs)]
    reason = next((r for r in map(cls.cache_refusal, sections) if r is not None), None)
    if reason is not None:
        raise ConfigError(f"train.grad_cache_chunk={chunk}: objective {recipe.objective!r} cannot be trained with "
                          f"gradient caching ({reason}); drop the key and reach the global batch with "
                          "data.batch_size per GPU x GPUs")


def forward_backward(objective: Objective, model: nn.Module, batch: dict, ctx: StepContext, chunk: int, *,
                     backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                     autocast: Callable[[], Any] = nullcontext,
                     replay_rng: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The objective's outputs and summed loss on ``batch``, with the gradients of that loss
    accumulated into the parameters' ``.grad``, computed chunk by chunk.

    backward: how the loss is back-propagated (``scaler.scale(loss).backward()`` under AMP; the
    cached feature gradients are then in the scaled units and the replay keeps them). autocast: a
    context factory for the forward passes. ``replay_rng=False`` exists to show that the replay of
    the random state matters (tests); training never sets it.
    """
    n = _batch_len(batch)
    slices = [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    grad_names = {e.name for e in objective.embeddings() if e.grad}
    running = _batchnorm_stats(model)
    states, parts = [], []
    with torch.no_grad():
        for sl in slices:
            states.append(_rng_state())
            with autocast():
                parts.append(objective.embed(model, _take(batch, sl, n)))
    _restore(running)

    features = {name: _leaf(_cat([p[name] for p in parts]), name in grad_names) for name in parts[0]}
    with autocast():
        outputs = objective.loss_from_features(model, features, batch, ctx)
    loss = sum(v for k, v in outputs.items() if k.endswith("_loss"))
    backward(loss)
    after = _rng_state()
    cached = {name: tuple(None if t.grad is None else t.grad for t in _as_tuple(features[name]))
              for name in grad_names if name in features}

    for sl, state in zip(slices, states):
        if replay_rng:
            _set_rng_state(state)
        with autocast():
            again = objective.embed(model, _take(batch, sl, n))
        outs, grads = [], []
        for name, g in cached.items():
            for o, gi in zip(_as_tuple(again[name]), g):
                if gi is not None and o.requires_grad:
                    outs.append(o)
                    grads.append(gi[sl].to(o.dtype))
        if outs:
            torch.autograd.backward(outs, grads)
    _set_rng_state(after)
    return outputs, loss.detach()


def _batch_len(batch: dict) -> int:
    for key in ("pid", "tokens", "image"):
        if torch.is_tensor(batch.get(key)):
            return int(batch[key].shape[0])
    raise ValueError("gradient caching: the batch has no 'pid', 'tokens' or 'image' tensor to size it by")


def _take(batch: dict, sl: slice, n: int) -> dict:
    """Rows ``sl`` of every per-sample entry (tensors and lists of length n); other entries as they are."""
    out = {}
    for k, v in batch.items():
        per_sample = (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n) or \
            (isinstance(v, (list, tuple)) and len(v) == n)
        out[k] = v[sl] if per_sample else v
    return out


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _cat(chunks: list):
    """Concatenate chunk outputs (tensors or tuples of tensors) along the batch dimension."""
    if isinstance(chunks[0], (tuple, list)):
        return tuple(torch.cat(list(parts), dim=0) for parts in zip(*chunks))
    return torch.cat(chunks, dim=0)


def _leaf(x, grad: bool):
    """Floating tensors of a gradient-carrying feature become leaves that collect d loss / d feature."""
    def one(t: torch.Tensor) -> torch.Tensor:
        return t.detach().requires_grad_(True) if grad and t.is_floating_point() else t.detach()

    return tuple(one(t) for t in x) if isinstance(x, tuple) else one(x)


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _batchnorm_stats(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every BatchNorm running statistic, to undo the graph-free pass's updates."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved += [(b, b.detach().clone()) for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                      if b is not None]
    return saved


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buf, copy in saved:
            buf.copy_(copy)
