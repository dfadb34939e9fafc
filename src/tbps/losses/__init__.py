"""Losses, one per file, each with its formula in the docstring.

All contrastive losses take local queries against global (gathered) keys, so the
same code is exact in one process and under torchrun; ``identity_targets`` builds the
row-normalised same-person target matrix they share.
"""

from tbps.losses.alignment import alignment_loss
from tbps.losses.bidiratt import backward_attention, bidir_weights, bidiratt_loss
from tbps.losses.citc import citc_loss
from tbps.losses.cmmoco import CMMoCo, FeatureQueue, cmmoco_loss
from tbps.losses.common import identity_targets
from tbps.losses.ditc import ditc_loss
from tbps.losses.id_loss import id_loss
from tbps.losses.imc import imc_loss
from tbps.losses.imr import imr_loss
from tbps.losses.itc_queue import itc_queue_loss
from tbps.losses.itm import itm_loss, sample_hard_negatives
from tbps.losses.mlm import masked_token_loss
from tbps.losses.nitc import nitc_loss
from tbps.losses.ritc import ritc_loss
from tbps.losses.sdm import sdm_loss
from tbps.losses.simclr import simclr_loss
from tbps.losses.triplet import fusion_triplet_loss

__all__ = [
    "CMMoCo",
    "FeatureQueue",
    "alignment_loss",
    "backward_attention",
    "bidir_weights",
    "bidiratt_loss",
    "citc_loss",
    "ditc_loss",
    "cmmoco_loss",
    "fusion_triplet_loss",
    "id_loss",
    "imc_loss",
    "imr_loss",
    "identity_targets",
    "itc_queue_loss",
    "itm_loss",
    "masked_token_loss",
    "nitc_loss",
    "ritc_loss",
    "sample_hard_negatives",
    "sdm_loss",
    "simclr_loss",
]
