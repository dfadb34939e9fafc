"""Caption cleaning, as TBPS-CLIP does it before tokenising."""

from __future__ import annotations

import re

# TBPS-CLIP's `pre_caption` replaces each of these characters with a space.
_STRIP_CHARS = re.compile(r"[.!\"()*#:;~]")


def clean_caption(text: str, max_words: int = 77) -> str:
    """Normalise a caption the way TBPS-CLIP does.

    1. lower-case;
    2. replace each of ``. ! " ( ) * # : ; ~`` with a space (commas, apostrophes,
       hyphens and slashes are kept);
    3. collapse every run of whitespace (spaces, tabs, newlines) to one space and
       trim both ends;
    4. keep at most ``max_words`` space-separated words.

    >>> clean_caption('A man wears a "red" T-shirt.  He carries a bag; black shoes!')
    'a man wears a red t-shirt he carries a bag black shoes'
    >>> clean_caption("one two three", max_words=2)
    'one two'

    TBPS-CLIP collapses only runs of two or more whitespace characters, so a lone
    tab or newline between two words survives there; here it becomes a space.
    Returns "" for a caption that holds only stripped characters.
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_caption expects a str, got {type(text).__name__}")
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    words = _STRIP_CHARS.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])
