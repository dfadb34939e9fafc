"""Captions of a synthetic identity: the words for each attribute value, a small grammar
of five templates with synonyms and random clause order, and CUHK-PEDES tokens.

``CAPTION_WORDS`` lists every word or phrase a caption may use for each attribute value
(``COLOUR_WORDS`` for colours); nothing else names an attribute. ``RESERVED_SYNONYMS``
(e.g. "crimson", "slacks", "rucksack") are deliberately never used, so tests of robustness
to unseen synonyms have words to use.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np

from tbps.synth.attributes import COLOURS

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


def _minor_facts(rng: np.random.Generator, a: dict[str, Any]) -> tuple[bool, list[str]]:
    """Which minor details a caption mentions: (pattern named?, the other facts in clause order).

    0, 1 or 2 of hair / shoes / pattern / bag / headwear are dropped, never all.
    """
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
    return with_pattern, rest


# The five templates. Each returns its opening sentences and removes from ``rest`` the facts
# it has already told (``garments`` may grow by the shoes); the remaining facts follow.

def _narrative(rng, a, noun: str, he: str, garments: list[str], rest: list[str], facing) -> list[str]:
    """'A woman with long black hair wearing a red jacket, blue jeans and white shoes.'"""
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
    return [f"{lead} {verb} {_join(garments)}"]


def _subject_verb(rng, a, noun: str, he: str, garments: list[str], rest: list[str], facing) -> list[str]:
    """'The man is wearing a grey coat and black trousers.'"""
    verb = _ch(rng, ("is wearing", "wears", "has on", "is dressed in"))
    return [f"{_ch(rng, ('the', 'this'))} {noun} {verb} {_join(garments)}"]


def _fragments(rng, a, noun: str, he: str, garments: list[str], rest: list[str], facing) -> list[str]:
    """'Young woman, long black hair, red jacket, blue jeans, black backpack.'"""
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
    return [_join(parts)]


def _clothing_first(rng, a, noun: str, he: str, garments: list[str], rest: list[str], facing) -> list[str]:
    """'Wearing a red jacket and blue jeans, the woman walks along.'"""
    tail = _ch(rng, ("is walking", "walks along", "stands", "is walking down the street"))
    if facing and rng.random() < 0.3:
        tail = _ch(rng, _FACING_PHRASE[facing])
        tail = "is " + tail if tail.startswith("walking") else "is " + tail
    return [f"wearing {_join(garments)}, {_ch(rng, ('the', 'this', 'a'))} {noun} {tail}"]


def _hair_first(rng, a, noun: str, he: str, garments: list[str], rest: list[str], facing) -> list[str]:
    """'This man has short black hair. He is wearing ...'"""
    first = f"{_ch(rng, ('the', 'this'))} {noun}"
    if "hair" in rest:
        rest.remove("hair")
        return [f"{first} has {_hair_np(rng, a)}",
                f"{he} {_ch(rng, ('is wearing', 'wears', 'is dressed in'))} {_join(garments)}"]
    return [f"{first} {_ch(rng, ('is wearing', 'wears'))} {_join(garments)}"]


_TEMPLATES = (_narrative, _subject_verb, _fragments, _clothing_first, _hair_first)


# The attribute fields each caption names, and those each minor fact adds ("nobag": "she is not carrying a bag").
NAMED_ALWAYS = ("gender", "upper_type", "upper_colour", "lower_type", "lower_colour")  # a dress: lower is None
_FACT_FIELDS = {"hair": ("hair_length", "hair_colour"), "shoes": ("shoe_colour",), "bag": ("bag_type", "bag_colour"),
                "headwear": ("headwear", "headwear_colour"), "nobag": ("bag_type",)}


def make_caption(attrs: dict[str, Any], rng: np.random.Generator, facing: str | None = None) -> str:
    """One caption for an identity: varied template, synonyms and clause order.

    Always names the gender, the upper garment (colour + type) and the lower garment
    (colour + type; a dress has none). Minor details (hair, pattern, shoes, bag,
    headwear) are each mentioned unless dropped: at most two are dropped, never all.
    Mentions nothing the attributes do not say.
    """
    return described_caption(attrs, rng, facing)[0]


def described_caption(attrs: dict[str, Any], rng: np.random.Generator,
                      facing: str | None = None) -> tuple[str, frozenset[str]]:
    """:func:`make_caption`'s caption (the same draws) and the ``ATTRIBUTE_FIELDS`` it names: an
    identity whose values agree on those fields fits the caption as well as its own does."""
    a = attrs
    if facing in ("left", "right"):
        facing = "side"
    he, his = ("he", "his") if a["gender"] == "man" else ("she", "her")
    noun = _ch(rng, CAPTION_WORDS["gender"][a["gender"]])
    with_pattern, rest = _minor_facts(rng, a)
    named = set(NAMED_ALWAYS) | ({"pattern"} if with_pattern else set())
    named.update(f for fact in rest for f in _FACT_FIELDS[fact])  # before the template tells (and removes) some
    garments = [_upper_np(rng, a, with_pattern)]
    if a["lower_type"] is not None:
        garments.append(_lower_np(rng, a))
    template = _TEMPLATES[int(rng.random() * 5)]
    sentences = template(rng, a, noun, he, garments, rest, facing)
    for fact in rest:
        sentences.append(_minor_sentence(rng, a, fact, he, his, noun))
    return _finish(rng, sentences), frozenset(named)


_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def tokenize(caption: str) -> list[str]:
    """CUHK-PEDES-style ``processed_tokens``: lower-case words, punctuation dropped."""
    return _TOKEN.findall(caption.lower())
