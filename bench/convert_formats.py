"""Conversion time and feature agreement of `tbps convert` on full-size (ViT-B/16) random checkpoints.

For each format: write a random ViT-B/16 checkpoint in the source's layout (IRRA/RDE at 384x128 with RDE's
512->1024 TSE layers, TBPS-CLIP/OpenAI/open_clip at 224x224), time `convert`, then compare the converted
encoder's features of 2 images and 3 captions with the independent forward of tests/convert_refs.py
(max abs difference of the L2-normalised features; RDE: of the combined similarity matrix).

    PYTHONPATH=src:tests python bench/convert_formats.py [--formats irra rde ...]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import convert_refs as R  # noqa: E402

TEXTS = ["a woman in a red coat, carrying a black bag.", "a man wearing a black jacket and blue jeans", "x"]


def vit_b16(size):
    import open_clip

    cfg = {"embed_dim": 512, "quick_gelu": True,
           "vision_cfg": {"image_size": list(size), "layers": 12, "width": 768, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}
    open_clip.factory._MODEL_CONFIGS["bench-vit-b16"] = cfg
    torch.manual_seed(0)
    model = open_clip.create_model("bench-vit-b16").eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_source(fmt, tmp):
    size = (384, 128) if fmt in ("irra", "rde") else (224, 224)
    model, sd = vit_b16(size)
    path = Path(tmp) / f"{fmt}.pth"
    if fmt in ("irra", "rde"):
        m = {f"base_model.{k}": v for k, v in sd.items() if k != "logit_scale"}
        if fmt == "rde":
            m.update(R.tse_state("visul_emb_layer.", 512, 1024, True, 1))
            m.update(R.tse_state("texual_emb_layer.", 512, 1024, False, 2))
        torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in m.items()}}, path)
        sd = {k: v.half().float() if v.is_floating_point() else v for k, v in m.items()}
    elif fmt == "tbps-clip":
        torch.save({"model": {(k if k.startswith("visual.") or k == "logit_scale" else f"encode_text.{k}"): v
                              for k, v in sd.items()}}, path)
    elif fmt == "openai":
        path = Path(tmp) / "ViT-B-16.pt"
        example = (torch.randn(1, 3, 224, 224), R_tokens(["a"]))
        torch.jit.trace(model, example, strict=False, check_trace=False).save(str(path))
    else:
        torch.save(sd, path)
    return path, sd, size, model


def R_tokens(texts):
    import open_clip

    return open_clip.tokenize(texts)


def measure(fmt, tmp):
    from tbps.models.convert import convert
    from tbps.retrieval.encoder import Encoder

    src, sd, size, model = write_source(fmt, tmp)
    out = Path(tmp) / f"{fmt}-tbps.pt"
    opts = {"arch": "bench-vit-b16"} if fmt == "open_clip" else {}
    t0 = time.perf_counter()
    convert(fmt, src, out, **opts)
    seconds = time.perf_counter() - t0
    enc = Encoder.from_checkpoint(out)
    pix = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    img, txt = torch.from_numpy(enc.encode_images(pix)), torch.from_numpy(enc.encode_texts(TEXTS))
    if fmt in ("irra", "rde", "tbps-clip"):
        p = sd if fmt == "tbps-clip" else {k[len("base_model."):]: v for k, v in sd.items()
                                            if k.startswith("base_model.")}
        texts = [" ".join(t.lower().replace(".", " ").split()) for t in TEXTS] if fmt == "tbps-clip" else TEXTS
        ids = R_tokens(texts)
        itok, iattn = R.ref_image_tokens(p, pix, patch=16)
        ttok, tattn = R.ref_text_tokens(p, ids)
        gi, gt = F.normalize(itok[:, 0], dim=-1), F.normalize(ttok[torch.arange(len(ids)), ids.argmax(-1)], dim=-1)
        if fmt == "rde":
            si = F.normalize(R.ref_rde_image(sd, itok, iattn), dim=-1)
            st = F.normalize(R.ref_rde_text(sd, ttok, ids, tattn), dim=-1)
            diff = ((txt @ img.T) - (gt @ gi.T + st @ si.T) / 2).abs().max().item()
        else:
            diff = max((img - gi).abs().max().item(), (txt - gt).abs().max().item())
    else:
        with torch.no_grad():
            gi = F.normalize(model.encode_image(pix), dim=-1)
            gt = F.normalize(model.encode_text(R_tokens(TEXTS)), dim=-1)
        diff = max((img - gi).abs().max().item(), (txt - gt).abs().max().item())
    size_mb = os.path.getsize(src) / 2**20
    return seconds, diff, size_mb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["irra", "rde", "tbps-clip", "openai", "open_clip"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"{'format':<10} {'source MB':>9} {'convert s':>10} {'max |diff|':>11}")
    for fmt in args.formats:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, diff, mb = measure(fmt, tmp)
        print(f"{fmt:<10} {mb:>9.0f} {seconds:>10.1f} {diff:>11.2e}", flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
