"""BidirAtt: bidirectional-attention-weighted image-phrase alignment (LAIP).

For an (image, masked phrase) pair through the fusion encoder, at one cross-attention
layer with probabilities A (B, H, L, N) (after the softmax):

* forward attention  F_h,n = A[h, 0, n]  (the phrase's first token to patch n, per head h);
* backward attention G_h,n = relu(d s / d A[h, 0, n]), s the logit of the masked word's true
  label (Grad-CAM's gradient, read on the same entries; detached);
* bidirectional weights, the Grad-CAM map ALBEF draws for its ITM visualisation:
  w = normalise(mean_h F_h * G_h) (``heads="per_head"``, default; LAIP's extracted text averages
  each over the heads first, normalise(mean_h F_h * mean_h G_h): ``heads="mean_first"``);
  forward only: normalise(mean_h F_h); backward only: normalise(mean_h G_h); summing to 1 over the
  patches (the global image token is skipped, as ALBEF's ``[:, :, :, 1:]``);
* phrase-guided image feature v = sum_n w_n p_n over the patch features p_n (B, N, D); the
  weights are detached by default (``detach``: the map is a pooling weight, as Grad-CAM is computed
  outside the graph), so the loss trains the patch and phrase features, not the attention;
* L = 1/2 [CE(s_v2p, y) + CE(s_p2v, y)], s = tau^-1 cos(v_i, phrase_j), with targets y the
  row-normalised mask of pairs that show the same person or the same phrase text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("forward", "backward", "both")


def backward_attention(score: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """d score.sum() / d attn, (B, H, L, N); each row's score depends only on its own maps.

    The graph is kept (the losses still need it); the result carries no graph.
    """
    (grad,) = torch.autograd.grad(score.sum(), attn, retain_graph=True)
    return grad


HEADS = ("per_head", "mean_first")


def bidir_weights(attn: torch.Tensor, grad: torch.Tensor | None, mode: str = "both",
                  skip: int = 1, heads: str = "per_head", detach: bool = True) -> torch.Tensor:
    """attn, grad (B, H, L, N) -> (B, N - skip) patch weights summing to 1.

    ``skip`` leading memory tokens (the global image token) are not patches. Row 0 (the
    phrase's first token) is read. ``heads``: how ``both`` meets the heads (module docstring).
    ``detach``: no gradient through the weights. A row whose weights are all 0 (e.g. a zero
    gradient) falls back to uniform.
    """
    if mode not in MODES:
        raise ValueError(f"bidiratt mode {mode!r}: one of {MODES}")
    if heads not in HEADS:
        raise ValueError(f"bidiratt heads {heads!r}: one of {HEADS}")
    fwd = attn[:, :, 0, skip:]  # (B, H, N')
    if mode == "forward":
        w = fwd.mean(dim=1)
    else:
        bwd = grad[:, :, 0, skip:].clamp_min(0).detach()  # (B, H, N')
        if mode == "backward":
            w = bwd.mean(dim=1)
        elif heads == "per_head":
            w = (fwd * bwd).mean(dim=1)
        else:
            w = fwd.mean(dim=1) * bwd.mean(dim=1)
    if detach:
        w = w.detach()
    total = w.sum(dim=1, keepdim=True)
    uniform = torch.full_like(w, 1.0 / w.shape[1])
    return torch.where(total > 0, w / total.clamp_min(1e-12), uniform)


def bidiratt_loss(weights: torch.Tensor, patches: torch.Tensor, phrase_feats: torch.Tensor,
                  targets: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """weights (B, N), patches (B, N, D), phrase_feats (B, D), targets (B, B) rows summing to 1."""
    v = F.normalize(torch.einsum("bn,bnd->bd", weights, patches), dim=-1)
    p = F.normalize(phrase_feats, dim=-1)
    s = logit_scale * v @ p.t()  # (B, B)
    ce = lambda logits, t: -(t * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return 0.5 * (ce(s, targets) + ce(s.t(), targets.t() / targets.t().sum(dim=1, keepdim=True)))
