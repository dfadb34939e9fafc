"""Command-line pieces several benches share (bench-only helper).

``python bench/NAME.py`` puts this folder on ``sys.path``, so a bench imports it as ``_args``.
"""

from __future__ import annotations

import argparse


def named_path(item: str) -> tuple[str, str]:
    """An argparse ``type`` for ``NAME=PATH`` (a checkpoint or run folder with the name its table row
    gets): returns (name, path); an item without a name or a path is refused in one line."""
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{item!r}: give NAME=PATH")
    return name, path
