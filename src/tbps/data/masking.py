"""Token masking for the fusion encoder's masked-token losses, done in the data pipeline.

* MLM (IRRA, BERT): each real caption token is chosen with probability 0.15; a chosen
  token becomes [MASK] 80% of the time, a random vocabulary token 10%, and stays 10%.
  Labels are the original ids at chosen positions and -100 elsewhere.
* MPM (LAIP): a noun phrase of the caption is tokenised alone and one of its tokens is
  replaced by [MASK] (always; the paper replaces "one word in the phrase with [MASK]").

Padding (0) and the start/end tokens are never chosen. CLIP's BPE vocabulary has no mask
token: the id ``vocab_size - 3`` (49405, the last BPE merge, a rare emoji-piece) is
used as [MASK], as IRRA repurposes a vocabulary slot for it.

:class:`FusionBatchHook` is what :class:`tbps.data.dataset.Collate` calls to add these
inputs to a batch (``mlm_tokens``/``mlm_labels``, ``phrase_tokens``/``mpm_tokens``/``mpm_labels``).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

import torch

IGNORE = -100


@dataclass(frozen=True)
class MaskSpec:
    """Ids the masking needs: [MASK], the vocabulary size and the never-masked special ids."""

    mask_id: int = 49405
    vocab_size: int = 49408
    special_ids: tuple[int, ...] = (0, 49406, 49407)
    random_range: tuple[int, int] = (1, 49405)  # [low, high) ids drawn for MLM's random replacements

    @classmethod
    def from_tokenizer(cls, tokenizer) -> MaskSpec:
        """CLIP BPE (no mask token: ``vocab_size - 3``) or a tokenizer with ``mask_token_id`` (BERT)."""
        vocab = int(getattr(tokenizer, "vocab_size", 49408))
        sot, eot = getattr(tokenizer, "sot_token_id", 49406), getattr(tokenizer, "eot_token_id", 49407)
        mask = int(getattr(tokenizer, "mask_token_id", vocab - 3))
        low, high = getattr(tokenizer, "random_range", (1, vocab - 3))
        return cls(mask_id=mask, vocab_size=vocab, special_ids=(0, int(sot), int(eot)), random_range=(low, high))

    def maskable(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> bool (B, L): real word tokens (not padding, start/end or [MASK])."""
        return ~torch.isin(tokens, torch.tensor(self.special_ids + (self.mask_id,), device=tokens.device))


def mlm_mask(tokens: torch.Tensor, spec: MaskSpec, prob: float = 0.15,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: (B, L) ids -> (masked inputs (B, L), labels (B, L) with -100 where not chosen).

    A row whose draw chose nothing gets one random word token chosen, so every caption
    with a word contributes (IRRA's batches of 64 make an empty draw rare; tiny ones do not).
    """
    ok = spec.maskable(tokens)
    u = torch.rand(tokens.shape, generator=generator)
    chosen = (u < prob) & ok
    empty = ~chosen.any(dim=1) & ok.any(dim=1)
    if empty.any():  # one random word of each empty row
        noise = torch.rand(tokens.shape, generator=generator).masked_fill(~ok, -1.0)
        pick = noise.argmax(dim=1)
        chosen[empty.nonzero().flatten(), pick[empty]] = True
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE))
    r = torch.rand(tokens.shape, generator=generator)
    inputs = tokens.clone()
    inputs[chosen & (r < 0.8)] = spec.mask_id
    rand_pos = chosen & (r >= 0.8) & (r < 0.9)
    # Random replacements from the ordinary ids (CLIP: BPE ids 1..49404; never padding or specials).
    rand_ids = torch.randint(*spec.random_range, tokens.shape, generator=generator)
    inputs[rand_pos] = rand_ids[rand_pos]
    return inputs, labels


def mpm_mask(tokens: torch.Tensor, spec: MaskSpec,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask one word token per row (phrases tokenised alone): -> (inputs, labels), one label per
    row that has a word token."""
    ok = spec.maskable(tokens)
    noise = torch.rand(tokens.shape, generator=generator).masked_fill(~ok, -1.0)
    pick = noise.argmax(dim=1)  # (B,)
    rows = ok.any(dim=1).nonzero().flatten()
    labels = torch.full_like(tokens, IGNORE)
    labels[rows, pick[rows]] = tokens[rows, pick[rows]]
    inputs = tokens.clone()
    inputs[rows, pick[rows]] = spec.mask_id
    return inputs, labels


def phrase_words(phrase: str) -> int:
    """Words of a parsed phrase: its tokens holding a letter ("t - shirt" is two, "," none)."""
    return sum(any(ch.isalpha() for ch in w) for w in phrase.split())


@dataclass
class FusionBatchHook:
    """Adds masked-token inputs to a collated batch (runs in DataLoader workers).

    ``mlm_prob > 0``: ``mlm_tokens`` and ``mlm_labels`` (B, L) from the caption tokens; with
    ``mlm_samples`` = k > 0, (k, L) from the batch's first k captions only (min(k, B)).
    ``phrases``: one noun phrase per caption drawn at random -> ``phrase_tokens`` (B, L),
    ``mpm_tokens`` and ``mpm_labels`` (one [MASK] inside the phrase). ``phrase_table`` maps a
    cleaned caption to its phrases (parsed once up front); a caption missing from it is
    parsed on the spot; a caption without a noun phrase uses its first four words.
    ``min_words``: draw only among the caption's phrases of at least that many words ("black
    hair", not "head" or the "pair" of "a pair of blue trainers"), all of them when it has none.
    """

    spec: MaskSpec = field(default_factory=MaskSpec)
    mlm_prob: float = 0.0
    mlm_samples: int = 0
    phrases: bool = False
    phrase_table: dict[str, list[str]] = field(default_factory=dict)
    min_words: int = 1
    seed: int = 0
    _calls: int = 0

    def _phrases_of(self, caption: str) -> list[str]:
        if caption not in self.phrase_table:
            from tbps.data.phrases import noun_phrases

            self.phrase_table[caption] = noun_phrases([caption])[0]
        phrases = self.phrase_table[caption] or [" ".join(caption.split()[:4])]
        if self.min_words > 1:
            return [p for p in phrases if phrase_words(p) >= self.min_words] or phrases
        return phrases

    def __call__(self, batch: dict, tokenizer) -> dict:
        self._calls += 1
        key = zlib.crc32("\x00".join(batch["captions"]).encode())
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self._calls) * 4_294_967_311 + key) % 2**63)
        if self.mlm_prob > 0:
            tokens = batch["tokens"][: self.mlm_samples] if self.mlm_samples > 0 else batch["tokens"]
            batch["mlm_tokens"], batch["mlm_labels"] = mlm_mask(tokens, self.spec, self.mlm_prob, g)
        if self.phrases:
            rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=g)))
            chosen = [rng.choice(self._phrases_of(c)) for c in batch["captions"]]
            batch["phrases"] = chosen
            batch["phrase_tokens"] = tokenizer(chosen)
            batch["mpm_tokens"], batch["mpm_labels"] = mpm_mask(batch["phrase_tokens"], self.spec, g)
        return batch
