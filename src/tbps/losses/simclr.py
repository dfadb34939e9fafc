"""SS: SimCLR's NT-Xent on two augmented views of each image (Chen et al. 2020; TBPS-CLIP).

For 2N projected views z (N local pairs against 2G global keys):
L = -1/(2N) sum_i log( exp(z_i . z_p(i) / T) / sum_{k != i} exp(z_i . z_k / T) ), T = 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simclr_loss(
    z1_local: torch.Tensor,
    z2_local: torch.Tensor,
    z1_global: torch.Tensor,
    z2_global: torch.Tensor,
    offset: int = 0,
    temperature: float = 0.1,
) -> torch.Tensor:
    """z*: (B, D) local and (G, D) global projections (normalised here).

    ``offset`` is where the local rows sit inside the global batch (rank * B), so a
    query's own view is excluded and its partner view found.
    """
    q = F.normalize(torch.cat([z1_local, z2_local]), dim=-1)  # (2B, D)
    k = F.normalize(torch.cat([z1_global, z2_global]), dim=-1)  # (2G, D)
    b, g = z1_local.shape[0], z1_global.shape[0]
    logits = q @ k.t() / temperature  # (2B, 2G)
    rows = torch.arange(2 * b, device=q.device)
    local_idx = offset + torch.arange(b, device=q.device)
    self_col = torch.cat([local_idx, local_idx + g])  # each query's own column
    partner_col = torch.cat([local_idx + g, local_idx])
    logits = logits.masked_fill(
        torch.zeros_like(logits, dtype=torch.bool).index_put_((rows, self_col), torch.tensor(True)), float("-inf")
    )
    return F.cross_entropy(logits, partner_col)
