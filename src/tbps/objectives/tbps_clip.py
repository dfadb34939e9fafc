"""The TBPS-CLIP objective: N-ITC (+MVS) + SS + R-ITC + C-ITC, each switchable by weight.

Features are L2-normalised; every contrastive term contrasts this process's rows with
the global batch gathered across processes (the paper's "global gradients").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tbps.losses.gather import gather_no_grad, gather_with_grad, rank_offset
from tbps.losses import citc_loss, nitc_loss, ritc_loss, simclr_loss
from tbps.objectives.base import Embedding, Objective, StepContext, merge_losses, register

DEFAULTS: dict[str, Any] = {
    # soft_targets: where N-ITC's soft labels come from. same_pass: this forward's similarities,
    # detached; second_pass: a second forward of the same batch under no_grad, in train mode (fresh
    # dropout), as TBPS-CLIP's code does (one more forward of every image and caption per step).
    "nitc": {"weight": 1.0, "alpha": 0.5, "ramp_epochs": 1.0, "soft_targets": "same_pass"},
    "mvs": {"enabled": False},
    "ss": {"weight": 0.0, "temperature": 0.1, "hidden_dim": 128, "out_dim": 512},
    "ritc": {"weight": 1.0, "eps": 0.01},
    "citc": {"weight": 0.0},
    "gather": True,
}


def _second_pass(mode: str) -> bool:
    if mode not in ("same_pass", "second_pass"):
        from tbps.recipes.config import ConfigError

        raise ConfigError(f"losses.nitc.soft_targets must be same_pass or second_pass, got {mode!r}")
    return mode == "second_pass"


def _soft_logits(img_s: torch.Tensor, txt_s: torch.Tensor, scale: torch.Tensor,
                 gather: bool) -> dict[str, torch.Tensor]:
    """Scaled similarities of second-pass features, local rows against global columns: (B, G) each."""
    s, g = scale.detach(), (gather_no_grad if gather else (lambda x: x))
    return {"soft_i2t": s * img_s @ g(txt_s).t(), "soft_t2i": s * txt_s @ g(img_s).t()}


@register("tbps-clip")
class TBPSCLIPObjective(Objective):
    defaults = DEFAULTS

    def __init__(self, model: nn.Module, losses: dict[str, Any], *, num_identities: int):
        super().__init__()
        self.cfg = merge_losses(self.defaults, losses or {})  # a subclass's defaults (tbps-clip-cmmoco) included
        ss = self.cfg["ss"]
        dim = model.embed_dim
        # SimCLR projector (TBPS-CLIP: 512-128-512); built whenever SS may be switched on.
        self.ss_head = nn.Sequential(
            nn.Linear(dim, ss["hidden_dim"]), nn.ReLU(inplace=True), nn.Linear(ss["hidden_dim"], ss["out_dim"])
        ) if ss["weight"] > 0 else None

    def configure(self, losses: dict[str, Any]) -> None:
        self.cfg = merge_losses(self.defaults, losses or {})

    not_cacheable = None  # every term is a function of per-sample encoder outputs (train.grad_cache_chunk)

    def embeddings(self) -> list[Embedding]:
        """forward's encoder calls, in its order (gradient caching)."""
        cfg = self.cfg
        plan = [Embedding("encode_image", "image"), Embedding("encode_text", "tokens")]
        n = cfg["nitc"]
        second = n["weight"] > 0 and n["alpha"] > 0 and _second_pass(n["soft_targets"])
        if second:  # the soft targets' no-grad second pass (forward skips it while the ramp is at 0)
            plan += [Embedding("encode_text", "tokens", grad=False, call=1),
                     Embedding("encode_image", "image", grad=False, call=1)]
        if n["weight"] > 0 and cfg["mvs"]["enabled"]:
            plan.append(Embedding("encode_image", "image_view2"))
            if second:
                plan.append(Embedding("encode_image", "image_view2", grad=False, call=1))
        if cfg["ss"]["weight"] > 0:
            plan += [Embedding("encode_image", "ss_view1"), Embedding("encode_image", "ss_view2")]
        return plan

    @staticmethod
    def _soft_features(encode, x: torch.Tensor) -> torch.Tensor:
        """Normalised features of a second forward pass without a graph (train mode: fresh dropout)."""
        with torch.no_grad():
            return F.normalize(encode(x).float(), dim=-1)

    def forward(self, model: nn.Module, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        gather = gather_with_grad if cfg["gather"] else (lambda x: x)
        img = F.normalize(model.encode_image(batch["image"]), dim=-1)  # (B, D)
        txt = F.normalize(model.encode_text(batch["tokens"]), dim=-1)  # (B, D)
        pid = batch["pid"]
        img_g, txt_g = gather(img), gather(txt)  # (G, D)
        pid_g = gather_no_grad(pid) if cfg["gather"] else pid
        scale = model.scale()
        out: dict[str, torch.Tensor] = {"logit_scale": scale.detach()}

        n = cfg["nitc"]
        if n["weight"] > 0:
            ramp = min(1.0, ctx.epoch / n["ramp_epochs"]) if n["ramp_epochs"] > 0 else 1.0
            alpha = n["alpha"] * ramp  # soft labels ramped in over the first epoch(s)
            second = _second_pass(n["soft_targets"]) and alpha > 0
            txt_s = self._soft_features(model.encode_text, batch["tokens"]) if second else None
            soft = (_soft_logits(self._soft_features(model.encode_image, batch["image"]), txt_s, scale, cfg["gather"])
                    if second else {})
            loss = nitc_loss(img, txt, img_g, txt_g, pid, pid_g, scale, alpha, **soft)
            if cfg["mvs"]["enabled"]:
                if "image_view2" not in batch:
                    raise ValueError("losses.mvs is enabled but data.augment.mvs is off: no second view")
                img2 = F.normalize(model.encode_image(batch["image_view2"]), dim=-1)
                soft2 = (_soft_logits(self._soft_features(model.encode_image, batch["image_view2"]), txt_s, scale,
                                      cfg["gather"]) if second else {})
                loss = 0.5 * (loss + nitc_loss(img2, txt, gather(img2), txt_g, pid, pid_g, scale, alpha, **soft2))
            out["nitc_loss"] = n["weight"] * loss
        r = cfg["ritc"]
        if r["weight"] > 0:
            out["ritc_loss"] = r["weight"] * ritc_loss(img, txt, img_g, txt_g, pid, pid_g, scale, r["eps"])
        c = cfg["citc"]
        if c["weight"] > 0:
            out["citc_loss"] = c["weight"] * citc_loss(img, txt, img_g, txt_g)
        s = cfg["ss"]
        if s["weight"] > 0:
            if "ss_view1" not in batch or self.ss_head is None:
                raise ValueError("losses.ss has weight > 0 but data.augment.ss_views is off")
            z1 = self.ss_head(model.encode_image(batch["ss_view1"]))
            z2 = self.ss_head(model.encode_image(batch["ss_view2"]))
            out["ss_loss"] = s["weight"] * simclr_loss(
                z1, z2, gather(z1), gather(z2), offset=rank_offset(z1.shape[0]) if cfg["gather"] else 0,
                temperature=s["temperature"],
            )
        return out
