"""Pictures: a retrieval grid of text queries and their top-ranked gallery images."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from tbps.data.images import open_image
from tbps.files import atomic_write

GREEN, RED, INK, PAPER = (34, 160, 70), (210, 45, 45), (30, 30, 30), (250, 250, 248)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def retrieval_grid(
    out_path: str | os.PathLike,
    queries: Sequence[str],
    ranked: Sequence[Sequence[str | os.PathLike]],
    correct: Sequence[Sequence[bool]],
    scores: Sequence[Sequence[float]] | None = None,
    *,
    thumb: tuple[int, int] = (128, 64),
    text_width: int = 330,
    title: str = "",
) -> Path:
    """One row per query: its text, then its top-k images framed green (correct) or red.

    ``thumb`` is (height, width). Written atomically as PNG.
    """
    th, tw = thumb
    k = max((len(r) for r in ranked), default=0)
    pad, border, label_h = 10, 4, 16
    row_h = th + 2 * border + label_h + pad
    head = 34 if title else 0
    width = pad + text_width + k * (tw + 2 * border + pad) + pad
    height = head + pad + len(queries) * row_h
    canvas = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(canvas)
    font, small, big = _font(13), _font(11), _font(16)
    if title:
        draw.text((pad, 9), title, fill=INK, font=big)
    chars = max(20, text_width // 7)
    for qi, (query, paths) in enumerate(zip(queries, ranked)):
        y = head + pad + qi * row_h
        lines = textwrap.wrap(query, chars)[: (th + label_h) // 15]
        draw.multiline_text((pad, y), "\n".join(lines), fill=INK, font=font, spacing=2)
        for j, path in enumerate(paths):
            x = pad + text_width + j * (tw + 2 * border + pad)
            ok = correct[qi][j]
            draw.rectangle([x, y, x + tw + 2 * border - 1, y + th + 2 * border - 1], fill=GREEN if ok else RED)
            im = open_image(path, draft=(tw, th))
            canvas.paste(im.resize((tw, th), Image.BICUBIC), (x + border, y + border))
            label = f"#{j + 1}" + (f"  {scores[qi][j]:.2f}" if scores is not None else "") + ("  ✓" if ok else "")
            draw.text((x, y + th + 2 * border + 1), label.replace("✓", "ok"), fill=GREEN if ok else INK, font=small)
    out_path = Path(out_path)
    with atomic_write(out_path, "wb") as f:
        canvas.save(f, format="PNG")
    return out_path
