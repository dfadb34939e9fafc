"""Top-k re-scoring with the fusion encoder's ITM head (ALBEF candidate selection; RaSa, APTM, LAIP).

Stage 1: the dual-encoder similarity ranks every gallery item; each query keeps its top k
(128 by default). Stage 2: the fusion encoder scores the k (query, candidate) pairs with
its ITM head, batched. Candidates are re-ordered by

* ``mode="itm"`` (RaSa): the match probability alone;
* ``mode="itm+itc"`` (APTM): minmax(ITM) + w * minmax(ITC) over the query's candidates, w = 0.002.

Non-candidates keep their stage-1 order, below every candidate (their scores are shifted
to at most -1, candidates' lie in [0, 1 + w]).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

MODES = ("itm", "itm+itc")


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def rescore_topk(similarity: torch.Tensor, pair_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 k: int = 128, mode: str = "itm", weight: float = 0.002, batch_pairs: int = 512) -> torch.Tensor:
    """(Q, G) stage-1 similarity -> (Q, G) re-scored matrix (higher is better).

    ``pair_scores(query_idx (P,), gallery_idx (P,)) -> (P,)`` match scores of P pairs; it is
    called on at most ``batch_pairs`` pairs at a time.
    """
    if mode not in MODES:
        raise ValueError(f"re-scoring mode {mode!r}: one of {MODES}")
    if k < 1:
        raise ValueError(f"re-scoring needs k >= 1, got {k}")
    q, g = similarity.shape
    k = min(k, g)
    top_s, top_i = similarity.topk(k, dim=1)  # (Q, k)
    qi = torch.arange(q).repeat_interleave(k)
    gi = top_i.flatten()
    scores = torch.cat([pair_scores(qi[s:s + batch_pairs], gi[s:s + batch_pairs]).float().cpu()
                        for s in range(0, q * k, batch_pairs)]).view(q, k)
    cand = scores if mode == "itm" else _minmax(scores) + weight * _minmax(top_s.float())
    if mode == "itm":
        cand = cand.clamp(0, 1)
    out = similarity.float() - similarity.float().max(dim=1, keepdim=True).values - 1.0  # <= -1, order kept
    return out.scatter_(1, top_i, cand)


class FusionScorer:
    """Pair scorer over cached text token maps (Q, L, D) and gallery image memories (G, 1+N, D)."""

    def __init__(self, fusion, words: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor, device="cpu"):
        self.fusion, self.words, self.mask, self.memory = fusion.eval(), words, mask, memory
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        d = self.device
        out = self.fusion(self.words[qi].to(d), self.mask[qi].to(d), self.memory[gi].to(d))
        return self.fusion.itm_score(out)


def load_fusion(ckpt: dict, model):
    """The fusion encoder trained with a checkpoint's objective (``objective.fusion.*``)."""
    from tbps.engine.checkpoint import CheckpointError
    from tbps.models.fusion import FusionEncoder

    state = {k[len("fusion."):]: v for k, v in (ckpt.get("objective") or {}).items() if k.startswith("fusion.")}
    cfg = (ckpt.get("recipe") or {}).get("losses", {}).get("fusion")
    if not state or not cfg:
        raise CheckpointError(f"{ckpt.get('path', 'checkpoint')}: no fusion encoder to re-score with (train with "
                              "an objective that has one: laip, irra)")
    vocab = state["mlm_head.3.weight"].shape[0]
    fusion = FusionEncoder(model.embed_dim, width=cfg["width"], layers=cfg["layers"], heads=cfg["heads"],
                           mlp_ratio=cfg["mlp_ratio"], vocab_size=vocab)
    fusion.load_state_dict(state)
    return fusion.eval()


@torch.no_grad()
def encode_tokens(model, tokenizer, captions: Sequence[str], image_paths: Sequence, *, max_words: int = 77,
                  batch_size: int = 128, device="cpu"):
    """Token maps for re-scoring: text words (Q, L, D), mask (Q, L), image memory (G, 1+N, D), on CPU."""
    from torch.utils.data import DataLoader

    from tbps.data.dataset import GalleryImages
    from tbps.data.text import clean_caption
    from tbps.models.fusion import image_memory

    words, masks, mems = [], [], []
    for s in range(0, len(captions), batch_size):
        tok = tokenizer([clean_caption(c, max_words) for c in captions[s:s + batch_size]]).to(device)
        _, w, m = model.text_tokens(tok)
        words.append(w.float().cpu())
        masks.append(m.cpu())
    spec = model.spec
    for x, _ in DataLoader(GalleryImages(image_paths, model.image_size, spec.mean, spec.std), batch_size=batch_size):
        mems.append(image_memory(model, x.to(device))[1].float().cpu())
    return torch.cat(words), torch.cat(masks), torch.cat(mems)


def rescore_evaluation(model, fusion, tokenizer, result, *, k: int = 128, mode: str = "itm",
                       weight: float = 0.002, max_words: int = 77, device="cpu", batch_pairs: int = 512) -> dict:
    """Re-score an :class:`tbps.engine.evaluate.EvalResult` (text-to-image) and time it.

    Returns {"t2i": metrics, "k", "mode", "seconds_per_query", "pairs"}; the timing covers the
    token maps and the fusion passes (stage 1 is already in ``result``).
    """
    from tbps.metrics import retrieval_metrics

    model.eval()
    fusion = fusion.to(device).eval()
    t0 = time.perf_counter()
    words, mask, memory = encode_tokens(model, tokenizer, result.captions, result.image_paths,
                                        max_words=max_words, device=device)
    scorer = FusionScorer(fusion, words, mask, memory, device)
    sim = rescore_topk(result.similarity, scorer, k=k, mode=mode, weight=weight, batch_pairs=batch_pairs)
    elapsed = time.perf_counter() - t0
    q = sim.shape[0]
    metrics = retrieval_metrics(sim, torch.tensor(result.caption_ids), torch.tensor(result.image_ids))
    return {"t2i": metrics, "k": min(k, sim.shape[1]), "mode": mode, "seconds_per_query": elapsed / max(q, 1),
            "pairs": q * min(k, sim.shape[1])}
