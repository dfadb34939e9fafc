"""Synthetic identities: the attribute tables, sampling identities in families of near
duplicates, and the distance between two identities.

An identity is one value per field of ``ATTRIBUTE_FIELDS`` (plus ``skin``, rendered but never
captioned). A family is a base identity and 0-3 siblings that each differ from it in one or
two attributes, so that retrieval has to read details rather than the overall look.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


class SynthError(ValueError):
    """A bad argument to ``synthesize`` (printed as one line by the CLI)."""

    user_error = True


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
