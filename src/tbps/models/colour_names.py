"""Colour names and the colours they name: an unseen colour word read as the nearest training colour word.

A query's "mint", "copper" or "graphite" is a colour to its writer, but to the frozen word encoder a word
near "hoodie", "coat" or "dots", and to WordNet first of all a herb, a metal and a lubricant. A table of
colour names knows them as colours. The one read here is the xkcd colour survey's (949 names, public
domain), which matplotlib installs (``matplotlib.colors.XKCD_COLORS``). Many of its names end in a basic
colour word ("navy blue", "olive green", "off white"), so the colours of the names that end in a training
word are samples of what that training word covers, and an unseen word that is itself a name in the table
("navy") is read as the last word of the nearest such name in CIELAB ("navy blue" -> blue), its own entry
left out. No synonym is listed anywhere: the table maps names to colours, and the reading is whichever
training word's samples lie nearest.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Mapping

_HEX = re.compile(r"#[0-9a-fA-F]{6}")
_SPLIT = re.compile(r"[\s/]+")  # "blue/green" ends in green


def srgb_to_lab(hex_colour: str) -> tuple[float, float, float]:
    """'#rrggbb' (sRGB) -> CIELAB (L*, a*, b*) under the D65 white point."""
    if not _HEX.fullmatch(hex_colour):
        raise ValueError(f"colour {hex_colour!r}: not #rrggbb")
    rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb)  # linear light
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    fx, fy, fz = f(x), f(y), f(z)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


class ColourNames:
    """{name: '#rrggbb'} -> the nearest colour of the names ending in a given word set."""

    def __init__(self, table: Mapping[str, str]):
        self.lab = {name.lower(): srgb_to_lab(colour) for name, colour in table.items()}
        self.last = {name: _SPLIT.split(name.strip())[-1] for name in self.lab}

    def __len__(self) -> int:
        return len(self.lab)

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and word.lower() in self.lab

    def nearest(self, word: str, candidates: Collection[str]) -> str | None:
        """The last word of the name nearest ``word``'s colour among the names (other than ``word``) whose
        last word is in ``candidates``; None when ``word`` is no name in the table, or no name ends in one."""
        word = word.lower()
        if word not in self.lab:
            return None
        own = self.lab[word]
        best = min(((math.dist(own, lab), self.last[name]) for name, lab in self.lab.items()
                    if name != word and self.last[name] in candidates), default=None)
        return None if best is None else best[1]


@functools.lru_cache(maxsize=1)
def load_colour_names() -> ColourNames | None:
    """The xkcd colour names matplotlib installs (read once a process); None when matplotlib is not installed."""
    try:
        from matplotlib.colors import XKCD_COLORS
    except ImportError:
        return None
    return ColourNames({name.removeprefix("xkcd:"): colour for name, colour in XKCD_COLORS.items()})
