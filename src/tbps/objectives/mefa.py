"""The MeFa objective (Multi-path Exploration and Feedback Adjustment, Kang et al.).

Global alignment (the baseline): N-ITC (+ R-ITC) on the dual encoders' global features, as
the EVA-CLIP TBPS baseline trains. Three paths on top, each switched by its weight:

* **IMR, intra-modal reasoning** -- hard negatives made in the data pipeline:
  IMR(T) ``imr_text``: rewritten captions in three tiers (:mod:`tbps.data.negatives.text`,
  refreshed every epoch) against the image: L_imr + L_imc with the image as anchor, its caption
  as positive and the caption's rewrites as negatives;
  IMR(V) ``imr_image``: an image of another person among the anchor image's top-k neighbours in
  a feature bank of the current model (:mod:`tbps.data.negatives.image`, refreshed every
  ``refresh_every`` epochs), with the caption as anchor and its image as positive.
  Paper symbols -> keys: alpha (eq. 1) = ``imr.margin``, gamma (eq. 2) = ``imr.gamma``;
  L_imr and L_imc are weighted by ``imr.imr_weight`` / ``imr.imc_weight`` inside each path.
* **CMR, cross-modal refinement** ``cmr`` -- patch and word tokens re-weighted by cross-modal
  affinity and gated with the global feature (eqs. 3-5, :mod:`tbps.models.refine`), then N-ITC
  (eq. 6) on the refined features. ``cmr.detach: true`` cuts the refiner's inputs (and the logit
  scale) from the graph, so the loss trains the refiner alone: a stage before the one that trains
  CMR for real can warm the new module on the encoders' features without moving them (linear
  probing before fine-tuning), so its first gradients into the encoders do not come from random
  weights. Not in the paper (its refiner starts with the pretrained encoders, at the same step); tried
  in ``mefa-cpu`` and not adopted (docs/laip-irra-log.md, a fifth session).
* **DCC, discriminative clue correction** ``dcc`` -- the secondary-similarity words of each
  caption (not the top ``skip_top``, not the bottom ``skip_bottom``) pooled into a clue feature
  and contrasted with the images by D-ITC (eq. 7, :mod:`tbps.losses.ditc`).

Inference is unchanged: a dual encoder on global features, so ``tbps index``/``search`` work
as for every recipe. The refiner is a training-time module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tbps.losses.gather import gather_no_grad, gather_with_grad
from tbps.losses import ditc_loss, imc_loss, imr_loss, nitc_loss, ritc_loss
from tbps.objectives.base import Objective, StepContext, merge_losses, register

DEFAULTS: dict[str, Any] = {
    "nitc": {"weight": 1.0, "alpha": 0.5, "ramp_epochs": 1.0},
    "ritc": {"weight": 1.0, "eps": 0.01},
    "imr": {"margin": 0.2, "gamma": 10.0, "imr_weight": 1.0, "imc_weight": 1.0},
    "imr_text": {"weight": 1.0, "tiers": [1, 2, 3], "mlm": None, "mlm_top_k": 50},
    "imr_image": {"weight": 1.0, "top_k": 10, "refresh_every": 1, "bank_batch_size": 256},
    "cmr": {"weight": 1.0, "temperature": 1.0, "token_scale": "none", "detach": False},
    "dcc": {"weight": 1.0, "skip_top": 3, "words": 4, "skip_bottom": 3},
    "gather": True,
}


@dataclass
class NegativeCaptionHook:
    """Adds ``neg_tokens`` (B, T, L) and ``neg_valid`` (B, T) to a collated batch: the epoch's
    rewrites of each caption, one per tier (runs in the DataLoader workers). A caption missing
    from the epoch's table (e.g. changed by text augmentation) is rewritten on the spot."""

    table: dict[str, list[str | None]]
    tiers: tuple[int, ...]
    generator: Any = None
    epoch: int = 0

    def __call__(self, batch: dict, tokenizer) -> dict:
        rows = []
        for c in batch["captions"]:
            negs = self.table.get(c)
            if negs is None and self.generator is not None:
                negs = self.generator.negatives(c, self.epoch)
            rows.append(list(negs) if negs else [None] * len(self.tiers))
        b, t = len(rows), len(self.tiers)
        toks = tokenizer([n or "" for r in rows for n in r])
        batch["neg_tokens"] = toks.view(b, t, -1)
        batch["neg_valid"] = torch.tensor([[n is not None for n in r] for r in rows], dtype=torch.bool)
        return batch


@register("mefa")
class MeFaObjective(Objective):
    not_cacheable = ("its IMR negatives encode rewritten captions that are not batch entries and its CMR "
                     "refines each sample's tokens against the other modality's")
    defaults = DEFAULTS

    def __init__(self, model: nn.Module, losses: dict[str, Any], *, num_identities: int):
        super().__init__()
        from tbps.data.masking import MaskSpec
        from tbps.models.factory import get_tokenizer
        from tbps.models.refine import CrossModalRefiner

        self.configure(losses)
        self.mask_spec = MaskSpec.from_tokenizer(get_tokenizer(model.spec))
        cmr = self.cfg["cmr"]
        self.refiner = CrossModalRefiner(model.embed_dim, cmr["temperature"], cmr["token_scale"])
        self._text_gen = None
        self._captions: list[str] = []
        self._table: dict[str, list[str | None]] = {}
        self._table_epoch = -1
        self._neighbors: torch.Tensor | None = None  # (N_records, k) image hard negatives
        self._bank_epoch = -1

    def configure(self, losses: dict[str, Any]) -> None:
        self.cfg = merge_losses(self.defaults, losses or {})
        from tbps.models.refine import TOKEN_SCALES
        from tbps.recipes.config import ConfigError

        bad = set(self.cfg["imr_text"]["tiers"]) - {1, 2, 3}
        if bad:
            raise ConfigError(f"losses.imr_text.tiers: {sorted(bad)} not among the tiers 1, 2, 3")
        if self.cfg["cmr"]["token_scale"] not in TOKEN_SCALES:
            raise ConfigError(f"losses.cmr.token_scale: {self.cfg['cmr']['token_scale']!r} is not none (eq. 3 as "
                              "printed) or count")

    # -------------------------------------------------------------- data hooks
    def _generator(self):
        if self._text_gen is None:
            from tbps.data.negatives.text import TextNegatives

            c = self.cfg["imr_text"]
            self._text_gen = TextNegatives(tiers=tuple(c["tiers"]), mlm=c["mlm"], seed=0, mlm_top_k=c["mlm_top_k"])
        return self._text_gen

    def prepare_data(self, dataset) -> None:
        """Parse the training captions once (spaCy, cached on disk), before the time budget starts."""
        if self.cfg["imr_text"]["weight"] <= 0 or self._captions:
            return
        self._captions = dataset.cleaned_captions()
        self._generator().prepare(self._captions)

    def on_epoch_start(self, model: nn.Module, dataset, *, epoch: int, device, progress: bool = False) -> None:
        """Refresh the epoch's text rewrites and, every ``refresh_every`` epochs, the image bank."""
        if self.cfg["imr_text"]["weight"] > 0 and self._table_epoch != epoch:
            if not self._captions:
                self.prepare_data(dataset)
            self._table = self._generator().epoch_table(self._captions, epoch, progress=progress)
            self._table_epoch = epoch
        c = self.cfg["imr_image"]
        if c["weight"] <= 0:
            dataset.negatives = None
            return
        due = self._neighbors is None or (epoch % max(1, c["refresh_every"]) == 0 and self._bank_epoch != epoch)
        if due:
            from tbps.data.negatives.image import bank_batches, hard_negative_images
            from tbps.retrieval.encoder import encode_image_batches

            bs = c["bank_batch_size"]
            feats = encode_image_batches(model, bank_batches(dataset, bs), device=device, progress=progress,
                                         desc="image bank", total=-(-len(dataset.records) // bs))
            pids = torch.tensor([dataset.pid_index[r.pid] for r in dataset.records])
            self._neighbors = hard_negative_images(feats, pids, c["top_k"])
            self._bank_epoch = epoch
        dataset.negatives = self._neighbors

    def batch_hook(self, dataset=None) -> NegativeCaptionHook | None:
        if self.cfg["imr_text"]["weight"] <= 0:
            return None
        gen = self._generator()
        if not gen.tiers:
            return None
        return NegativeCaptionHook(table=self._table, tiers=tuple(gen.tiers), generator=gen,
                                   epoch=max(self._table_epoch, 0))

    # The bank's neighbours travel in checkpoints, so a resumed run trains on the same negatives.
    def get_extra_state(self) -> dict:
        return {"bank_epoch": self._bank_epoch, "neighbors": self._neighbors}

    def set_extra_state(self, state: dict) -> None:
        self._bank_epoch = state.get("bank_epoch", -1)
        self._neighbors = state.get("neighbors")

    # ------------------------------------------------------------------ forward
    def forward(self, model: nn.Module, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        gather = gather_with_grad if cfg["gather"] else (lambda x: x)
        img_raw, patches = model.image_tokens(batch["image"])  # (B, D), (B, N, D)
        txt_raw, words, tmask = model.text_tokens(batch["tokens"])  # (B, D), (B, L, D), (B, L)
        img, txt = F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1)
        pid = batch["pid"]
        img_g, txt_g = gather(img), gather(txt)
        pid_g = gather_no_grad(pid) if cfg["gather"] else pid
        scale = model.scale()
        out: dict[str, torch.Tensor] = {"logit_scale": scale.detach()}

        n = cfg["nitc"]
        ramp = min(1.0, ctx.epoch / n["ramp_epochs"]) if n["ramp_epochs"] > 0 else 1.0
        if n["weight"] > 0:
            out["nitc_loss"] = n["weight"] * nitc_loss(img, txt, img_g, txt_g, pid, pid_g, scale, n["alpha"] * ramp)
        if cfg["ritc"]["weight"] > 0:
            out["ritc_loss"] = cfg["ritc"]["weight"] * ritc_loss(img, txt, img_g, txt_g, pid, pid_g, scale,
                                                                cfg["ritc"]["eps"])
        imr = cfg["imr"]
        if cfg["imr_text"]["weight"] > 0:
            if "neg_tokens" not in batch:
                raise ValueError("losses.imr_text has weight > 0 but the batch has no negative captions "
                                 "(Collate without the objective's batch_hook, or every tier is off)")
            negs, valid = _encode_text_negatives(model, batch["neg_tokens"], batch["neg_valid"], txt.shape[-1])
            w = cfg["imr_text"]["weight"]
            out["imr_t_loss"] = w * imr["imr_weight"] * imr_loss(img, txt, negs, valid, imr["margin"])
            out["imc_t_loss"] = w * imr["imc_weight"] * imc_loss(img, txt, negs, valid, imr["gamma"])
            out["neg_t_valid"] = valid.float().mean()
        if cfg["imr_image"]["weight"] > 0:
            if "neg_image" not in batch:
                raise ValueError("losses.imr_image has weight > 0 but the batch has no negative images "
                                 "(the objective's on_epoch_start did not run)")
            negs = F.normalize(model.encode_image(batch["neg_image"]), dim=-1)[:, None]  # (B, 1, D)
            valid = torch.ones(negs.shape[:2], dtype=torch.bool, device=negs.device)
            w = cfg["imr_image"]["weight"]
            out["imr_v_loss"] = w * imr["imr_weight"] * imr_loss(txt, img, negs, valid, imr["margin"])
            out["imc_v_loss"] = w * imr["imc_weight"] * imc_loss(txt, img, negs, valid, imr["gamma"])
        c = cfg["cmr"]
        if c["weight"] > 0:
            self.refiner.token_scale = c["token_scale"]  # a stage may change it
            feats, cmr_scale = (patches, img_raw, words, tmask, txt_raw), scale
            if c["detach"]:  # the refiner alone learns: nothing reaches the encoders or the scale
                feats, cmr_scale = tuple(f.detach() for f in feats), scale.detach()
            r_v, r_t = self.refiner(*feats)
            r_v, r_t = F.normalize(r_v, dim=-1), F.normalize(r_t, dim=-1)
            out["cmr_loss"] = c["weight"] * nitc_loss(r_v, r_t, gather(r_v), gather(r_t), pid, pid_g, cmr_scale,
                                                      n["alpha"] * ramp)
        d = cfg["dcc"]
        if d["weight"] > 0:
            from tbps.models.refine import select_clue_words

            wmask = tmask & self.mask_spec.maskable(batch["tokens"])
            wn = F.normalize(words, dim=-1)
            sim = torch.einsum("bld,bd->bl", wn, img.detach())
            chosen = select_clue_words(sim, wmask, d["skip_top"], d["words"], d["skip_bottom"]).to(wn.dtype)
            clue = F.normalize((wn * chosen[..., None]).sum(1) / chosen.sum(1, keepdim=True).clamp_min(1), dim=-1)
            out["dcc_loss"] = d["weight"] * ditc_loss(clue, img, gather(clue), img_g, pid, pid_g, scale)
        return out


def _encode_text_negatives(model, tokens: torch.Tensor, valid: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, L) ids, (B, T) -> normalised (B, T, D) features (zeros where invalid), valid.
    Only the valid rewrites go through the text encoder."""
    b, t, l = tokens.shape
    flat = valid.flatten().nonzero().flatten()
    if not flat.numel():
        return torch.zeros(b, t, dim, device=tokens.device), valid
    enc = F.normalize(model.encode_text(tokens.view(b * t, l)[flat]), dim=-1)
    return enc.new_zeros(b * t, enc.shape[-1]).index_copy(0, flat, enc).view(b, t, -1), valid
