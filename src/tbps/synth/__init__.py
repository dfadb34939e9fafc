"""A procedural synthetic pedestrian dataset in the CUHK-PEDES layout (``tbps synth``).

Each identity is a set of fine-grained attributes (gender, hair, upper and lower garment
with colours and pattern, shoes, bag, headwear). Identities come in "families": a base
identity and siblings that differ from it in one or two attributes, so that retrieval
has to read details rather than the overall look. Each image is a different "camera"
view of its identity (facing, pose, scale, position, lighting, background clutter, blur,
occlusion) drawn with PIL; each image gets two captions written from the attributes
with varied templates, synonyms, clause order and occasional omission of minor details.

Entry point: ``synthesize(out_dir, ids=300, images_per_id=4, seed=0)`` writes::

    out_dir/imgs/<split>/<id>_c<k>.jpg
    out_dir/reid_raw.json    # [{"split", "captions", "file_path", "processed_tokens", "id"}]

The vocabulary is data at the top of this module: ``COLOURS`` (RGB of each colour name),
the value tables (``UPPER_TYPES``, ``LOWER_TYPES``, ...) and ``CAPTION_WORDS``, which
lists every word or phrase a caption may use for each attribute value. Words that are
deliberately never used (``RESERVED_SYNONYMS``, e.g. "crimson", "slacks", "rucksack")
are left free for tests of robustness to unseen synonyms. ``docs/synth.md`` describes it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tbps.files import atomic_write

# --------------------------------------------------------------------------------------
# Vocabulary: attribute tables (exported; other code reads these).
# --------------------------------------------------------------------------------------

# Garment / bag / headwear / shoe colours, as rendered (RGB before lighting). Chosen to
# stay distinguishable under the modest per-identity and per-camera jitter below.
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (236, 236, 232),
    "grey": (128, 128, 128),
    "red": (200, 28, 32),
    "blue": (30, 70, 200),
    "green": (30, 140, 50),
    "yellow": (235, 205, 30),
    "orange": (240, 125, 20),
    "purple": (120, 40, 150),
    "pink": (240, 130, 180),
    "brown": (115, 70, 35),
}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (22, 20, 20),
    "brown": (95, 58, 30),
    "blonde": (215, 180, 100),
    "grey": (150, 150, 150),
}
SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (241, 200, 170), (224, 172, 135), (198, 140, 100), (150, 100, 70), (105, 70, 50),
)  # not an attribute: never captioned, sampled per identity for realism

GENDERS = ("man", "woman")
HAIR_LENGTHS = ("short", "long")
UPPER_TYPES = ("t-shirt", "shirt", "jacket", "coat", "sweater", "hoodie", "tank top", "dress")
LOWER_TYPES = ("trousers", "jeans", "shorts", "skirt", "long skirt")  # none with a dress
PATTERNS = ("plain", "striped", "checked", "dotted")
BAG_TYPES = ("none", "backpack", "shoulder bag", "handbag")
HEADWEAR_TYPES = ("none", "cap", "hat", "beanie")
SHOE_COLOURS = ("black", "white", "grey", "brown", "red", "blue")

# The attribute fields of an identity, in a fixed order (identity key = these values).
# Colour fields are None when their item is absent (no bag, no headwear, dress = no lower).
ATTRIBUTE_FIELDS = (
    "gender", "hair_length", "hair_colour",
    "upper_type", "upper_colour", "pattern",
    "lower_type", "lower_colour",
    "shoe_colour",
    "bag_type", "bag_colour",
    "headwear", "headwear_colour",
)

# Every word or phrase a caption may use for each value; nothing else names an attribute.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLOURS}
COLOUR_WORDS["grey"] = ("grey", "gray")
CAPTION_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "gender": {
        "man": ("man", "guy", "male", "gentleman", "young man", "boy"),
        "woman": ("woman", "lady", "girl", "female", "young woman"),
    },
    "hair_length": {"short": ("short",), "long": ("long",)},
    "hair_colour": {
        "black": ("black", "dark"), "brown": ("brown",), "blonde": ("blonde", "blond"),
        "grey": ("grey", "gray"),
    },
    "upper_type": {
        "t-shirt": ("t-shirt", "tee", "short-sleeved t-shirt"),
        "shirt": ("shirt", "long-sleeved shirt", "button-up shirt"),
        "jacket": ("jacket", "zip-up jacket"),
        "coat": ("coat", "long coat", "overcoat"),
        "sweater": ("sweater", "jumper", "pullover"),
        "hoodie": ("hoodie", "hooded sweatshirt"),
        "tank top": ("tank top", "sleeveless top"),
        "dress": ("dress", "short dress"),
    },
    "pattern": {
        "plain": ("plain",),
        "striped": ("striped", "stripy"),
        "checked": ("checked", "plaid", "checkered"),
        "dotted": ("polka-dot", "dotted", "spotted"),
    },
    "lower_type": {
        "trousers": ("trousers", "pants"),
        "jeans": ("jeans", "denim jeans"),
        "shorts": ("shorts",),
        "skirt": ("skirt", "short skirt", "miniskirt"),
        "long skirt": ("long skirt", "maxi skirt", "ankle-length skirt"),
    },
    "shoes": {"shoes": ("shoes", "sneakers", "trainers")},
    "bag_type": {
        "backpack": ("backpack",),
        "shoulder bag": ("shoulder bag", "messenger bag", "crossbody bag"),
        "handbag": ("handbag", "purse"),
    },
    "headwear": {"cap": ("cap", "baseball cap"), "hat": ("hat", "wide-brimmed hat"),
                 "beanie": ("beanie", "knit beanie")},
    "colour": COLOUR_WORDS,
}
# Common synonyms that captions never use, kept free for "unseen synonym" tests.
RESERVED_SYNONYMS: dict[str, str] = {
    "crimson": "red", "scarlet": "red", "navy": "blue", "azure": "blue",
    "slacks": "trousers", "rucksack": "backpack", "tote": "handbag",
    "sneaker": "shoes", "fedora": "hat", "cardigan": "sweater",
}

_PLURAL_LOWER = {"trousers", "jeans", "shorts"}
# Sampling weights (gender-dependent where it matters): realism, not fairness claims.
_HAIR_LONG_P = {"man": 0.12, "woman": 0.75}
_HAIR_COLOUR_P = {"black": 0.45, "brown": 0.3, "blonde": 0.15, "grey": 0.1}
_UPPER_P = {"man": {"t-shirt": 3, "shirt": 2, "jacket": 2, "coat": 1, "sweater": 1.5, "hoodie": 1.5, "tank top": 0.5},
            "woman": {"t-shirt": 3, "shirt": 1.5, "jacket": 2, "coat": 1, "sweater": 1.5, "hoodie": 1, "tank top": 1,
                      "dress": 1.5}}
_LOWER_P = {"man": {"trousers": 3, "jeans": 3, "shorts": 1.5},
            "woman": {"trousers": 2, "jeans": 2.5, "shorts": 1, "skirt": 1.5, "long skirt": 1}}
_PATTERN_P = {"plain": 0.6, "striped": 0.15, "checked": 0.15, "dotted": 0.1}
_BAG_P = {"none": 0.35, "backpack": 0.3, "shoulder bag": 0.2, "handbag": 0.15}
_HEADWEAR_P = {"none": 0.6, "cap": 0.2, "hat": 0.1, "beanie": 0.1}
# A family is a base identity plus 0-3 siblings, each 1-2 attributes away from the base.
_FAMILY_SIZE_P = {1: 0.15, 2: 0.3, 3: 0.3, 4: 0.25}
# Attributes a sibling may change, with weights (colours dominate: the hardest to read).
_MUTABLE_P = {"hair_length": 1, "hair_colour": 1, "upper_type": 1.5, "upper_colour": 3, "pattern": 1.5,
              "lower_type": 1, "lower_colour": 2.5, "shoe_colour": 1.5, "bag": 2, "headwear": 1.5, "gender": 0.5}

SPLITS = ("train", "val", "test")
ANNOTATION_FILE = "reid_raw.json"
JPEG_QUALITY = 90


class SynthError(ValueError):
    """A bad argument to ``synthesize`` (printed as one line by the CLI)."""

    user_error = True


# --------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """One key of ``weights``, drawn with probability proportional to its weight."""
    x = rng.random() * sum(weights.values())
    for key, wt in weights.items():
        x -= wt
        if x < 0:
            return key
    return key


def _valid(a: dict[str, Any]) -> bool:
    if a["gender"] == "man" and (a["upper_type"] == "dress" or a["lower_type"] in ("skirt", "long skirt")):
        return False
    if (a["upper_type"] == "dress") != (a["lower_type"] is None):
        return False
    if (a["lower_type"] is None) != (a["lower_colour"] is None):
        return False
    if (a["bag_type"] == "none") != (a["bag_colour"] is None):
        return False
    return (a["headwear"] == "none") == (a["headwear_colour"] is None)


def _sample_field(rng: np.random.Generator, a: dict[str, Any], field: str) -> None:
    """Resample one attribute (or attribute group) of ``a`` in place."""
    colours = list(COLOURS)
    g = a["gender"]
    if field == "gender":
        a["gender"] = g = _pick(rng, {"man": 1, "woman": 1})
        a["hair_length"] = "long" if rng.random() < _HAIR_LONG_P[g] else "short"
    elif field == "hair_length":
        a["hair_length"] = "long" if rng.random() < _HAIR_LONG_P[g] else "short"
    elif field == "hair_colour":
        a["hair_colour"] = _pick(rng, _HAIR_COLOUR_P)
    elif field == "upper_type":
        a["upper_type"] = _pick(rng, _UPPER_P[g])
        if a["upper_type"] == "dress":
            a["lower_type"] = a["lower_colour"] = None
        elif a["lower_type"] is None:
            _sample_field(rng, a, "lower_type")
    elif field == "upper_colour":
        a["upper_colour"] = colours[int(rng.integers(len(colours)))]
    elif field == "pattern":
        a["pattern"] = _pick(rng, _PATTERN_P)
    elif field == "lower_type":
        if a["upper_type"] == "dress":
            a["lower_type"] = a["lower_colour"] = None
        else:
            a["lower_type"] = _pick(rng, _LOWER_P[g])
            if a["lower_colour"] is None:
                _sample_field(rng, a, "lower_colour")
    elif field == "lower_colour":
        if a["lower_type"] is not None:
            # Jeans are mostly blue, black or grey, as in the street.
            if a["lower_type"] == "jeans" and rng.random() < 0.7:
                a["lower_colour"] = ("blue", "black", "grey")[int(rng.integers(3))]
            else:
                a["lower_colour"] = colours[int(rng.integers(len(colours)))]
    elif field == "shoe_colour":
        a["shoe_colour"] = SHOE_COLOURS[int(rng.integers(len(SHOE_COLOURS)))]
    elif field == "bag":
        a["bag_type"] = _pick(rng, _BAG_P)
        a["bag_colour"] = None if a["bag_type"] == "none" else colours[int(rng.integers(len(colours)))]
    elif field == "headwear":
        a["headwear"] = _pick(rng, _HEADWEAR_P)
        a["headwear_colour"] = None if a["headwear"] == "none" else colours[int(rng.integers(len(colours)))]
    else:  # pragma: no cover - internal table error
        raise KeyError(field)


def _sample_base(rng: np.random.Generator) -> dict[str, Any]:
    a: dict[str, Any] = {f: None for f in ATTRIBUTE_FIELDS}
    a["gender"] = _pick(rng, {"man": 1, "woman": 1})
    a["upper_type"] = "t-shirt"  # placeholder so lower_type sampling sees a non-dress
    for field in ("hair_length", "hair_colour", "upper_type", "upper_colour", "pattern", "lower_type",
                  "lower_colour", "shoe_colour", "bag", "headwear"):
        _sample_field(rng, a, field)
    return a


def identity_key(attrs: dict[str, Any]) -> tuple:
    """The tuple of attribute values that makes an identity unique."""
    return tuple(attrs[f] for f in ATTRIBUTE_FIELDS)


def attribute_distance(a: dict[str, Any], b: dict[str, Any]) -> int:
    """Number of attributes in which two identities differ.

    Bag (type + colour) and headwear (type + colour) count as one attribute each when only
    their presence changes, so "adds a black backpack" is one difference.
    """
    d = 0
    for f in ATTRIBUTE_FIELDS:
        if f in ("bag_colour", "headwear_colour", "lower_colour") and (a[f] is None or b[f] is None):
            continue  # counted with its type field
        d += a[f] != b[f]
    return d


def sample_identities(n: int, seed: int = 0) -> tuple[list[dict[str, Any]], list[int]]:
    """Sample ``n`` unique identities in families; returns (attributes, family index) lists.

    Identity ``i`` (0-based) becomes person id ``i + 1``. Each attribute dict holds the
    ``ATTRIBUTE_FIELDS`` plus ``skin`` (an RGB tuple, rendered but never captioned).
    Siblings in a family differ from the family's base identity in 1-2 attributes.
    """
    rng = np.random.default_rng([seed, 7001])
    seen: set[tuple] = set()
    out: list[dict[str, Any]] = []
    families: list[int] = []
    fam = 0
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise SynthError(f"could not sample {n} distinct identities (only {len(out)} found)")
        base = _sample_base(rng)
        if not _valid(base) or identity_key(base) in seen:
            continue
        members = [base]
        size = min(int(_pick(rng, {str(k): v for k, v in _FAMILY_SIZE_P.items()})), n - len(out))
        keys = {identity_key(base)}
        for _ in range(8 * size):
            if len(members) >= size:
                break
            sib = dict(base)
            fields = list(_MUTABLE_P)
            w = np.asarray([_MUTABLE_P[f] for f in fields])
            k = 1 if rng.random() < 0.6 else 2
            for j in rng.choice(len(fields), size=k, replace=False, p=w / w.sum()):
                _sample_field(rng, sib, fields[int(j)])
            key = identity_key(sib)
            if _valid(sib) and key not in seen and key not in keys and 1 <= attribute_distance(base, sib) <= 2:
                members.append(sib)
                keys.add(key)
        for m in members:
            m["skin"] = SKIN_TONES[int(rng.integers(len(SKIN_TONES)))]
            seen.add(identity_key(m))
            out.append(m)
            families.append(fam)
        fam += 1
    return out, families


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------

def _ch(rng: np.random.Generator, options: Iterable[str]) -> str:
    options = tuple(options)
    return options[int(rng.random() * len(options))]  # rng.random is ~5x cheaper than integers


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _colour(rng: np.random.Generator, c: str) -> str:
    return _ch(rng, COLOUR_WORDS[c])


def _upper_np(rng, a, with_pattern: bool) -> str:
    """'a red striped t-shirt' / 'a red t-shirt with stripes' / 'a red t-shirt'."""
    noun = _ch(rng, CAPTION_WORDS["upper_type"][a["upper_type"]])
    col = _colour(rng, a["upper_colour"])
    pat = a["pattern"]
    if not with_pattern or pat == "plain":
        return _a(f"{col} {noun}")
    if rng.random() < 0.3:
        tail = {"striped": "with stripes", "checked": "with a checked pattern", "dotted": "with polka dots"}[pat]
        return _a(f"{col} {noun} {tail}")
    return _a(f"{col} {_ch(rng, CAPTION_WORDS['pattern'][pat])} {noun}")


def _lower_np(rng, a) -> str:
    noun = _ch(rng, CAPTION_WORDS["lower_type"][a["lower_type"]])
    col = _colour(rng, a["lower_colour"])
    if a["lower_type"] in _PLURAL_LOWER:
        return f"a pair of {col} {noun}" if rng.random() < 0.25 else f"{col} {noun}"
    return _a(f"{col} {noun}")


def _shoes_np(rng, a) -> str:
    noun = _ch(rng, CAPTION_WORDS["shoes"]["shoes"])
    col = _colour(rng, a["shoe_colour"])
    return f"a pair of {col} {noun}" if rng.random() < 0.25 else f"{col} {noun}"


def _hair_np(rng, a, plain: bool = False) -> str:
    """'short black hair', sometimes 'black hair that is short' (not in lists: plain=True)."""
    length = a["hair_length"]
    col = _ch(rng, CAPTION_WORDS["hair_colour"][a["hair_colour"]])
    if plain or rng.random() < 0.85:
        return f"{length} {col} hair"
    return f"{col} hair that is {length}"


def _bag_np(rng, a) -> str:
    return _a(f"{_colour(rng, a['bag_colour'])} {_ch(rng, CAPTION_WORDS['bag_type'][a['bag_type']])}")


def _headwear_np(rng, a) -> str:
    return _a(f"{_colour(rng, a['headwear_colour'])} {_ch(rng, CAPTION_WORDS['headwear'][a['headwear']])}")


_BAG_PLACE = {"backpack": "on {his} back", "shoulder bag": "over {his} shoulder", "handbag": "in {his} hand"}
_FACING_PHRASE = {
    "front": ("walking towards the camera", "facing the camera"),
    "back": ("walking away from the camera", "seen from behind"),
    "side": ("walking to the side", "seen from the side"),
}


def _minor_sentence(rng, a, fact: str, he: str, his: str, noun: str) -> str:
    """A stand-alone sentence for one minor fact (hair, shoes, bag, headwear)."""
    subj = he if rng.random() < 0.7 else f"the {noun}"
    if fact == "hair":
        hair_colour = _ch(rng, CAPTION_WORDS["hair_colour"][a["hair_colour"]])
        return _ch(rng, (f"{subj} has {_hair_np(rng, a)}", f"{his} hair is {a['hair_length']} and {hair_colour}"))
    if fact == "shoes":
        return _ch(rng, (f"{subj} is wearing {_shoes_np(rng, a)}", f"{subj} has on {_shoes_np(rng, a)}",
                         f"{his} shoes are {_colour(rng, a['shoe_colour'])}"))
    if fact == "bag":
        place = _BAG_PLACE[a["bag_type"]].format(his=his)
        return _ch(rng, (f"{subj} is carrying {_bag_np(rng, a)}", f"{subj} carries {_bag_np(rng, a)} {place}",
                         f"{subj} has {_bag_np(rng, a)} {place}"))
    if fact == "headwear":
        return _ch(rng, (f"{subj} is wearing {_headwear_np(rng, a)}",
                         f"{subj} has {_headwear_np(rng, a)} on {his} head",
                         f"on {his} head is {_headwear_np(rng, a)}"))
    if fact == "nobag":
        return f"{subj} is not carrying a bag"
    raise KeyError(fact)  # pragma: no cover


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _finish(rng, sentences: list[str]) -> str:
    text = " ".join(s[0].upper() + s[1:] + "." for s in sentences if s)
    if rng.random() < 0.12:
        text = text.lower()  # some annotators never capitalise
    if rng.random() < 0.1:
        text = text.rstrip(".")
    return re.sub(r"\s+", " ", text).strip()


def make_caption(attrs: dict[str, Any], rng: np.random.Generator, facing: str | None = None) -> str:
    """One caption for an identity: varied template, synonyms and clause order.

    Always names the gender, the upper garment (colour + type) and the lower garment
    (colour + type; a dress has none). Minor details (hair, pattern, shoes, bag,
    headwear) are each mentioned unless dropped: at most two are dropped, never all.
    Mentions nothing the attributes do not say.
    """
    a = attrs
    if facing in ("left", "right"):
        facing = "side"
    he, his = ("he", "his") if a["gender"] == "man" else ("she", "her")
    noun = _ch(rng, CAPTION_WORDS["gender"][a["gender"]])
    minor = ["hair", "shoes"]
    if a["pattern"] != "plain":
        minor.append("pattern")
    if a["bag_type"] != "none":
        minor.append("bag")
    if a["headwear"] != "none":
        minor.append("headwear")
    n_drop = min((0, 0, 0, 1, 1, 2)[int(rng.random() * 6)], len(minor) - 1)
    dropped = set()
    while len(dropped) < n_drop:
        dropped.add(_ch(rng, minor))
    keep = [m for m in minor if m not in dropped]
    with_pattern = "pattern" in keep
    rest = [m for m in keep if m != "pattern"]
    rest.sort(key=lambda _: rng.random())  # random clause order
    if a["bag_type"] == "none" and rng.random() < 0.1:
        rest.append("nobag")

    garments = [_upper_np(rng, a, with_pattern)]
    if a["lower_type"] is not None:
        garments.append(_lower_np(rng, a))
    style = int(rng.random() * 5)
    sentences: list[str] = []
    if style == 0:  # "A woman with long black hair wearing a red jacket, blue jeans and white shoes."
        lead = _a(noun) if rng.random() < 0.7 else f"the {noun}"
        if facing and rng.random() < 0.2:
            lead += " " + _ch(rng, _FACING_PHRASE[facing])
        if "hair" in rest and rng.random() < 0.6:
            lead += f" with {_hair_np(rng, a)}"
            rest.remove("hair")
        if "shoes" in rest and rng.random() < 0.5:
            garments.append(_shoes_np(rng, a))
            rest.remove("shoes")
        verb = _ch(rng, ("wearing", "dressed in", "in", "who is wearing"))
        sentences.append(f"{lead} {verb} {_join(garments)}")
    elif style == 1:  # "The man is wearing a grey coat and black trousers."
        verb = _ch(rng, ("is wearing", "wears", "has on", "is dressed in"))
        sentences.append(f"{_ch(rng, ('the', 'this'))} {noun} {verb} {_join(garments)}")
    elif style == 2:  # "Young woman, long black hair, red jacket, blue jeans, black backpack."
        parts = [_a(noun) if rng.random() < 0.5 else noun]
        if "hair" in rest:
            parts.append(_hair_np(rng, a, plain=True))
            rest.remove("hair")
        parts += [g if g.startswith("a pair") else g[2:] if g.startswith("a ") else g[3:] if g.startswith("an ") else g
                  for g in garments]
        if "shoes" in rest:
            parts.append(_shoes_np(rng, a))
            rest.remove("shoes")
        if "bag" in rest:
            parts.append(f"{_bag_np(rng, a)}")
            rest.remove("bag")
        sentences.append(_join(parts))
    elif style == 3:  # "Wearing a red jacket and blue jeans, the woman walks ..."
        tail = _ch(rng, ("is walking", "walks along", "stands", "is walking down the street"))
        if facing and rng.random() < 0.3:
            tail = _ch(rng, _FACING_PHRASE[facing])
            tail = "is " + tail if tail.startswith("walking") else "is " + tail
        sentences.append(f"wearing {_join(garments)}, {_ch(rng, ('the', 'this', 'a'))} {noun} {tail}")
    else:  # "This man has short black hair. He is wearing ..."
        first = f"{_ch(rng, ('the', 'this'))} {noun}"
        if "hair" in rest:
            sentences.append(f"{first} has {_hair_np(rng, a)}")
            rest.remove("hair")
            sentences.append(f"{he} {_ch(rng, ('is wearing', 'wears', 'is dressed in'))} {_join(garments)}")
        else:
            sentences.append(f"{first} {_ch(rng, ('is wearing', 'wears'))} {_join(garments)}")
    for fact in rest:
        sentences.append(_minor_sentence(rng, a, fact, he, his, noun))
    return _finish(rng, sentences)


_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def tokenize(caption: str) -> list[str]:
    """CUHK-PEDES-style ``processed_tokens``: lower-case words, punctuation dropped."""
    return _TOKEN.findall(caption.lower())


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

@dataclass
class View:
    """One camera's view of a person (all sampled per image)."""

    facing: str          # "front" | "back" | "left" | "right"
    phase: float         # walking phase in [-1, 1]: leg/arm swing
    height: float        # person height / image height
    cx: float            # person centre x / image width
    top: float           # head top y / image height
    brightness: float
    contrast: float
    cast: tuple[float, float, float]  # additive colour cast per channel
    blur: float          # Gaussian blur radius in pixels (0 = none)
    occluder: tuple[float, float, float, float] | None  # (x0, y0, x1, y1) / image size
    noise: float         # std of additive pixel noise


def sample_view(rng: np.random.Generator) -> View:
    """Sample one camera view: facing, pose, scale, position, lighting, blur, occlusion."""
    facing = _pick(rng, {"front": 0.35, "back": 0.3, "left": 0.175, "right": 0.175})
    height = float(rng.uniform(0.80, 0.94))
    top = float(rng.uniform(0.01, max(0.012, 0.99 - height)))
    occluder = None
    if rng.random() < 0.2:
        if rng.random() < 0.5:  # from below: a car, a bench, a railing
            y0 = float(rng.uniform(0.62, 0.82))
            occluder = (0.0, y0, 1.0, 1.0)
        else:  # from a side: a pole, a passer-by
            w = float(rng.uniform(0.15, 0.3))
            x0 = 0.0 if rng.random() < 0.5 else 1.0 - w
            x0 += float(rng.uniform(-0.05, 0.05))
            occluder = (x0, float(rng.uniform(0.0, 0.4)), x0 + w, 1.0)
    return View(
        facing=facing,
        phase=float(rng.uniform(-1, 1)),
        height=height,
        cx=float(0.5 + rng.uniform(-0.08, 0.08)),
        top=top,
        brightness=float(rng.uniform(0.85, 1.15)),
        contrast=float(rng.uniform(0.85, 1.12)),
        cast=tuple(float(x) for x in rng.uniform(-10, 10, size=3)),
        blur=float(rng.uniform(0.3, 0.7)) if rng.random() < 0.3 else 0.0,
        occluder=occluder,
        noise=float(rng.uniform(1.0, 4.0)),
    )


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(v * f)))) for v in c)  # type: ignore[return-value]


def _contrast_colour(c: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return (35, 35, 38) if lum > 140 else (232, 232, 228)


def identity_shades(attrs: dict[str, Any], rng: np.random.Generator | None) -> dict[str, tuple[int, int, int]]:
    """Per-identity shades: palette colour + small jitter (±10 per channel; none if rng is None).

    Drawn once per identity so that every camera shows the same garment shade.
    """
    out = {}
    for part, field in (("upper", "upper_colour"), ("lower", "lower_colour"), ("shoe", "shoe_colour"),
                        ("bag", "bag_colour"), ("headwear", "headwear_colour")):
        name = attrs[field]
        if name is not None:
            j = rng.integers(-10, 11, size=3) if rng is not None else np.zeros(3, dtype=int)
            out[part] = tuple(int(v) for v in np.clip(np.asarray(COLOURS[name]) + j, 0, 255))
    out["hair"] = HAIR_COLOURS[attrs["hair_colour"]]
    out["skin"] = tuple(attrs.get("skin", SKIN_TONES[1]))
    return out


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Street-like clutter: a muted wall and ground in vertical bands (a cheap gradient),
    random rectangles (windows, doors, cars; a quarter of them saturated), a few poles."""
    n_rect, n_pole = int(rng.integers(2, 8)), int(rng.integers(0, 3))
    u = rng.random(8 + 8 * n_rect + 8 * n_pole)  # every random number this scene needs
    bands = 8
    wall = (70 + 120 * u[0]) * (0.8 + 0.4 * u[1:4])  # a tinted grey, never a saturated colour
    grad = (u[4] - 0.5) * 80
    t = (np.arange(bands) + 0.5) / bands
    walls = wall[None, :] + grad * t[:, None]  # (bands, 3)
    ground = (60 + 100 * u[5]) * (0.9 + 0.2 * u[1:4][::-1])
    horizon = h * (0.45 + 0.35 * u[6])
    r = u[8:8 + 8 * n_rect].reshape(n_rect, 8)
    saturated = r[:, 7] < 0.25
    rect_cols = np.where(saturated[:, None], r[:, 4:7] * 255, (40 + 170 * r[:, 4:5]) * (0.85 + 0.3 * r[:, 5:8]))
    pr = u[8 + 8 * n_rect:].reshape(n_pole, 8)
    cols = np.clip(np.concatenate([walls, ground[None], ground[None] * 0.92, rect_cols, 30 + 170 * pr[:, 1:4]]), 0, 255)
    cols = [tuple(c) for c in cols.astype(np.int64).tolist()]
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for i in range(bands):
        d.rectangle([0, h * i / bands, w, h * (i + 1) / bands], fill=cols[i])
    d.rectangle([0, horizon, w, h], fill=cols[bands])
    d.rectangle([0, (horizon + h) / 2, w, h], fill=cols[bands + 1])
    for i in range(n_rect):
        x0, x1 = sorted(((r[i, 0] * 1.4 - 0.2) * w, (r[i, 1] * 1.4 - 0.2) * w))
        y0, y1 = sorted(((r[i, 2] * 1.1 - 0.1) * h, (r[i, 3] * 1.1 - 0.1) * h))
        d.rectangle([x0, y0, x1, y1], fill=cols[bands + 2 + i])
    for i in range(n_pole):  # poles / door frames
        x = pr[i, 0] * w
        d.rectangle([x, 0, x + 1 + 3 * pr[i, 4], h], fill=cols[bands + 2 + n_rect + i])
    return img


# A fixed bank of unit Gaussian noise shared by all images; each image reads
# a random window of it. Much cheaper than drawing h*w*3 normals per image, still seeded.
_NOISE_BANK: np.ndarray | None = None


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    global _NOISE_BANK
    if _NOISE_BANK is None or _NOISE_BANK.size < 2 * n:
        _NOISE_BANK = np.random.default_rng(20240601).standard_normal(max(1 << 20, 4 * n), dtype=np.float32)
    start = int(rng.integers(0, _NOISE_BANK.size - n))
    return _NOISE_BANK[start:start + n]


def _camera(img: Image.Image, view: View, rng: np.random.Generator) -> Image.Image:
    """Lighting (contrast about mid-grey, brightness, colour cast), sensor noise, blur."""
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3), a fresh copy
    offset = 128.0 * (view.brightness - view.contrast) + np.asarray(view.cast, dtype=np.float32)
    arr *= np.float32(view.contrast)
    arr += offset.astype(np.float32)
    arr += _noise(rng, arr.size).reshape(arr.shape) * np.float32(view.noise)
    np.clip(arr, 0, 255, out=arr)
    img = Image.fromarray(arr.astype(np.uint8))
    if view.blur > 0:
        img = img.filter(ImageFilter.BoxBlur(view.blur))  # cheaper than Gaussian, looks alike
    return img


class _Body:
    """Maps body coordinates (u down from head top, v across; both in person heights) to pixels."""

    def __init__(self, view: View, h: int, w: int):
        self.ph = view.height * h
        self.top = view.top * h
        self.cx = view.cx * w

    def p(self, v: float, u: float) -> tuple[float, float]:
        return (self.cx + v * self.ph, self.top + u * self.ph)

    def box(self, v0: float, u0: float, v1: float, u1: float) -> list[float]:
        x0, y0 = self.p(v0, u0)
        x1, y1 = self.p(v1, u1)
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def poly(self, pts: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.p(v, u) for v, u in pts]

    def px(self, length: float) -> int:
        return max(1, int(round(length * self.ph)))


def _limb(d: ImageDraw.ImageDraw, b: _Body, v0, u0, v1, u1, width: float, fill) -> None:
    d.line([b.p(v0, u0), b.p(v1, u1)], fill=fill, width=b.px(width))


def _pattern(d: ImageDraw.ImageDraw, b: _Body, span, u0: float, u1: float, pattern: str, col) -> None:
    """Draw a garment pattern inside a trapezoid; span(u) -> (v_left, v_right)."""
    if pattern == "plain":
        return
    step = max(5.0, 0.075 * b.ph)  # pixels between stripes / checks / dots
    y0, y1 = b.p(0, u0)[1], b.p(0, u1)[1]
    lw = 1 if step < 12 else 2
    if pattern in ("striped", "checked"):
        y = y0 + step / 2
        while y < y1 - 1:
            vl, vr = span((y - b.top) / b.ph)
            d.line([b.p(vl, (y - b.top) / b.ph), b.p(vr, (y - b.top) / b.ph)], fill=col, width=lw)
            y += step
    if pattern == "checked":
        vl, vr = span(u0)
        x = b.p(vl, u0)[0] + step / 2
        xr = b.p(vr, u0)[0]
        while x < xr - 1:
            d.line([(x, y0), (x, y1)], fill=col, width=lw)
            x += step
    if pattern == "dotted":
        r = max(0.6, step * 0.16)
        y = y0 + step / 2
        row = 0
        while y < y1 - 1:
            vl, vr = span((y - b.top) / b.ph)
            xl, xr = b.p(vl, 0)[0], b.p(vr, 0)[0]
            x = xl + step / 2 + (step / 2 if row % 2 else 0)
            while x < xr - 1:
                d.ellipse([x - r, y - r, x + r, y + r], fill=col)
                x += step
            y += step
            row += 1


def render_person(attrs: dict[str, Any], view: View, size: tuple[int, int], rng: np.random.Generator,
                  shades: dict[str, tuple[int, int, int]] | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Render one image of an identity seen through ``view``; ``size`` is (height, width).

    Returns the RGB image and ``info``: ``facing``, ``upper_probe`` (a pixel box
    (x0, y0, x1, y1) that shows only the upper garment when ``upper_visible``),
    ``lower_probe`` / ``lower_visible`` (the same for the lower garment), and
    ``person_box``. ``shades`` are the identity's jittered colours (``identity_shades``);
    None draws the exact palette colours. ``rng`` drives the background and camera noise.
    """
    h, w = size
    cols = shades if shades is not None else identity_shades(attrs, None)
    img = _background(rng, h, w)
    d = ImageDraw.Draw(img)
    b = _Body(view, h, w)
    a = attrs
    facing = view.facing
    side = facing in ("left", "right")
    dirn = 1.0 if facing == "right" else -1.0  # +v is where a side-facing person looks
    skin, hair, upper = cols["skin"], cols["hair"], cols["upper"]
    lower = cols.get("lower")
    shoe = cols["shoe"]
    ut, lt = a["upper_type"], a["lower_type"]
    sw = view.phase

    # Torso half-widths (shoulder, hip) and vertical extents (person-height units).
    sh_w, hip_w = (0.07, 0.065) if side else (0.105, 0.088)
    torso_bottom = {"coat": 0.66, "dress": 0.47}.get(ut, 0.49 if ut in ("jacket", "hoodie", "sweater") else 0.48)

    def torso_span(u: float) -> tuple[float, float]:
        """(left v, right v) of the upper garment at height u: shoulders taper to hips,
        a coat flares again below the hips."""
        t = min(1.0, max(0.0, (u - 0.16) / (0.47 - 0.16)))
        half = sh_w + (hip_w - sh_w) * t
        if ut == "coat" and u > 0.47:
            half = hip_w + (u - 0.47) * 0.12
        return (-half, half)

    # Legs: (hip v, ankle v). Side view: a stride along v; front/back: small spread.
    if side:
        legs = [(-0.01, -0.11 * sw), (0.01, 0.11 * sw)]  # far leg first, near leg last
    else:
        legs = [(-0.048, -0.055 - 0.015 * sw), (0.048, 0.055 - 0.015 * sw)]
    leg_w = 0.05 if side else 0.045
    arm_w = 0.038
    if side:
        arms = [(0.0, 0.16, -0.1 * sw, 0.48), (0.0, 0.16, 0.1 * sw, 0.48)]  # far, near
    else:
        arms = [(-0.105, 0.17, -0.13 - 0.02 * abs(sw), 0.49), (0.105, 0.17, 0.13 + 0.02 * abs(sw), 0.49)]
    sleeve_end = {"t-shirt": 0.35, "tank top": 0.0, "dress": 0.3}.get(ut, 1.0)  # fraction of the arm covered

    def draw_arm(arm) -> None:
        v0, u0, v1, u1 = arm
        _limb(d, b, v0, u0, v1, u1, arm_w, skin)
        if sleeve_end > 0:
            vm, um = v0 + (v1 - v0) * sleeve_end, u0 + (u1 - u0) * sleeve_end
            _limb(d, b, v0, u0, vm, um, arm_w + 0.006, upper)
        r = 0.022
        d.ellipse(b.box(v1 - r, u1 - r, v1 + r, u1 + r), fill=skin)  # hand

    def draw_backpack_body() -> None:
        col = cols["bag"]
        if facing == "back":
            d.rounded_rectangle(b.box(-0.085, 0.19, 0.085, 0.44), radius=b.px(0.02), fill=col)
            d.line([b.p(-0.07, 0.27), b.p(0.07, 0.27)], fill=_shade(col, 0.6), width=1)
        elif side:
            d.rounded_rectangle(b.box(-dirn * 0.13, 0.19, -dirn * 0.05, 0.44), radius=b.px(0.015), fill=col)
        else:  # front: the bag peeks out behind the shoulders
            d.rectangle(b.box(-0.12, 0.18, 0.12, 0.40), fill=col)

    # 1. Things behind the body.
    if a["bag_type"] == "backpack" and facing != "back":
        draw_backpack_body()
    if a["hair_length"] == "long" and facing != "back":
        # Long hair falls behind the shoulders; seen from the front it frames the face.
        d.rectangle(b.box(-0.055, 0.07, 0.055, 0.27 if not side else 0.25), fill=hair)
    if side:
        draw_arm(arms[0])

    # 2. Legs and lower garment.
    for hv, av in legs:
        _limb(d, b, hv, 0.50, av, 0.94, leg_w, skin)
    if lt in ("trousers", "jeans", "shorts"):
        end = 0.94 if lt != "shorts" else 0.64
        for hv, av in legs:
            t = (end - 0.50) / 0.44
            _limb(d, b, hv, 0.49, hv + (av - hv) * t, end, leg_w + 0.008, lower)
        d.polygon(b.poly([(-hip_w, 0.45), (hip_w, 0.45), (hip_w + 0.005, 0.54), (-hip_w - 0.005, 0.54)]), fill=lower)
        if lt == "jeans" and not side:  # a seam down each leg
            for hv, av in legs:
                d.line([b.p(hv, 0.56), b.p(av, 0.92)], fill=_shade(lower, 0.75), width=1)
    elif lt in ("skirt", "long skirt"):
        end, flare = (0.68, 0.14) if lt == "skirt" else (0.88, 0.16)
        if side:
            flare = flare * 0.75
        d.polygon(b.poly([(-hip_w, 0.45), (hip_w, 0.45), (flare, end), (-flare, end)]), fill=lower)
    if ut == "dress":
        d.polygon(b.poly([(-hip_w, 0.44), (hip_w, 0.44), (0.15 if not side else 0.11, 0.68),
                          (-0.15 if not side else -0.11, 0.68)]), fill=upper)
    # Shoes.
    for _hv, av in legs:
        if side:
            d.rectangle(b.box(av - 0.03 * dirn, 0.925, av + 0.065 * dirn, 0.985), fill=shoe)
        else:
            d.rectangle(b.box(av - 0.035, 0.925, av + 0.035, 0.985), fill=shoe)

    # 3. Torso (upper garment) with pattern and type details.
    torso = [(-sh_w, 0.16), (sh_w, 0.16)]
    if ut == "coat":
        torso += [(hip_w + 0.023, 0.66), (-hip_w - 0.023, 0.66)]
    else:
        torso += [(hip_w, torso_bottom), (-hip_w, torso_bottom)]
    d.polygon(b.poly(torso), fill=upper)
    _pattern(d, b, torso_span, 0.19, torso_bottom - 0.01, a["pattern"], _contrast_colour(upper))
    dark = _shade(upper, 0.55) if sum(upper) > 120 else _shade(upper, 1.8)
    if ut in ("jacket", "coat") and facing == "front":
        d.line([b.p(0, 0.18), b.p(0, torso_bottom)], fill=dark, width=1)  # zip / opening
        d.polygon(b.poly([(-0.03, 0.16), (0.0, 0.22), (0.03, 0.16)]), fill=dark)  # collar
    elif ut == "shirt" and facing == "front":
        d.polygon(b.poly([(-0.035, 0.16), (0.0, 0.2), (0.035, 0.16)]), fill=_contrast_colour(upper))
    elif ut == "sweater":
        d.line([b.p(-hip_w, torso_bottom - 0.01), b.p(hip_w, torso_bottom - 0.01)], fill=dark, width=b.px(0.015))
    elif ut == "hoodie":
        if facing == "back":
            d.ellipse(b.box(-0.055, 0.12, 0.055, 0.24), fill=_shade(upper, 0.85))
        elif facing == "front":
            d.rectangle(b.box(-0.05, 0.37, 0.05, 0.45), outline=dark)  # pocket
    elif ut == "tank top":
        d.rectangle(b.box(-0.04, 0.16, 0.04, 0.19), fill=skin)  # neckline
    # Neck.
    d.rectangle(b.box(-0.018, 0.12, 0.018, 0.165), fill=skin)

    # 4. Bags in front of / on the body.
    if a["bag_type"] == "backpack":
        if facing == "back":
            draw_backpack_body()
        elif side:
            d.line([b.p(-dirn * 0.04, 0.17), b.p(-dirn * 0.02, 0.36)], fill=cols["bag"], width=b.px(0.018))
        else:
            for s in (-1, 1):
                d.line([b.p(s * 0.065, 0.165), b.p(s * 0.075, 0.37)], fill=cols["bag"], width=b.px(0.018))
    elif a["bag_type"] == "shoulder bag":
        s = 1 if (facing == "front") else -1
        if side:
            d.line([b.p(-0.02, 0.16), b.p(0.02, 0.44)], fill=_shade(cols["bag"], 0.8), width=1)
            d.rectangle(b.box(-dirn * 0.02, 0.42, -dirn * 0.10, 0.54), fill=cols["bag"])
        else:
            d.line([b.p(-s * 0.09, 0.165), b.p(s * 0.1, 0.45)], fill=_shade(cols["bag"], 0.8), width=b.px(0.012))
            d.rectangle(b.box(s * 0.08, 0.43, s * 0.17, 0.55), fill=cols["bag"])

    # 5. Arms (near arm last in side view) and a handbag in one hand.
    for arm in (arms[1:] if side else arms):
        draw_arm(arm)
    if a["bag_type"] == "handbag":
        v1, u1 = arms[1][2], arms[1][3]
        d.line([b.p(v1 - 0.02, u1), b.p(v1 - 0.02, u1 + 0.04)], fill=_shade(cols["bag"], 0.7), width=1)
        d.rectangle(b.box(v1 - 0.06, u1 + 0.03, v1 + 0.04, u1 + 0.11), fill=cols["bag"])

    # 6. Head, hair, face, headwear.
    hv = 0.008 * dirn if side else 0.0
    d.ellipse(b.box(hv - 0.048, 0.012, hv + 0.048, 0.135), fill=skin)
    if facing == "back":
        d.ellipse(b.box(-0.05, 0.005, 0.05, 0.125), fill=hair)
        if a["hair_length"] == "long":
            d.rectangle(b.box(-0.05, 0.07, 0.05, 0.29), fill=hair)
    elif side:
        d.chord(b.box(hv - 0.05, 0.005, hv + 0.05, 0.10), 180, 360, fill=hair)
        d.rectangle(b.box(hv - dirn * 0.05, 0.05, hv - dirn * 0.005, 0.10 if a["hair_length"] == "short" else 0.26),
                    fill=hair)
        ex, ey = b.p(hv + dirn * 0.03, 0.07)
        d.point((ex, ey), fill=(30, 25, 25))
    else:
        d.chord(b.box(-0.05, 0.005, 0.05, 0.085), 180, 360, fill=hair)
        d.rectangle(b.box(-0.05, 0.04, -0.04, 0.09), fill=hair)
        d.rectangle(b.box(0.04, 0.04, 0.05, 0.09), fill=hair)
        for s in (-1, 1):
            ex, ey = b.p(s * 0.018, 0.07)
            d.point((ex, ey), fill=(30, 25, 25))
    hw = a["headwear"]
    if hw != "none":
        hc = cols["headwear"]
        if hw == "cap":
            d.chord(b.box(hv - 0.051, 0.0, hv + 0.051, 0.09), 180, 360, fill=hc)
            if side:
                d.rectangle(b.box(hv + dirn * 0.03, 0.04, hv + dirn * 0.085, 0.052), fill=_shade(hc, 0.8))
            elif facing == "front":
                d.rectangle(b.box(-0.05, 0.04, 0.05, 0.055), fill=_shade(hc, 0.8))
        elif hw == "hat":
            d.rectangle(b.box(hv - 0.04, -0.025, hv + 0.04, 0.04), fill=hc)
            d.ellipse(b.box(hv - 0.085, 0.025, hv + 0.085, 0.055), fill=_shade(hc, 0.85))
        else:  # beanie
            d.chord(b.box(hv - 0.052, -0.005, hv + 0.052, 0.11), 180, 360, fill=hc)
            d.rectangle(b.box(hv - 0.052, 0.04, hv + 0.052, 0.058), fill=_shade(hc, 0.8))

    # 7. Occluder, then camera effects (lighting, colour cast, noise, blur).
    occ_box = None
    if view.occluder is not None:
        x0, y0, x1, y1 = view.occluder
        occ_box = (x0 * w, y0 * h, x1 * w, y1 * h)
        d.rectangle(list(occ_box), fill=tuple(int(v) for v in rng.integers(20, 230, size=3)))
    img = _camera(img, view, rng)

    # Probe boxes: pixels that show only one garment (clear of arms, straps, hair, bags).
    def pixel_box(v0: float, u0: float, v1: float, u1: float) -> list[int]:
        return [int(round(x)) for x in b.box(v0, u0, v1, u1)]

    def occluded(box: list[int]) -> bool:
        if occ_box is None:
            return False
        ox0, oy0, ox1, oy1 = occ_box
        return not (ox1 <= box[0] or ox0 >= box[2] or oy1 <= box[1] or oy0 >= box[3])

    if side:  # the half of the torso away from the swinging near arm, below long hair
        s_arm = 1.0 if sw >= 0 else -1.0
        upper_probe = pixel_box(-s_arm * 0.058, 0.28, -s_arm * 0.026, 0.40)
        lower_probe = pixel_box(-0.025, 0.52, 0.025, 0.56)  # hips, below the hand
    else:  # centre of the chest/back: clear of arms, straps, long hair and the hoodie pocket
        upper_probe = pixel_box(-0.035, 0.295, 0.035, 0.365)
        lower_probe = pixel_box(-0.05, 0.50, 0.05, 0.54)  # hips, below the upper garment
    upper_visible = not occluded(upper_probe) and not (
        a["bag_type"] == "backpack" and facing != "front" or a["bag_type"] == "shoulder bag" and side)
    lower_visible = lt is not None and ut != "coat" and not occluded(lower_probe) and not (
        side and a["bag_type"] in ("handbag", "shoulder bag"))
    info = {
        "facing": facing,
        "upper_probe": upper_probe,
        "upper_visible": upper_visible,
        "lower_probe": lower_probe,
        "lower_visible": lower_visible,
        "person_box": pixel_box(-0.2, 0.0, 0.2, 1.0),
    }
    return img, info


def person_shades(attrs: dict[str, Any], seed: int, pid: int) -> dict[str, tuple[int, int, int]]:
    """The jittered colours of person ``pid``: one stream per identity, same in every camera."""
    return identity_shades(attrs, np.random.default_rng([seed, 3, pid]))


def render_image(attrs: dict[str, Any], seed: int, pid: int, k: int, size: tuple[int, int],
                 shades: dict[str, tuple[int, int, int]] | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Image ``k`` of person ``pid`` exactly as ``synthesize(seed=seed)`` draws it.

    ``shades``: ``person_shades(attrs, seed, pid)``, passed in to skip recomputing it.
    """
    rng = np.random.default_rng([seed, 2, pid, k])
    view = sample_view(rng)
    if shades is None:
        shades = person_shades(attrs, seed, pid)
    return render_person(attrs, view, size, rng, shades)


# --------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------

def assign_splits(families: list[int], fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Split identities by family (siblings stay together, so the test gallery holds
    near-duplicates); returns one split name per identity.

    Each split with a positive fraction first gets one of the smallest families; then the
    other families, largest first, go to the split furthest below its target count. A
    dataset with fewer families than such splits is split by identity instead.
    """
    n = len(families)
    rng = np.random.default_rng([seed, 5003])
    target = np.asarray(fractions, dtype=np.float64) * n
    wanted = [int(s) for s in np.argsort(target, kind="stable") if target[s] > 0]
    members: dict[int, list[int]] = {}
    for i, f in enumerate(families):
        members.setdefault(f, []).append(i)
    if len(members) < len(wanted) <= n:  # tiny dataset: split families rather than leave a split empty
        members = {i: [i] for i in range(n)}
    fams = list(members)
    fams = [fams[int(j)] for j in rng.permutation(len(fams))]
    fams.sort(key=lambda f: -len(members[f]))  # stable: random order within a size
    count = np.zeros(3)
    out = [""] * n

    def put(fam: int, s: int) -> None:
        for i in members[fam]:
            out[i] = SPLITS[s]
        count[s] += len(members[fam])

    if len(fams) >= len(wanted):
        for s in wanted:
            put(fams.pop(), s)
    for fam in fams:
        put(fam, int(np.argmax(target - count)))
    return out


def _image_path(split: str, pid: int, k: int) -> str:
    return f"{split}/{pid:05d}_c{k:02d}.jpg"


def _make_records(pid: int, attrs: dict[str, Any], split: str, images_per_id: int, seed: int) -> list[dict]:
    """The annotation records of one person: two captions per image, CUHK-PEDES keys."""
    out = []
    for k in range(images_per_id):
        facing = sample_view(np.random.default_rng([seed, 2, pid, k])).facing  # as render_image sees it
        crng = np.random.default_rng([seed, 1, pid, k])
        caps = [make_caption(attrs, crng, facing) for _ in range(2)]
        out.append({
            "split": split,
            "captions": caps,
            "file_path": _image_path(split, pid, k),
            "processed_tokens": [tokenize(c) for c in caps],
            "id": pid,
        })
    return out


def _render_chunk(job: tuple[list[tuple[int, dict[str, Any], str]], int, int, tuple[int, int], str]) -> list[dict]:
    """Worker: render and write every image of a list of identities; returns their records."""
    items, images_per_id, seed, size, img_root = job
    root = Path(img_root)
    records = []
    for pid, attrs, split in items:
        shades = person_shades(attrs, seed, pid)
        for k in range(images_per_id):
            img, _ = render_image(attrs, seed, pid, k, size, shades)
            # Plain write: reid_raw.json is written last and atomically, so a dataset
            # without its annotation file is visibly incomplete.
            img.save(root / _image_path(split, pid, k), format="JPEG", quality=JPEG_QUALITY)
        records += _make_records(pid, attrs, split, images_per_id, seed)
    return records


def synthesize(
    out_dir: str | os.PathLike,
    ids: int = 300,
    images_per_id: int = 4,
    seed: int = 0,
    image_size: tuple[int, int] = (128, 64),
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic pedestrian dataset in the CUHK-PEDES layout under ``out_dir``.

    ``ids`` identities (person ids 1..ids, unique attribute sets, in families of near
    duplicates), ``images_per_id`` camera views each, two captions per image;
    ``image_size`` is (height, width); identities are split by family into
    train/val/test with ``split_fractions``. ``workers``: processes for rendering
    (None: one per CPU for large jobs; 0 or 1: in this process). The same ``seed`` gives
    a byte-identical ``reid_raw.json`` and identical pixels.

    Returns stats: ``ids``, ``images``, ``captions``, per-split ``splits`` counts,
    ``seconds``, ``images_per_s``, ``annotation_file``, ``image_root``.
    """
    ids, images_per_id, seed = int(ids), int(images_per_id), int(seed)
    if ids < 1:
        raise SynthError(f"ids must be at least 1, got {ids}")
    if images_per_id < 1:
        raise SynthError(f"images_per_id must be at least 1, got {images_per_id}")
    if len(image_size) != 2 or min(image_size) < 16:
        raise SynthError(f"image_size must be (height, width), both at least 16 pixels, got {tuple(image_size)}")
    size = (int(image_size[0]), int(image_size[1]))
    fr = tuple(float(f) for f in split_fractions)
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise SynthError(f"split_fractions must be three non-negative numbers summing to 1, got {split_fractions}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SynthError(f"output path exists and is not a folder: {out}")

    t0 = time.perf_counter()
    identities, families = sample_identities(ids, seed)
    splits = assign_splits(families, fr, seed)  # type: ignore[arg-type]
    img_root = out / "imgs"
    for s in set(splits):
        (img_root / s).mkdir(parents=True, exist_ok=True)

    total = ids * images_per_id
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if total >= 2000 else 1
    workers = max(1, int(workers))
    items = [(i + 1, identities[i], splits[i]) for i in range(ids)]
    chunk = max(1, min(64, -(-ids // (workers * 4))))
    jobs = [(items[j:j + chunk], images_per_id, seed, size, str(img_root)) for j in range(0, ids, chunk)]
    from tqdm import tqdm

    records: list[dict] = []  # in person-id order whatever the workers, so the JSON is reproducible
    bar = tqdm(total=total, unit="img", desc="synth", disable=not progress)
    try:
        if workers == 1:
            for job in jobs:
                records += _render_chunk(job)
                bar.update(len(job[0]) * images_per_id)
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                for job, recs in zip(jobs, pool.map(_render_chunk, jobs), strict=True):
                    records += recs
                    bar.update(len(job[0]) * images_per_id)
    finally:
        bar.close()

    annotation = out / ANNOTATION_FILE
    # Atomic like tbps.files.write_json, but compact and with json's C encoder: the indented
    # writer is pure Python and cost as much as rendering. (CUHK's own file is compact too.)
    with atomic_write(annotation, "w") as f:
        f.write(json.dumps(records))
    seconds = time.perf_counter() - t0
    per_split = {s: {"ids": 0, "images": 0} for s in SPLITS}
    for s in splits:
        per_split[s]["ids"] += 1
        per_split[s]["images"] += images_per_id
    return {
        "ids": ids,
        "images": total,
        "captions": 2 * total,
        "splits": per_split,
        "families": len(set(families)),
        "seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 1) if seconds > 0 else float("inf"),
        "annotation_file": str(annotation),
        "image_root": str(img_root),
    }
