"""Released person-search models and stock CLIP weights as tbps checkpoints (``tbps convert``).

A converted checkpoint holds the weights in tbps's layout (open_clip's CLIP under ``clip.``, RDE's token
selection under ``tse.``), the architecture read from the tensor shapes, and the source code's
preprocessing (``model_spec.preprocess``), so ``tbps eval``, ``index``, ``search``, ``serve`` and
``train --init`` use it as its authors' code did. Files are read without running code from them
(``reading.py``); a wrong key, a missing tensor or a misfit shape is one line, and nothing is written.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tbps.models.convert.reading import ConvertError

__all__ = ["ConvertError", "convert"]

def convert(fmt: str, src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
            **options: Any) -> dict[str, Any]:
    """Convert ``src`` (format ``fmt``) into the tbps checkpoint ``out``; returns a summary.

    options: ``image_size`` (irra, rde: (H, W), default 384x128), ``select_ratio`` (rde, 0.3), ``arch``
    (open_clip), ``resize`` ("squash" | "shortest": override the source's resize).
    """
    from tbps.models.checkpoint import file_sha256, save_checkpoint
    from tbps.models.convert.formats import READERS, build

    if fmt not in READERS:
        raise ConvertError(f"unknown format {fmt!r}; known: {', '.join(READERS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    src = str(src)
    resize = options.pop("resize", None)
    converted = READERS[fmt](src, **{k: v for k, v in options.items() if v is not None})
    if resize:
        if resize not in ("squash", "shortest"):
            raise ConvertError(f"--resize must be squash or shortest, got {resize!r}")
        converted.spec.preprocess = {**converted.spec.preprocess, "resize": resize}
    model = build(converted, src)
    source = {"format": fmt, "source": src}
    if Path(src).expanduser().is_file():
        source["sha256"] = file_sha256(Path(src).expanduser())
    save_checkpoint(out, {"model_spec": model.spec.to_dict(), "model": model.state_dict(), "objective": {},
                          "converted_from": source})
    return {"out": str(out), "format": fmt, "arch": model.spec.arch, "image_size": list(model.image_size),
            "embed_dim": model.embed_dim, "preprocess": model.spec.preprocess, "seconds": time.perf_counter() - t0}
