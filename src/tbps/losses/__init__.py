"""Losses, one per file, each with its formula in the docstring.

All contrastive losses take local queries against global (gathered) keys, so the
same code is exact in one process and under torchrun; ``identity_targets`` builds the
row-normalised same-person target matrix they share.
"""

from tbps.losses.alignment import alignment_loss
from tbps.losses.citc import citc_loss
from tbps.losses.cmmoco import CMMoCo, FeatureQueue, cmmoco_loss
from tbps.losses.common import identity_targets
from tbps.losses.id_loss import id_loss
from tbps.losses.nitc import nitc_loss
from tbps.losses.ritc import ritc_loss
from tbps.losses.simclr import simclr_loss

__all__ = [
    "CMMoCo",
    "FeatureQueue",
    "alignment_loss",
    "citc_loss",
    "cmmoco_loss",
    "id_loss",
    "identity_targets",
    "nitc_loss",
    "ritc_loss",
    "simclr_loss",
]
