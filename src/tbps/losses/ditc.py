"""D-ITC: MeFa's discriminative-clue contrastive loss (paper eq. 7).

Each caption's clue feature r_i (the mean of its secondary-similarity word features,
:func:`tbps.models.refine.select_clue_words`) is contrasted with the images' global features
v_j, in both directions, with identity-aware targets q (row-normalised same-person mask):

    L_ditc = 1/2 [ CE(s * r v^T, q) + CE(s * v r^T, q) ],   s = 1 / tau

Eq. 7 as extracted is garbled (its numerator and denominator index different things); this is
the InfoNCE form it describes: the clue of text i should pick out the images of its person.
Features are L2-normalised by the caller; ``logit_scale`` is 1 / tau.
"""

from __future__ import annotations

import torch

from tbps.losses.common import identity_targets


def _ce(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return -(q * logits.log_softmax(dim=1)).sum(dim=1).mean()


def ditc_loss(clue_local: torch.Tensor, image_local: torch.Tensor, clue_global: torch.Tensor,
              image_global: torch.Tensor, pids_local: torch.Tensor, pids_global: torch.Tensor,
              logit_scale: float | torch.Tensor) -> torch.Tensor:
    """Local (B, D) queries against global (G, D) keys (gathered across processes)."""
    q = identity_targets(pids_local, pids_global)
    return 0.5 * (_ce(logit_scale * clue_local @ image_global.t(), q)
                  + _ce(logit_scale * image_local @ clue_global.t(), q))
