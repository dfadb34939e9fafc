"""A procedural synthetic pedestrian dataset in the CUHK-PEDES layout (``tbps synth``).

A tool beside the training pipeline (which never imports it): identities made of
fine-grained attributes, in families of near duplicates (:mod:`.attributes`); two captions
per image from a small grammar (:mod:`.captions`); one PIL drawing per camera view
(:mod:`.render`); the dataset written with its splits (:mod:`.write`).

``synthesize(out_dir, ids=300, images_per_id=4, seed=0)`` writes::

    out_dir/imgs/<split>/<id>_c<k>.jpg
    out_dir/reid_raw.json    # [{"split", "captions", "file_path", "processed_tokens", "id"}]

The same seed gives the same bytes. ``docs/synth.md`` describes it.
"""

from tbps.synth.attributes import (
    ATTRIBUTE_FIELDS,
    BAG_TYPES,
    COLOURS,
    GENDERS,
    HAIR_COLOURS,
    HAIR_LENGTHS,
    HEADWEAR_TYPES,
    LOWER_TYPES,
    PATTERNS,
    SHOE_COLOURS,
    SKIN_TONES,
    UPPER_TYPES,
    SynthError,
    attribute_distance,
    identity_key,
    sample_identities,
)
from tbps.synth.captions import CAPTION_WORDS, COLOUR_WORDS, RESERVED_SYNONYMS, described_caption, make_caption, tokenize
from tbps.synth.render import View, identity_shades, person_shades, render_image, render_person, sample_view
from tbps.synth.write import ANNOTATION_FILE, JPEG_QUALITY, SPLITS, assign_splits, planned_splits, synthesize

__all__ = [
    "ANNOTATION_FILE",
    "ATTRIBUTE_FIELDS",
    "BAG_TYPES",
    "CAPTION_WORDS",
    "COLOURS",
    "COLOUR_WORDS",
    "GENDERS",
    "HAIR_COLOURS",
    "HAIR_LENGTHS",
    "HEADWEAR_TYPES",
    "JPEG_QUALITY",
    "LOWER_TYPES",
    "PATTERNS",
    "RESERVED_SYNONYMS",
    "SHOE_COLOURS",
    "SKIN_TONES",
    "SPLITS",
    "UPPER_TYPES",
    "SynthError",
    "View",
    "assign_splits",
    "attribute_distance",
    "identity_key",
    "identity_shades",
    "described_caption",
    "make_caption",
    "person_shades",
    "planned_splits",
    "render_image",
    "render_person",
    "sample_identities",
    "sample_view",
    "synthesize",
    "tokenize",
]
