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
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

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
    from tbps.models.checkpoint import CheckpointError
    from tbps.models.fusion import FusionEncoder

    state = {k[len("fusion."):]: v for k, v in (ckpt.get("objective") or {}).items() if k.startswith("fusion.")}
    cfg = (ckpt.get("recipe") or {}).get("losses", {}).get("fusion")
    if not state or not cfg:
        raise CheckpointError(f"{ckpt.get('path', 'checkpoint')}: no fusion encoder to re-score with (train with "
                              "an objective that has one: laip, irra)")
    recipe = ckpt.get("recipe") or {}
    if recipe.get("objective") == "irra":
        raise CheckpointError(f"{ckpt.get('path', 'checkpoint')}: IRRA trains its fusion encoder for MLM only; its "
                              "ITM head is untrained, so it cannot re-score (train with the laip recipe)")
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
    from tbps.retrieval.metrics import retrieval_metrics

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


class SearchRescorer:
    """Top-k ITM re-scoring as a :meth:`tbps.index.GalleryIndex.search` ``reranker``.

    The index hook sees query features, not texts, so a rescorer is bound to the query texts
    of one search call::

        rescorer = SearchRescorer.from_checkpoint("runs/laip/best.pt")
        hits = index.search(encoder.encode_texts(texts), k=10, rerank_depth=128,
                            reranker=rescorer.for_texts(texts))

    (When the rescorer's model is the encoder's, ``for_texts(texts).query_features`` already
    are those stage-1 features: see :class:`BoundRescorer`.)

    Candidates' image token maps are computed from ``index.image_path(id)`` and cached
    (``cache_size`` images, least recently used dropped). Not thread-safe: callers that
    share one rescorer between threads serialise its calls (``tbps serve`` does).
    """

    def __init__(self, model, fusion, tokenizer, *, mode: str = "itm", weight: float = 0.002, max_words: int = 77,
                 device="cpu", cache_size: int = 4096):
        if mode not in MODES:
            raise ValueError(f"re-scoring mode {mode!r}: one of {MODES}")
        self.device = torch.device(device)
        self.model, self.fusion, self.tokenizer = model.eval(), fusion.to(self.device).eval(), tokenizer
        self.mode, self.weight, self.max_words = mode, weight, max_words
        self.cache_size = cache_size
        from collections import OrderedDict

        self._memory: OrderedDict = OrderedDict()

    @classmethod
    def from_checkpoint(cls, path, device="cpu", **kwargs) -> SearchRescorer:
        from tbps.models.checkpoint import load_model
        from tbps.models.checkpoint import max_words as checkpoint_max_words
        from tbps.models.factory import get_tokenizer

        model, ckpt = load_model(path, device)
        max_words = checkpoint_max_words(ckpt)
        return cls(model, load_fusion(ckpt, model), get_tokenizer(model.spec), max_words=max_words, device=device,
                   **kwargs)

    @classmethod
    def from_encoder(cls, encoder, **kwargs) -> SearchRescorer:
        """Re-score with the model a :class:`tbps.retrieval.encoder.Encoder` already holds (loaded once).

        Reads the fusion encoder from ``encoder.checkpoint``; a checkpoint without a trained
        one raises :class:`tbps.models.checkpoint.CheckpointError` (see :func:`load_fusion`).
        """
        from tbps.models.checkpoint import load_checkpoint

        ckpt = load_checkpoint(encoder.checkpoint)
        return cls(encoder.model, load_fusion(ckpt, encoder.model), encoder.tokenizer, max_words=encoder.max_words,
                   device=encoder.device, **kwargs)

    @torch.no_grad()
    def _image_memory(self, index, item_id: int) -> torch.Tensor:
        if item_id in self._memory:
            self._memory.move_to_end(item_id)
            return self._memory[item_id]
        from tbps.data.images import open_image
        from tbps.data.transforms import eval_transform
        from tbps.models.fusion import image_memory

        spec = self.model.spec
        im = open_image(index.image_path(item_id))
        x = eval_transform(im, self.model.image_size, spec.mean, spec.std)[None].to(self.device)
        mem = image_memory(self.model, x)[1][0]  # (1+N, D)
        self._memory[item_id] = mem
        if len(self._memory) > self.cache_size:
            self._memory.popitem(last=False)
        return mem

    def for_texts(self, texts: Sequence[str], depth: int | None = None) -> BoundRescorer:
        """The reranker callable for queries ``texts`` (same order as the query features).

        depth: re-score only each query's first ``depth`` candidates (the index hands them
        best first); the others keep their stage-1 order below every re-scored one, with
        the score ``s - s_top1 - 1`` (<= -1), as :func:`rescore_topk` places non-candidates.
        ``None``: re-score every candidate the index hands over.
        """
        return BoundRescorer(self, texts, depth)


class BoundRescorer:
    """A :class:`SearchRescorer` bound to one search call's texts: the ``reranker`` callable.

    One text pass (clean, tokenise, ``model.text_tokens``) gives both the token maps the
    fusion encoder reads and ``query_features``, the (Q, D) float32 L2-normalised stage-1
    query features: the pooled output of that pass, normalised as
    :func:`tbps.retrieval.encoder.text_features` normalises ``model.encode_text``, so a
    re-scored search need not encode its texts a second time::

        bound = rescorer.for_texts(texts, depth=128)
        hits = index.search(bound.query_features, k=10, reranker=bound, rerank_depth=128)

    After the call, ``seconds`` holds the time spent on the text pass and the fusion
    passes, ``stage1`` each query's ``{id: stage-1 score}`` of the candidates it saw, and
    ``rescored`` how many candidates each query had re-scored.
    """

    def __init__(self, rescorer: SearchRescorer, texts: Sequence[str], depth: int | None = None):
        from tbps.retrieval.encoder import tokenize_captions

        if depth is not None and depth < 1:
            raise ValueError(f"re-scoring needs depth >= 1, got {depth}")
        self.rescorer, self.depth = rescorer, depth
        self.stage1: list[dict[int, float]] = []
        self.rescored: list[int] = []
        r = rescorer
        t0 = time.perf_counter()
        with torch.no_grad():
            tok = tokenize_captions(r.tokenizer, texts, r.max_words).to(r.device)
            pooled, self.words, self.mask = r.model.text_tokens(tok)  # (Q, D), (Q, L, D), (Q, L)
            # text_tokens' pooled output is encode_text's; normalised as encoder.text_features does
            self.query_features = F.normalize(pooled.float(), dim=-1).cpu().numpy()  # (Q, D) float32
        self.seconds = time.perf_counter() - t0

    @torch.no_grad()
    def __call__(self, query_feats, cand_ids, cand_scores, index):
        import numpy as np

        r = self.rescorer
        t0 = time.perf_counter()
        ids, stage1 = np.asarray(cand_ids), np.asarray(cand_scores, dtype=np.float64)
        if ids.shape[0] != self.words.shape[0]:
            raise ValueError(f"rescorer bound to {self.words.shape[0]} texts got {ids.shape[0]} queries")
        out = np.full(ids.shape, -np.inf)
        self.stage1 = [{int(i): float(s) for i, s in zip(row, srow) if i >= 0} for row, srow in zip(ids, stage1)]
        self.rescored = []
        for qi in range(ids.shape[0]):
            valid = ids[qi] >= 0
            if self.depth is not None:  # the rest: stage-1 order, below every re-scored candidate
                rest = valid.copy()
                valid[self.depth:] = False
                rest[: self.depth] = False
                if rest.any():
                    out[qi, rest] = stage1[qi, rest] - stage1[qi, 0] - 1.0
            self.rescored.append(int(valid.sum()))
            if not valid.any():
                continue
            mem = torch.stack([r._image_memory(index, int(i)) for i in ids[qi][valid]])  # (K, 1+N, D)
            n = mem.shape[0]
            fused = r.fusion(self.words[qi:qi + 1].expand(n, -1, -1), self.mask[qi:qi + 1].expand(n, -1), mem)
            itm = r.fusion.itm_score(fused).float()[None]  # (1, K)
            if r.mode == "itm+itc":
                itc = torch.as_tensor(stage1[qi][valid], dtype=torch.float32)[None]
                itm = _minmax(itm) + r.weight * _minmax(itc)
            out[qi, valid] = itm[0].cpu().numpy()
        self.seconds += time.perf_counter() - t0
        return out
