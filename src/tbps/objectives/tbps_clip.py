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
    "nitc": {"weight": 1.0, "alpha": 0.5, "ramp_epochs": 1.0},
    "mvs": {"enabled": False},
    "ss": {"weight": 0.0, "temperature": 0.1, "hidden_dim": 128, "out_dim": 512},
    "ritc": {"weight": 1.0, "eps": 0.01},
    "citc": {"weight": 0.0},
    "gather": True,
}


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
        if cfg["nitc"]["weight"] > 0 and cfg["mvs"]["enabled"]:
            plan.append(Embedding("encode_image", "image_view2"))
        if cfg["ss"]["weight"] > 0:
            plan += [Embedding("encode_image", "ss_view1"), Embedding("encode_image", "ss_view2")]
        return plan

    def forward(self, model: nn.Module, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        gather = gather_with_grad if cfg["gather"] else (lambda x: x)
        img = F.normalize(model.encode_image(batch["image"]), dim=-1)  # (B, D)
        txt = F.normalize(model.encode_text(batch["tokens"]), dim=-1)  # (B, D)
        pid = batch["pid"]
        img_g, txt_g = gather(img), gather(txt)  # (G, D)
        pid_g = gather_no_grad(pid) if cfg["gather"] else pid
        scale = model.logit_scale.exp()
        out: dict[str, torch.Tensor] = {"logit_scale": scale.detach()}

        n = cfg["nitc"]
        if n["weight"] > 0:
            ramp = min(1.0, ctx.epoch / n["ramp_epochs"]) if n["ramp_epochs"] > 0 else 1.0
            alpha = n["alpha"] * ramp  # soft labels ramped in over the first epoch(s)
            loss = nitc_loss(img, txt, img_g, txt_g, pid, pid_g, scale, alpha)
            if cfg["mvs"]["enabled"]:
                if "image_view2" not in batch:
                    raise ValueError("losses.mvs is enabled but data.augment.mvs is off: no second view")
                img2 = F.normalize(model.encode_image(batch["image_view2"]), dim=-1)
                loss = 0.5 * (loss + nitc_loss(img2, txt, gather(img2), txt_g, pid, pid_g, scale, alpha))
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
