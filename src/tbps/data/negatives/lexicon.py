"""The word knowledge behind MeFa's text hard negatives: which words are key nouns, colours,
patterns, lengths, sleeves or tones, which are synonyms, which name a family, and "a"/"an".

Groups are separated by ";", synonyms inside a group by spaces; singular forms (plurals are
derived), except words in ``_PLURAL_ONLY``. The lexicon recognises words, it never supplies
replacements (those come from the corpus). Underscored names are internal to
``tbps.data.negatives``.
"""

from __future__ import annotations

import functools

_NOUN_GROUPS = {
    "garment": """
        shirt; t-shirt tshirt tee tee-shirt; blouse; polo polo-shirt; top; tanktop tank-top; camisole cami;
        tunic; jersey; sweater jumper pullover; sweatshirt; hoodie hoody; cardigan; vest; waistcoat;
        jacket; windbreaker; blazer; coat overcoat; raincoat; parka; trenchcoat; poncho; cape; suit;
        tuxedo; dress; gown; sundress; jumpsuit; romper; overalls dungarees; uniform; robe; skirt miniskirt;
        trousers pants slacks; jeans denims; shorts; leggings; tights; stockings; sweatpants joggers trackpants;
        capris; khakis; shoe footwear; sneaker trainers; boot; sandal; slipper; heel; loafer; flats; flip-flop;
        sock; underwear; outerwear; sportswear""",
    "accessory": """
        bag; handbag purse; backpack rucksack knapsack; satchel; tote; briefcase; suitcase luggage;
        schoolbag; wallet; umbrella; hat; cap; beanie toque; helmet; headband hairband; bandana; scarf;
        shawl; glove; mitten; belt; tie necktie; bowtie; watch wristwatch; bracelet; necklace; earring;
        glasses spectacles eyeglasses; sunglasses; goggles; mask; headphones headset earphones;
        phone cellphone smartphone; bottle; book; newspaper; cup; box; package parcel; bicycle bike;
        scooter; skateboard; stroller pram; cart trolley; badge; lanyard; folder; laptop""",
    "body": """
        hair; ponytail; bun; braid; pigtail; head; face; beard; moustache mustache; shoulder; arm; hand;
        wrist; finger; elbow; leg; knee; thigh; foot; ankle; waist; hip; back; neck; chest; ear; eye;
        forehead""",
}
_PLURAL_ONLY = set("""overalls dungarees trousers pants slacks jeans denims shorts leggings tights stockings
    sweatpants joggers trackpants capris khakis trainers flats glasses spectacles eyeglasses sunglasses goggles
    headphones earphones""".split())
_IRREGULAR_PLURAL = {"foot": "feet", "scarf": "scarves", "shelf": "shelves"}
_MASS_NOUNS = {"footwear", "luggage", "underwear", "outerwear", "sportswear", "hair"}

# Words that name a whole family: never swapped with a member of their own family.
_FAMILIES = {
    "footwear": ("shoe footwear", "sneaker trainers boot sandal slipper heel loafer flats flip-flop"),
    "bag": ("bag", "handbag purse backpack rucksack knapsack satchel tote briefcase suitcase schoolbag"),
    "top": ("top", "shirt t-shirt tshirt tee tee-shirt blouse polo polo-shirt tanktop tank-top camisole cami "
                   "tunic jersey sweater jumper pullover sweatshirt hoodie hoody cardigan vest waistcoat jacket "
                   "windbreaker blazer coat overcoat raincoat parka trenchcoat poncho"),
    "hair": ("hair", "ponytail bun braid pigtail"),
}
# Unknown corpus nouns ending in one of these (after >= 3 letters) join its category and family.
# (suffix -> the lexicon word whose category and family it takes)
_SUFFIX_HEADS = {"shirt": "shirt", "coat": "coat", "skirt": "skirt", "jacket": "jacket", "pants": "pants",
                 "trousers": "trousers", "dress": "dress", "boot": "boot", "shoe": "shoe", "bag": "bag",
                 "pack": "backpack", "glasses": "glasses", "watch": "watch", "wear": "underwear"}

_ADJ_GROUPS = {
    "colour": """black; white; grey gray; red crimson scarlet; blue azure; navy; green; yellow; orange;
        purple violet; pink; brown; beige; khaki; tan; maroon burgundy; cream; gold golden; silver;
        teal turquoise; olive; lavender; blonde blond; auburn""",
    "pattern": """plain solid; striped stripy; checked plaid checkered checkerboard tartan gingham;
        dotted polka-dot polka-dotted spotted; floral flowered flowery; camouflage camo""",
    "length": "long; short; knee-length; ankle-length; shoulder-length; waist-length",
    "sleeve": "short-sleeved short-sleeve; long-sleeved long-sleeve; sleeveless",
    "tone": "dark; light; bright; pale",
}
_NO_SUBSTITUTE_VERBS = set("""be is are was were been being am have has had having do does did doing done
    get gets got getting gotten""".split())


def _plural(word: str) -> str:
    if word in _IRREGULAR_PLURAL:
        return _IRREGULAR_PLURAL[word]
    if word.endswith(("s", "sh", "ch", "x", "z")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _build_lexicon():
    category: dict[str, str] = {}   # word -> garment / accessory / body / colour / pattern / ...
    concept: dict[str, str] = {}    # word -> synonym group id (singular and plural share it)
    for groups, is_noun in ((_NOUN_GROUPS, True), (_ADJ_GROUPS, False)):
        for cat, text in groups.items():
            for group in text.split(";"):
                words = group.split()
                for w in words:
                    forms = [w] if (not is_noun or w in _PLURAL_ONLY or w in _MASS_NOUNS) else [w, _plural(w)]
                    assert w not in category, f"lexicon word {w!r} listed twice"
                    for f in forms:  # a derived plural may repeat a synonym's (hoody/hoodie)
                        category.setdefault(f, cat)
                        concept.setdefault(f, words[0])
    family: dict[str, tuple[str, bool]] = {}  # word -> (family, is the family's generic word)
    for fam, (generic, members) in _FAMILIES.items():
        for names, is_generic in ((generic, True), (members, False)):
            for w in names.split():
                for f in (w, _plural(w)):
                    family[f] = (fam, is_generic)
    return category, concept, family


_CATEGORY, _CONCEPT, _FAMILY = _build_lexicon()
_SUFFIX_FORMS = tuple((f, rep) for head, rep in _SUFFIX_HEADS.items() for f in dict.fromkeys((head, _plural(head))))
_NOUN_CATEGORIES = frozenset(_NOUN_GROUPS)
_AN_EXCEPTIONS_A = ("uni", "use", "usu", "eu", "one", "once")
_AN_EXCEPTIONS_AN = ("hour", "honest", "honour", "honor", "heir")


def _takes_an(word: str) -> bool:
    if word.startswith(_AN_EXCEPTIONS_AN):
        return True
    return word[:1] in "aeiou" and not word.startswith(_AN_EXCEPTIONS_A)


def _article_ok(article: str | None, word: str) -> bool:
    return article is None or (article == "an") == _takes_an(word)


@functools.lru_cache(maxsize=1 << 16)
def _noun_class(word: str) -> tuple[str, str, tuple[str, bool] | None] | None:
    """(category, concept, family) of a key-noun word form, or None."""
    if _CATEGORY.get(word) in _NOUN_CATEGORIES:
        return _CATEGORY[word], _CONCEPT[word], _FAMILY.get(word)
    last = word.rsplit("-", 1)[-1]
    if last != word and _CATEGORY.get(last) in _NOUN_CATEGORIES:
        return _CATEGORY[last], word, _member_of(last)
    for form, rep in _SUFFIX_FORMS:
        if word.endswith(form) and len(word) - len(form) >= 3 and word[:-len(form)].isalpha():
            return _CATEGORY[rep], word, _member_of(rep)
    return None


def _member_of(word: str) -> tuple[str, bool] | None:
    fam = _FAMILY.get(word)
    return (fam[0], False) if fam else None


@functools.lru_cache(maxsize=1 << 18)
def related(a: str, b: str) -> bool:
    """True when replacing word ``a`` by ``b`` would not change the description: the same word,
    synonyms (grey/gray, purse/handbag), or a family's generic word and one of its members
    (shoes/sneakers, bag/backpack)."""
    a, b = a.lower(), b.lower()
    if a == b:
        return True
    ca, cb = _concept_of(a), _concept_of(b)
    if ca is not None and ca == cb:
        return True
    fa, fb = _FAMILY.get(a) or _family_of(a), _FAMILY.get(b) or _family_of(b)
    return bool(fa and fb and fa[0] == fb[0] and (fa[1] or fb[1]))


def _concept_of(word: str) -> str | None:
    if word in _CONCEPT:
        return _CONCEPT[word]
    nc = _noun_class(word)
    return nc[1] if nc else None


def _family_of(word: str) -> tuple[str, bool] | None:
    nc = _noun_class(word)
    return nc[2] if nc else None
