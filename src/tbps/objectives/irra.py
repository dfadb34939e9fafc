"""The IRRA objective (Jiang & Ye, CVPR'23): SDM + ID + MLM through a fusion encoder.

* SDM on L2-normalised global features with a fixed logit scale (50, temperature 0.02);
  the model's learnable logit scale is not used by IRRA's losses.
* ID: one linear classifier over the training identities shared by the unnormalised
  image and text features.
* MLM: caption tokens masked in the data pipeline (15%, 80/10/10; ``mlm_tokens`` /
  ``mlm_labels`` from :class:`tbps.data.masking.FusionBatchHook`), their word tokens
  cross-attend to the image tokens in the fusion encoder, a vocabulary head predicts them.
  ``mlm.vocabulary``: ``all`` (IRRA: a softmax over the tokenizer's whole vocabulary, 49,408
  for CLIP) or ``training`` (over the tokens of the training captions only, found once from the
  set :meth:`prepare_data` keeps; a masked token outside them, possible only with text augmentation that
  adds words, is left out of the loss). The head's last layer costs M x W x V a step: on CPU,
  at the tiny recipes' sizes, about 40 % of what MLM adds to a step (docs/laip-irra-log.md, a second session).
  ``mlm.samples``: 0 (IRRA: every caption of the batch) or k > 0, MLM on the batch's first k captions
  only (per process; in a shuffled batch, a random k): the masked captions' text pass and the fusion encoder then
  run on k rows, a CPU setting that makes the MLM step cheaper. Not with gradient caching (refused).

The fusion encoder is the objective's (saved under ``objective.fusion.*``); IRRA uses it
only for training, but it can also re-score at inference (``tbps eval --rescore``) once
an ITM head is trained (LAIP).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tbps.data.masking import FusionBatchHook, MaskSpec
from tbps.losses.gather import gather_no_grad, gather_with_grad
from tbps.losses.id_loss import id_loss
from tbps.losses.mlm import masked_token_loss
from tbps.losses.sdm import sdm_loss
from tbps.models.fusion import build_fusion, image_memory
from tbps.objectives.base import Embedding, Objective, StepContext, merge_losses, register

FUSION_DEFAULTS = {"width": 512, "layers": 4, "heads": 8, "mlp_ratio": 4.0}

DEFAULTS: dict[str, Any] = {
    "sdm": {"weight": 1.0, "logit_scale": 50.0},
    "id": {"weight": 1.0, "label_smoothing": 0.0},
    "mlm": {"weight": 1.0, "prob": 0.15, "vocabulary": "all", "samples": 0},
    "fusion": dict(FUSION_DEFAULTS),
    "gather": True,
}


@register("irra")
class IRRAObjective(Objective):
    defaults = DEFAULTS

    def __init__(self, model: nn.Module, losses: dict[str, Any], *, num_identities: int):
        super().__init__()
        self.configure(losses)
        from tbps.models.factory import get_tokenizer

        self._spec = model.spec
        self._dataset = None  # the training set (prepare_data)
        self._support: torch.Tensor | None = None  # mlm.vocabulary: training -> (S,) token ids (_find_support)
        self._remap: torch.Tensor | None = None  # (V,) token id -> its index in _support (-100 outside)
        self.mask_spec = MaskSpec.from_tokenizer(get_tokenizer(model.spec))
        self.classifier = nn.Linear(model.embed_dim, num_identities)
        nn.init.normal_(self.classifier.weight, std=0.001)  # IRRA's init
        nn.init.zeros_(self.classifier.bias)
        self.fusion = build_fusion(model, self.cfg["fusion"])
        # IRRA's losses use a fixed scale (SDM's 1/0.02) and no ITM: mark those untrained, so that
        # "every trainable parameter gets a gradient" holds (AdamW skipped them anyway: no grad).
        model.logit_scale.requires_grad_(False)
        self.fusion.itm_head.requires_grad_(False)

    def configure(self, losses: dict[str, Any]) -> None:
        from tbps.recipes.config import ConfigError

        self.cfg = merge_losses(self.defaults, losses or {})
        if self.cfg["mlm"]["vocabulary"] not in ("all", "training"):
            raise ConfigError(f"losses.mlm.vocabulary {self.cfg['mlm']['vocabulary']!r}: all or training")
        if self.cfg["mlm"]["samples"] < 0:
            raise ConfigError(f"losses.mlm.samples {self.cfg['mlm']['samples']}: 0 (every caption) or a count > 0")

    @classmethod
    def cache_refusal(cls, losses: dict[str, Any]) -> str | None:
        mlm = merge_losses(cls.defaults, losses or {})["mlm"]
        if mlm["weight"] > 0 and mlm["samples"] > 0:
            return "losses.mlm.samples > 0 masks a part of the batch, which gradient caching cannot split"
        return cls.not_cacheable

    def prepare_data(self, dataset) -> None:
        """Keep the training set: with ``mlm.vocabulary: training`` (from the start or from a later stage)
        its captions' token ids become the MLM softmax's support at the first step that needs them."""
        self._dataset = dataset

    def _find_support(self) -> None:
        """The token ids of every training caption, cleaned and tokenised as the data pipeline does."""
        if self._dataset is None:
            raise ValueError("losses.mlm.vocabulary: training needs the training captions first "
                             "(the trainer calls prepare_data(dataset) before the first step)")
        from tbps.models.factory import get_tokenizer

        tokenizer, caps = get_tokenizer(self._spec), self._dataset.cleaned_captions()
        ids = torch.unique(torch.cat([tokenizer(caps[i : i + 1024]).flatten() for i in range(0, len(caps), 1024)]))
        ids = ids[~torch.isin(ids, torch.tensor(self.mask_spec.special_ids + (self.mask_spec.mask_id,)))]
        self._support = ids
        self._remap = torch.full((self.fusion.config["vocab_size"],), -100, dtype=torch.long)
        self._remap[ids] = torch.arange(len(ids))

    def _mlm_targets(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the head's support or None for all, the labels of the chosen positions in its order)."""
        if self.cfg["mlm"]["vocabulary"] == "all":
            return None, labels
        if self._support is None:
            self._find_support()
        if self._support.device != labels.device:
            self._support, self._remap = self._support.to(labels.device), self._remap.to(labels.device)
        return self._support, self._remap[labels]

    # SDM and ID are functions of the global features; MLM of the image tokens and the masked captions'
    # word tokens, all cached per sample (the fusion encoder and the heads run on the whole batch).
    not_cacheable = None

    def embeddings(self) -> list[Embedding]:
        """forward's encoder calls, in its order (gradient caching)."""
        mlm = self.cfg["mlm"]["weight"] > 0
        plan = [Embedding("image_tokens" if mlm else "encode_image", "image"), Embedding("encode_text", "tokens")]
        return plan + [Embedding("text_tokens", "mlm_tokens")] if mlm else plan

    def batch_hook(self, dataset=None) -> FusionBatchHook | None:
        """Masked captions for MLM, made in the data pipeline."""
        m = self.cfg["mlm"]
        if m["weight"] <= 0:
            return None
        return FusionBatchHook(spec=self.mask_spec, mlm_prob=m["prob"], mlm_samples=m["samples"])

    def forward(self, model: nn.Module, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        gather = gather_with_grad if cfg["gather"] else (lambda x: x)
        need_tokens = cfg["mlm"]["weight"] > 0
        if need_tokens:
            img_raw, memory = image_memory(model, batch["image"])  # (B, D), (B, 1+N, D)
        else:
            img_raw = model.encode_image(batch["image"])
        txt_raw = model.encode_text(batch["tokens"])  # (B, D)
        img, txt = F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1)
        pid = batch["pid"]
        out: dict[str, torch.Tensor] = {}
        if cfg["sdm"]["weight"] > 0:
            pid_g = gather_no_grad(pid) if cfg["gather"] else pid
            out["sdm_loss"] = cfg["sdm"]["weight"] * sdm_loss(
                img, txt, gather(img), gather(txt), pid, pid_g, cfg["sdm"]["logit_scale"])
        if cfg["id"]["weight"] > 0:
            out["id_loss"] = cfg["id"]["weight"] * id_loss(
                self.classifier, img_raw.float(), txt_raw.float(), pid, cfg["id"]["label_smoothing"])
        if need_tokens:
            if "mlm_tokens" not in batch:
                raise ValueError("losses.mlm has weight > 0 but the batch has no mlm_tokens (Collate without the "
                                 "objective's batch_hook)")
            _, words, mask = model.text_tokens(batch["mlm_tokens"])  # (k, L, D), (k, L): k = B, or mlm.samples
            fused = self.fusion(words, mask, memory[: words.shape[0]])
            chosen = batch["mlm_labels"] != -100
            support, labels = self._mlm_targets(batch["mlm_labels"][chosen])
            logits = self.fusion.mlm_logits(fused, chosen, support)  # (M, V) or (M, S)
            if support is not None:  # tokens outside the training captions' (none without text augmentation)
                logits, labels = logits[labels != -100], labels[labels != -100]
            out["mlm_loss"] = cfg["mlm"]["weight"] * masked_token_loss(logits, labels)
            if labels.numel():
                out["mlm_acc"] = (logits.detach().argmax(-1) == labels).float().mean()
        return out
