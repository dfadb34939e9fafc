"""The LAIP objective (Learning Local Alignment from Image-Phrase modelling).

Global alignment (image-text stream, ALBEF's losses):
* ITC against momentum keys and queues (identity-aware targets, optional momentum
  distillation) -- :func:`tbps.losses.itc_queue.itc_queue_loss`;
* ITM on the positive pair and two hard negatives drawn from the in-batch similarity --
  :mod:`tbps.losses.itm`;
* the fusion triplet loss on the match probabilities (margin 0.6) -- :mod:`tbps.losses.triplet`.

Local alignment (image-phrase stream; phrases and their masks come from the data
pipeline, :class:`tbps.data.masking.FusionBatchHook`):
* BidirAtt: forward (attention) and backward (gradient of the masked word's score with
  respect to that attention) weights at ``bidiratt.layer`` pool the patch features into a
  phrase-guided image feature, contrasted with the phrase -- :mod:`tbps.losses.bidiratt`;
* MPM: the masked word of the phrase predicted through the fusion encoder.

Losses with weight 0 are skipped, so the paper's two stages (global losses first, then all)
are ``stages:`` in the recipe, and its Table IV ablations are weight/mode overrides.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tbps.data.masking import IGNORE, FusionBatchHook, MaskSpec
from tbps.losses.gather import gather_no_grad
from tbps.losses.bidiratt import HEADS, MODES, backward_attention, bidir_weights, bidiratt_loss
from tbps.losses.itc_queue import itc_queue_loss
from tbps.losses.itm import itm_loss, sample_hard_negatives
from tbps.losses.mlm import masked_token_loss
from tbps.losses.triplet import fusion_triplet_loss
from tbps.models.fusion import build_fusion, image_memory
from tbps.objectives.base import Objective, StepContext, merge_losses, register

DEFAULTS: dict[str, Any] = {
    "itc": {"weight": 1.0, "queue_size": 65536, "momentum": 0.995, "alpha": 0.4},
    "itm": {"weight": 1.0},
    "triplet": {"weight": 1.0, "margin": 0.6},
    "bidiratt": {"weight": 1.0, "mode": "both", "layer": -2, "heads": "per_head", "detach": True},
    "mpm": {"weight": 1.0},
    # Which noun phrases the image-phrase stream draws from: min_words 2 keeps a modifier and its noun
    # (the paper's example phrase: "black hair (adjective+noun)"), 1 every noun chunk ("head", "pair").
    "phrases": {"min_words": 1},
    "fusion": {"width": 768, "layers": 6, "heads": 12, "mlp_ratio": 4.0},
}


@register("laip")
class LAIPObjective(Objective):
    not_cacheable = ("its ITM hard negatives pair each caption with other samples' image tokens inside the "
                     "fusion encoder, whose graph would then span the whole batch")
    defaults = DEFAULTS

    def __init__(self, model: nn.Module, losses: dict[str, Any], *, num_identities: int):
        super().__init__()
        from tbps.models.momentum import FeatureQueue
        from tbps.models.factory import get_tokenizer
        from tbps.models.momentum import MomentumEncoder

        self.configure(losses)
        self.mask_spec = MaskSpec.from_tokenizer(get_tokenizer(model.spec))
        self.fusion = build_fusion(model, self.cfg["fusion"])
        itc = self.cfg["itc"]
        dim = model.embed_dim
        # Momentum copy and queues exist whenever the recipe may switch ITC on (any stage).
        self.momentum = MomentumEncoder(model, itc["momentum"])
        self.image_queue = FeatureQueue(itc["queue_size"], dim)
        self.text_queue = FeatureQueue(itc["queue_size"], dim)
        self._phrase_table: dict[str, list[str]] | None = None

    def configure(self, losses: dict[str, Any]) -> None:
        cfg = merge_losses(self.defaults, losses or {})
        from tbps.recipes.config import ConfigError

        for key, allowed in (("mode", MODES), ("heads", HEADS)):
            if cfg["bidiratt"][key] not in allowed:
                raise ConfigError(f"losses.bidiratt.{key}: {cfg['bidiratt'][key]!r} is not one of {allowed}")
        layers, layer = cfg["fusion"]["layers"], cfg["bidiratt"]["layer"]
        if cfg["bidiratt"]["weight"] > 0 and not -layers <= layer < layers:
            raise ConfigError(f"losses.bidiratt.layer: {layer} is not a layer of the {layers}-layer fusion encoder "
                              f"(losses.fusion.layers)")
        self.cfg = cfg

    @property
    def _phrase_stream(self) -> bool:
        return self.cfg["bidiratt"]["weight"] > 0 or self.cfg["mpm"]["weight"] > 0

    def prepare_data(self, dataset) -> None:
        """Parse the training captions' noun phrases once (spaCy), before training starts; nothing
        to do (and no spaCy needed) while BidirAtt and MPM are off."""
        if self._phrase_table is not None or not self._phrase_stream:
            return
        from tbps.data.phrases import cached_noun_phrases

        caps = dataset.cleaned_captions()
        self._phrase_table = dict(zip(caps, cached_noun_phrases(caps)))

    def batch_hook(self, dataset=None) -> FusionBatchHook | None:
        """Phrases and their masked copies, when a local loss is on, looked up by the workers in
        the table :meth:`prepare_data` parsed (a caption missing there is parsed on the spot)."""
        if not self._phrase_stream:
            return None
        if self._phrase_table is None and dataset is not None:
            self.prepare_data(dataset)
        return FusionBatchHook(spec=self.mask_spec, phrases=True, phrase_table=self._phrase_table or {},
                               min_words=self.cfg["phrases"]["min_words"])

    # ------------------------------------------------------------------ pieces
    def _itc(self, model, batch, img, txt, scale) -> torch.Tensor:
        c = self.cfg["itc"]
        self.momentum.momentum = c["momentum"]
        self.momentum.update(model)  # here, before the keys (MoCo/ALBEF order), not in after_step
        enc = self.momentum.module
        with torch.no_grad():
            img_k = F.normalize(enc.encode_image(batch["image"]).float(), dim=-1)
            txt_k = F.normalize(enc.encode_text(batch["tokens"]).float(), dim=-1)
        pid = batch["pid"]
        loss = itc_queue_loss(img.float(), txt.float(), img_k, txt_k, self.image_queue.feats, self.text_queue.feats,
                              self.image_queue.ids, pid, 1.0 / scale, c["alpha"])
        pid_g = gather_no_grad(pid)
        self.image_queue.enqueue(gather_no_grad(img_k), pid_g)
        self.text_queue.enqueue(gather_no_grad(txt_k), pid_g)
        return loss

    def _matching(self, words, tmask, memory, img, txt, pid, scale) -> dict[str, torch.Tensor]:
        """ITM over (positive, text + hard negative image, hard negative text + image), and the triplet."""
        b = words.shape[0]
        with torch.no_grad():
            sim = scale * txt @ img.t()  # (B, B) text-to-image
        neg_img = sample_hard_negatives(sim, pid, pid)  # (B,) an image of another person per text
        neg_txt = sample_hard_negatives(sim.t(), pid, pid)  # (B,) a text of another person per image
        # One fusion pass over the 3B pairs.
        fused = self.fusion(torch.cat([words, words, words[neg_txt]]), torch.cat([tmask, tmask, tmask[neg_txt]]),
                            torch.cat([memory, memory[neg_img], memory]))
        logits = self.fusion.itm_logits(fused)  # (3B, 2)
        out = {}
        if self.cfg["itm"]["weight"] > 0:
            out["itm_loss"] = self.cfg["itm"]["weight"] * itm_loss(logits[:b], logits[b:])
        t = self.cfg["triplet"]
        if t["weight"] > 0:
            p = logits.softmax(dim=-1)[:, 1]
            out["triplet_loss"] = t["weight"] * fusion_triplet_loss(p[:b], p[b:2 * b], p[2 * b:], t["margin"])
        with torch.no_grad():
            out["itm_acc"] = (logits.argmax(-1) == torch.cat([torch.ones(b), torch.zeros(2 * b)]).to(logits.device)
                              ).float().mean()
        return out

    def _phrases(self, model, batch, memory, pid, scale) -> dict[str, torch.Tensor]:
        if "mpm_tokens" not in batch:
            raise ValueError("losses.bidiratt/mpm have weight > 0 but the batch has no phrases (Collate without "
                             "the objective's batch_hook)")
        cfg = self.cfg
        # A phrase is a few tokens of the context: the padding after the batch's longest is cut off
        # (the same outputs, text_length), which makes this stream's text passes several times cheaper.
        keep = model.text_length(torch.cat([batch["phrase_tokens"], batch["mpm_tokens"]]))
        phrase_tokens, mpm_tokens, labels = (batch[k][:, :keep] for k in ("phrase_tokens", "mpm_tokens", "mpm_labels"))
        _, pw, pmask = model.text_tokens(mpm_tokens)  # (B, Lp, D)
        fused = self.fusion(pw, pmask, memory)
        chosen = labels != IGNORE  # one position per phrase
        logits = self.fusion.mlm_logits(fused, chosen)  # (M, V)
        out = {}
        if cfg["mpm"]["weight"] > 0:
            out["mpm_loss"] = cfg["mpm"]["weight"] * masked_token_loss(logits, labels[chosen])
        out["mpm_acc"] = (logits.detach().argmax(-1) == labels[chosen]).float().mean()
        ba = cfg["bidiratt"]
        if ba["weight"] > 0:
            attn = fused.cross_attn[ba["layer"]]  # (B, H, Lp, 1+N)
            grad = None
            if ba["mode"] != "forward":
                # The masked word's true-label logit; rows without a word get a zero score.
                score = torch.zeros(labels.shape[0], device=logits.device, dtype=logits.dtype)
                rows = chosen.any(dim=1)
                score = score.index_put((rows.nonzero().flatten(),),
                                        logits.gather(1, labels[chosen][:, None]).squeeze(1))
                grad = backward_attention(score, attn)
            weights = bidir_weights(attn, grad, ba["mode"], skip=1, heads=ba["heads"], detach=ba["detach"])  # (B, N)
            phrase = model.encode_text(phrase_tokens)  # (B, D)
            names = batch["phrases"]
            same = torch.tensor([[a == b for b in names] for a in names], device=pid.device)
            targets = ((pid[:, None] == pid[None, :]) | same).float()
            targets = targets / targets.sum(dim=1, keepdim=True)
            out["bidiratt_loss"] = ba["weight"] * bidiratt_loss(weights, memory[:, 1:], phrase, targets, scale)
        return out

    def forward(self, model: nn.Module, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        img_raw, memory = image_memory(model, batch["image"])  # (B, D), (B, 1+N, D)
        txt_raw, words, tmask = model.text_tokens(batch["tokens"])  # (B, D), (B, L, D), (B, L)
        img, txt = F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1)
        pid = batch["pid"]
        scale = model.scale()
        out: dict[str, torch.Tensor] = {"logit_scale": scale.detach()}
        if cfg["itc"]["weight"] > 0:
            out["itc_loss"] = cfg["itc"]["weight"] * self._itc(model, batch, img, txt, scale)
        if cfg["itm"]["weight"] > 0 or cfg["triplet"]["weight"] > 0:
            out.update(self._matching(words, tmask, memory, img, txt, pid, scale))
        if self._phrase_stream:
            out.update(self._phrases(model, batch, memory, pid, scale))
        return out
