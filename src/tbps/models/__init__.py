"""Models: open_clip builds every architecture; ``TBPSModel`` adds token-level outputs.

Paper architectures come from open_clip by name (``ViT-B-16``, ``RN50``, ``RN101``,
``EVA02-B-16``) with weights by tag (``openai``) or a local checkpoint path. Tiny
architectures for CPU work are JSON files in ``model_configs/`` beside this file.

Inside the package: ``spec`` (what a model is; imports nothing of tbps) < ``text_stream``,
``hf_text`` (text towers) < ``text_towers`` (their registry) < ``tbps_model`` < ``factory`` <
``checkpoint``; ``fusion``, ``refine`` and ``momentum`` are parts that objectives add.
"""

from tbps.models.factory import create_model, get_tokenizer
from tbps.models.spec import CLIP_MEAN, CLIP_STD, ModelSpec, list_architectures
from tbps.models.tbps_model import TBPSModel

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ModelSpec",
    "TBPSModel",
    "create_model",
    "get_tokenizer",
    "list_architectures",
]
