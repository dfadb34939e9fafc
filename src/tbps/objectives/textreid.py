"""The TextReID objective (Han et al., BMVC'21): CM-MoCo + ID loss + alignment loss.

    L = w_moco * L_cmmoco + w_id * L_id + w_align * L_align

- CM-MoCo (``losses/cmmoco.py``): momentum key encoders, id-filtered queues, T = 0.07.
- ID (``losses/id_loss.py``): a classifier over the P training ids (unit-length class vectors,
  no bias) on the unnormalised features of both modalities, label smoothing 0.1, summed over
  the two modalities as TextReID's code does.
- Alignment (``losses/alignment.py``): on the cosine matrix of local images against the
  global texts (gathered across processes).

Also registered here: ``tbps-clip-cmmoco``, the TBPS-CLIP objective with a ``cmmoco:``
entry, to use CM-MoCo as an extra loss in another recipe.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tbps.losses.gather import gather_no_grad, gather_with_grad
from tbps.losses import CMMoCo, alignment_loss, id_loss
from tbps.losses.id_loss import NormalizedClassifier
from tbps.objectives.base import Embedding, Objective, StepContext, merge_losses, register
from tbps.objectives.tbps_clip import DEFAULTS as TBPS_CLIP_DEFAULTS
from tbps.objectives.tbps_clip import TBPSCLIPObjective

CMMOCO_DEFAULTS: dict[str, Any] = {
    "weight": 1.0,
    "queue_size": 2048,  # per modality; 1024-4096 in the paper, 2048 best
    "momentum": 0.999,
    "temperature": 0.07,
    "batch_negatives": False,  # also contrast with the current batch's keys of other people
    # The key encoder's mode: "train" (TextReID's: BatchNorm on batch statistics, dropout on) or "eval"
    # (running statistics copied from the online model, no dropout).
    "key_mode": "train",
}

DEFAULTS: dict[str, Any] = {
    "cmmoco": dict(CMMOCO_DEFAULTS),
    # TextReID: CE(image) + CE(text) ("sum"; IRRA halves it: "mean") over unit-length class vectors
    # without bias ("normalized"; "linear": nn.Linear with a bias, N(0, 0.001) weights).
    "id": {"weight": 1.0, "smoothing": 0.1, "reduction": "sum", "classifier": "normalized"},
    "align": {"weight": 1.0, "scale_pos": 10.0, "margin_pos": 0.6, "scale_neg": 40.0, "margin_neg": 0.4},
    "gather": True,
}


def build_cmmoco(model: nn.Module, cfg: dict[str, Any]) -> CMMoCo | None:
    """A :class:`CMMoCo` for a ``cmmoco:`` section, or None when its weight is 0 at construction."""
    from tbps.recipes.config import ConfigError

    if cfg["weight"] <= 0:
        return None
    if cfg["queue_size"] == 0 and not cfg["batch_negatives"]:
        raise ConfigError("losses.cmmoco: queue_size 0 leaves no negatives; set batch_negatives: true")
    if cfg["key_mode"] not in ("train", "eval"):
        raise ConfigError(f"losses.cmmoco.key_mode must be train or eval, got {cfg['key_mode']!r}")
    return CMMoCo(model, queue_size=cfg["queue_size"], momentum=cfg["momentum"], temperature=cfg["temperature"],
                  batch_negatives=cfg["batch_negatives"], key_train_mode=cfg["key_mode"] == "train")


def _check_stage(cmmoco: CMMoCo | None, cfg: dict[str, Any]) -> None:
    from tbps.recipes.config import ConfigError

    if cfg["weight"] > 0 and cmmoco is None:
        raise ConfigError("losses.cmmoco: a stage cannot switch CM-MoCo on when the recipe's weight is 0 "
                          "(the key encoder and queues are built at the start)")
    if cmmoco is not None and cfg["queue_size"] != cmmoco.queue_size:
        raise ConfigError(f"losses.cmmoco.queue_size cannot change between stages ({cmmoco.queue_size} -> "
                          f"{cfg['queue_size']})")


def _id_classifier(kind: str, dim: int, num_identities: int) -> nn.Module:
    """The ID classifier shared by both modalities (one over the P training ids)."""
    from tbps.recipes.config import ConfigError

    if kind == "normalized":
        return NormalizedClassifier(dim, num_identities)
    if kind == "linear":
        linear = nn.Linear(dim, num_identities)
        nn.init.normal_(linear.weight, std=0.001)
        nn.init.zeros_(linear.bias)
        return linear
    raise ConfigError(f"losses.id.classifier must be normalized or linear, got {kind!r}")


@register("textreid")
class TextReIDObjective(Objective):
    defaults = DEFAULTS

    def __init__(self, model: nn.Module, losses: dict[str, Any], *, num_identities: int):
        super().__init__()
        self.cfg = merge_losses(self.defaults, losses or {})
        self.classifier = _id_classifier(self.cfg["id"]["classifier"], model.embed_dim, num_identities)
        # Built once from the recipe's losses: later stages may re-weight CM-MoCo, not switch it on.
        self.cmmoco: CMMoCo | None = build_cmmoco(model, self.cfg["cmmoco"])
        # TextReID's losses use fixed temperatures, never CLIP's logit scale: mark it untrained (AdamW
        # skipped it anyway: it never had a gradient).
        model.logit_scale.requires_grad_(False)

    def configure(self, losses: dict[str, Any]) -> None:
        cfg = merge_losses(self.defaults, losses or {})
        _check_stage(self.cmmoco, cfg["cmmoco"])
        self.cfg = cfg

    # CM-MoCo, ID and alignment are functions of the global features; the momentum keys are computed
    # (without a graph) on the whole batch in the loss step.
    not_cacheable = None

    def embeddings(self) -> list[Embedding]:
        """forward's encoder calls, in its order (gradient caching)."""
        return [Embedding("encode_image", "image"), Embedding("encode_text", "tokens")]

    def forward(self, model: nn.Module, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        img_raw = model.encode_image(batch["image"])  # (B, D)
        txt_raw = model.encode_text(batch["tokens"])  # (B, D)
        img, txt = F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1)
        pid = batch["pid"]
        out: dict[str, torch.Tensor] = {}
        m = cfg["cmmoco"]
        if m["weight"] > 0 and self.cmmoco is not None:
            out["cmmoco_loss"] = m["weight"] * self.cmmoco.loss(model, img, txt, batch)
            out["queue_fill"] = self.cmmoco.image_queue.valid.float().mean()
        i = cfg["id"]
        if i["weight"] > 0:
            out["id_loss"] = i["weight"] * id_loss(self.classifier, img_raw.float(), txt_raw.float(), pid,
                                                   i["smoothing"], reduction=i["reduction"])
        a = cfg["align"]
        if a["weight"] > 0:
            gather = gather_with_grad if cfg["gather"] else (lambda x: x)
            pid_g = gather_no_grad(pid) if cfg["gather"] else pid
            out["align_loss"] = a["weight"] * alignment_loss(
                img.float(), gather(txt).float(), pid, pid_g, scale_pos=a["scale_pos"], margin_pos=a["margin_pos"],
                scale_neg=a["scale_neg"], margin_neg=a["margin_neg"],
            )
        return out


class _Tap:
    """Delegates to the model and keeps the features of the batch's own image and tokens."""

    def __init__(self, model: nn.Module, batch: dict):
        self._model, self._batch = model, batch
        self.image: torch.Tensor | None = None
        self.text: torch.Tensor | None = None

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        f = self._model.encode_image(x)
        if x is self._batch["image"] and self.image is None:
            self.image = f
        return f

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        f = self._model.encode_text(x)
        if x is self._batch["tokens"] and self.text is None:
            self.text = f
        return f

    def __getattr__(self, name: str):
        return getattr(self._model, name)


@register("tbps-clip-cmmoco")
class TBPSCLIPCMMoCoObjective(TBPSCLIPObjective):
    """TBPS-CLIP's losses plus CM-MoCo as an extra term (``losses.cmmoco``)."""

    defaults = {**TBPS_CLIP_DEFAULTS, "cmmoco": dict(CMMOCO_DEFAULTS)}

    def __init__(self, model: nn.Module, losses: dict[str, Any], *, num_identities: int):
        super().__init__(model, losses, num_identities=num_identities)  # merges self.defaults, cmmoco included
        self.cmmoco: CMMoCo | None = build_cmmoco(model, self.cfg["cmmoco"])

    def configure(self, losses: dict[str, Any]) -> None:
        cfg = merge_losses(self.defaults, losses or {})
        _check_stage(self.cmmoco, cfg["cmmoco"])
        self.cfg = cfg

    def forward(self, model: nn.Module, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        tap = _Tap(model, batch)  # reuse TBPS-CLIP's forward pass instead of encoding twice
        out = super().forward(tap, batch, ctx)
        m = self.cfg["cmmoco"]
        if m["weight"] > 0 and self.cmmoco is not None:
            img = F.normalize(tap.image if tap.image is not None else model.encode_image(batch["image"]), dim=-1)
            txt = F.normalize(tap.text if tap.text is not None else model.encode_text(batch["tokens"]), dim=-1)
            out["cmmoco_loss"] = m["weight"] * self.cmmoco.loss(model, img, txt, batch)
        return out
