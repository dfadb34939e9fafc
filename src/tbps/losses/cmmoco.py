"""CM-MoCo: cross-modal momentum contrast with id-filtered queues (TextReID, BMVC'21).

For an image query v_i (L2-normalised), its positive is the momentum text key t^k_i of
its own pair and its negatives the text-key queue Q_t without every entry whose person id
appears anywhere in the (global) batch; the text direction is symmetric with Q_v:

    L = CE([v_i . t^k_i, v_i . Q_t[valid]] / T, 0) + CE([t_i . v^k_i, t_i . Q_v[valid]] / T, 0),

averaged over the batch, summed over the two directions, T = 0.07 fixed. Keys come
from EMA copies of the encoders (m = 0.999, updated before the keys are computed) and
are enqueued FIFO after the loss, gathered across processes first.

Reusable pieces for any recipe:
- :class:`tbps.models.momentum.FeatureQueue` (imported here): a FIFO of (K, D) keys and their (K,)
  person ids, saved in checkpoints.
- :func:`cmmoco_loss`: the formula above on plain tensors.
- :class:`CMMoCo`: momentum copy of a ``TBPSModel`` + both queues; ``loss(model, img, txt, batch)``
  returns the CM-MoCo term for normalised query features an objective already computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tbps.losses.gather import gather_no_grad
from tbps.models.momentum import FeatureQueue, MomentumEncoder


def cmmoco_loss(
    image_q: torch.Tensor,
    text_q: torch.Tensor,
    image_k: torch.Tensor,
    text_k: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    queue_ids: torch.Tensor,
    batch_ids: torch.Tensor,
    temperature: float = 0.07,
    *,
    query_ids: torch.Tensor | None = None,
    batch_image_k: torch.Tensor | None = None,
    batch_text_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Two-direction InfoNCE of queries against the other modality's momentum keys.

    image_q, text_q: (B, D) normalised queries (with gradients); image_k, text_k: (B, D)
    normalised momentum keys of the same pairs (row i is pair i's key). image_queue,
    text_queue: (K, D); queue_ids: (K,), -1 for empty slots. batch_ids: (G,) person ids of
    the whole (global) batch: queue entries with any of them are not negatives.
    Optional batch negatives: batch_image_k, batch_text_k (G, D) keys of the global batch
    (ids ``batch_ids``); those of the query's own person (``query_ids`` (B,)) are dropped.
    Returns the batch mean of the image->text loss plus the text->image loss.
    """
    keep = (queue_ids >= 0) & ~torch.isin(queue_ids, batch_ids)  # (K,)
    use_batch = batch_image_k is not None and batch_text_k is not None
    if use_batch and query_ids is None:
        raise ValueError("batch negatives need query_ids, the (B,) person ids of the queries")
    same = (query_ids[:, None] == batch_ids[None, :]) if use_batch else None  # (B, G)

    def direction(q: torch.Tensor, pos: torch.Tensor, queue: torch.Tensor, batch_keys: torch.Tensor | None):
        parts = [(q * pos).sum(dim=1, keepdim=True), q @ queue[keep].t()]  # (B, 1), (B, K')
        if batch_keys is not None:
            parts.append((q @ batch_keys.t()).masked_fill(same, float("-inf")))  # (B, G)
        logits = torch.cat(parts, dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))

    return direction(image_q, text_k, text_queue, batch_text_k) + direction(text_q, image_k, image_queue, batch_image_k)


class CMMoCo(nn.Module):
    """Momentum key encoders and queues for CM-MoCo, pluggable into any objective.

    ``model`` is the online ``TBPSModel``; its EMA copy computes the keys. In an
    objective's ``forward``::

        img = F.normalize(model.encode_image(batch["image"]), dim=-1)
        txt = F.normalize(model.encode_text(batch["tokens"]), dim=-1)
        out["cmmoco_loss"] = weight * self.cmmoco.loss(model, img, txt, batch)

    ``loss`` updates the key encoder (EMA), computes the keys, returns the loss, and then
    enqueues the keys gathered from every process. ``batch_negatives`` adds the current
    global batch's keys of other people as negatives (needed when ``queue_size`` is 0).
    ``key_train_mode`` runs the key encoder in train mode when the objective trains (TextReID:
    BatchNorm on the batch's statistics); otherwise it stays in eval mode.
    """

    def __init__(self, model: nn.Module, *, queue_size: int = 2048, momentum: float = 0.999,
                 temperature: float = 0.07, batch_negatives: bool = False, dim: int | None = None,
                 key_train_mode: bool = False):
        super().__init__()
        if queue_size == 0 and not batch_negatives:
            raise ValueError("cmmoco: queue_size 0 leaves no negatives; set batch_negatives: true")
        dim = int(dim or model.embed_dim)
        self.temperature = float(temperature)
        self.batch_negatives = bool(batch_negatives)
        self.key_encoder = MomentumEncoder(model, momentum, train_mode=key_train_mode)
        self.image_queue = FeatureQueue(queue_size, dim)
        self.text_queue = FeatureQueue(queue_size, dim)

    @property
    def queue_size(self) -> int:
        return self.image_queue.size

    def keys(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised momentum keys of a batch: (B, D) image, (B, D) text; no gradients."""
        enc = self.key_encoder.module
        with torch.no_grad():
            img = F.normalize(enc.encode_image(batch["image"]).float(), dim=-1)
            txt = F.normalize(enc.encode_text(batch["tokens"]).float(), dim=-1)
        return img, txt

    def loss(self, model: nn.Module, image_q: torch.Tensor, text_q: torch.Tensor, batch: dict) -> torch.Tensor:
        """CM-MoCo loss for normalised (B, D) queries of ``batch``; updates EMA and queues."""
        self.key_encoder.update(model)  # before the keys, as in MoCo/TextReID
        img_k, txt_k = self.keys(batch)
        pid = batch["pid"]
        pid_g = gather_no_grad(pid)  # (G,) every id of the global batch
        img_kg, txt_kg = gather_no_grad(img_k), gather_no_grad(txt_k)  # (G, D)
        extra = {"query_ids": pid, "batch_image_k": img_kg, "batch_text_k": txt_kg} if self.batch_negatives else {}
        loss = cmmoco_loss(
            image_q.float(), text_q.float(), img_k, txt_k, self.image_queue.feats, self.text_queue.feats,
            self.image_queue.ids, pid_g, self.temperature, **extra,
        )
        # Keys enter the queue only after the loss: the current batch is never its own queue negative.
        self.image_queue.enqueue(img_kg, pid_g)
        self.text_queue.enqueue(txt_kg, pid_g)
        return loss
