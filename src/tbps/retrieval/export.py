"""A checkpoint for deployment: ONNX graphs of both encoders, or its weights as safetensors.

``export_onnx(checkpoint, outdir)`` writes

- ``image_encoder.onnx``: ``pixels`` float32 (B, 3, H, W), preprocessed -> ``features`` (B, D);
- ``text_encoder.onnx``: ``tokens`` int64 (B, L) -> ``features`` (B, D);
- ``preprocess.json``: what turns an image and a caption into those inputs (size, resize
  interpolation, mean/std, caption cleaning, tokenizer and context length), the model's
  fingerprint (an index built from this checkpoint records the same one) and the graphs' names;
- ``bpe_simple_vocab_16e6.txt.gz``: CLIP's BPE vocabulary, which the tokenizer settings name.

Features are L2-normalised float32, exactly what ``Encoder.encode_images``/``encode_texts``
return, so the graphs' features can be searched against an index built by tbps. The batch
dimension is dynamic. Only CLIP's own text transformer exports: TextReID's frozen word
dictionary encodes unseen words with a pretrained encoder at query time, and a Hugging Face
tower needs its own tokenizer folder; both are refused with one line.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tbps.data.text import _STRIP_CHARS
from tbps.files import atomic_write, write_json
from tbps.models.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from tbps.retrieval.encoder import resize_settings

OPSET = 17
IMAGE_GRAPH, TEXT_GRAPH, SETTINGS = "image_encoder.onnx", "text_encoder.onnx", "preprocess.json"
# Keys of a checkpoint that only resuming training needs (left out of an exported copy).
RESUME_ONLY = ("optimizer", "scaler", "rng", "elapsed", "stage", "path")


class ExportError(ValueError):
    """This checkpoint cannot be exported as asked."""

    user_error = True


class _Normalised(nn.Module):
    """One tower of the model, followed by the L2 normalisation every tbps feature gets."""

    def __init__(self, model: nn.Module, tower: str):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encode = self.model.encode_image if self.tower == "image" else self.model.encode_text
        return F.normalize(encode(x).float(), dim=-1)


def export_safetensors(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy a tbps checkpoint (file or run folder) to ``out`` (``*.safetensors``) without its
    resume-only state (optimiser, scaler, RNG): the model, its spec, recipe and history."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"{out}: the output of `export safetensors` must end in .safetensors")
    ckpt = load_checkpoint(checkpoint)
    return save_checkpoint(out, {k: v for k, v in ckpt.items() if k not in RESUME_ONLY})


def export_onnx(checkpoint: str | os.PathLike, outdir: str | os.PathLike, *, check: bool = True) -> dict[str, Any]:
    """Write the two graphs and ``preprocess.json`` to ``outdir`` (see the module doc); returns the
    settings written. ``check``: run both graphs in onnxruntime (when installed) on a batch of 2 and
    compare with PyTorch; a difference above 1e-4 raises :class:`ExportError`."""
    from tbps.retrieval.encoder import Encoder

    path = resolve_checkpoint(checkpoint)
    encoder = Encoder.from_checkpoint(path)
    model = encoder.model
    if model.spec.text_tower:
        kind = model.spec.text_tower.get("type", "frozen-words")
        why = {"frozen-words": "its word dictionary encodes unseen query words with a pretrained encoder at search "
                               "time, which no fixed graph holds",
               "hf": "its WordPiece tokenizer and BERT tower are not exported by tbps yet"}.get(kind, "unknown tower")
        raise ExportError(f"{path}: text tower {kind!r} does not export to ONNX ({why}); only CLIP's own text "
                          "transformer does")
    if model.spec.tse:
        raise ExportError(f"{path}: RDE's token-selection branch (a converted RDE checkpoint) does not export to "
                          "ONNX yet; only the global CLIP embedding does")
    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'tbps[deploy]'") from None
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    h, w = encoder.image_size
    pixels = torch.zeros(2, 3, h, w)
    tokens = encoder.tokenizer(["a person", "a man in a red coat"])
    _export(_Normalised(model, "image"), pixels, "pixels", outdir / IMAGE_GRAPH)
    _export(_Normalised(model, "text"), tokens, "tokens", outdir / TEXT_GRAPH)
    settings = preprocess_settings(encoder, outdir)
    write_json(outdir / SETTINGS, settings)
    if check:
        diff = max_difference(encoder, outdir, torch.randn(2, 3, h, w), ["a person", "a man in a red coat"])
        if diff is not None and diff > 1e-4:
            raise ExportError(f"{outdir}: the exported graphs differ from PyTorch by {diff:.2e} (> 1e-4)")
        settings["check_max_abs_diff"] = diff
    return settings


def _export(module: nn.Module, example: torch.Tensor, name: str, path: Path) -> None:
    """One graph with a dynamic batch dimension, written atomically as a single file."""
    import io
    import warnings

    buf = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused attention kernel has no ONNX form
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript tracer's notes on Python control flow
            torch.onnx.export(module.eval(), (example,), buf, input_names=[name], output_names=["features"],
                              dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}}, opset_version=OPSET,
                              dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def preprocess_settings(encoder, outdir: Path | None = None) -> dict[str, Any]:
    """What a deployment does before the graphs, as a JSON-able dict (copies the BPE vocabulary
    into ``outdir`` when given)."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    spec, tok = encoder.model.spec, encoder.tokenizer
    if not isinstance(tok, SimpleTokenizer) or tok.reduction_fn is not None:
        raise ExportError(f"{encoder.checkpoint}: tokenizer {type(tok).__name__} is not CLIP's BPE with plain "
                          "truncation; tbps exports only that one")
    vocab = default_bpe()
    if outdir is not None:
        shutil.copyfile(vocab, outdir / Path(vocab).name)
    h, w = encoder.image_size
    resize = resize_settings(spec)  # tbps's squash + bicubic, or what a converted model's source code did
    how = ("stretch to exactly (H, W): no crop, no padding, aspect ratio not kept" if resize["resize"] == "squash"
           else "resize the shorter side to the target's, then centre-crop (H, W) (open_clip / OpenAI CLIP)")
    if encoder.cleaning == "none":
        cleaning = {"kind": "none", "max_words": encoder.max_words,
                    "order": "the raw caption to the tokenizer (its own cleaning below); when max_words is set, "
                             "keep the first max_words whitespace-separated words"}
    else:
        cleaning = {
            "kind": "tbps-clip", "lowercase": True,
            "replace_with_space": _STRIP_CHARS.pattern.strip("[]").replace("\\", ""),
            "collapse_whitespace": True, "strip": True, "max_words": encoder.max_words,
            "order": "lowercase, replace the characters, collapse whitespace, keep the first max_words words",
        }
    return {
        "format": "tbps-onnx-export",
        "version": 1,
        "graphs": {"image": IMAGE_GRAPH, "text": TEXT_GRAPH, "opset": OPSET},
        "features": {"dim": encoder.embed_dim, "l2_normalised": True, "dtype": "float32"},
        "image": {
            "input": "pixels", "layout": "NCHW", "dtype": "float32", "size": [h, w], "channels": "RGB",
            "resize": {"interpolation": resize["interpolation"], "library": "PIL", "to": [h, w], "mode": resize["resize"],
                       "how": how},
            "scale": 1 / 255, "mean": list(spec.mean), "std": list(spec.std),
            "formula": "(pixel / 255 - mean) / std per channel",
        },
        "text": {
            "input": "tokens", "dtype": "int64", "context_length": encoder.model.context_length,
            "caption_cleaning": cleaning,
            "tokenizer": {
                "kind": "clip-bpe", "vocab_file": Path(vocab).name,
                "its_own_cleaning": getattr(tok.clean_fn, "__name__", "").lstrip("_") or "lower",
                "lower_means": "ftfy fix_text, html unescape twice, collapse whitespace, lowercase",
                "sot_token": int(tok.sot_token_id), "eot_token": int(tok.eot_token_id), "pad_token": 0,
                "truncation": "[sot] + bpe ids + [eot], cut to context_length with the last id set to eot, "
                              "padded with 0",
            },
        },
        "fingerprint": encoder.fingerprint,
    }


def max_difference(encoder, outdir: Path, pixels: torch.Tensor, texts: list[str]) -> float | None:
    """Largest absolute difference between PyTorch's and onnxruntime's features of ``pixels`` and
    ``texts`` (None when onnxruntime is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from tbps.retrieval.encoder import tokenize_captions

    tokens = tokenize_captions(encoder.tokenizer, texts, encoder.max_words, encoder.cleaning).numpy()
    img = ort.InferenceSession(str(outdir / IMAGE_GRAPH), providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(outdir / TEXT_GRAPH), providers=["CPUExecutionProvider"])
    a = img.run(None, {"pixels": pixels.numpy()})[0]
    b = txt.run(None, {"tokens": tokens})[0]
    return float(max(abs(a - encoder.encode_images(pixels)).max(), abs(b - encoder.encode_texts(texts)).max()))


__all__ = ["CheckpointError", "ExportError", "export_onnx", "export_safetensors", "max_difference",
           "preprocess_settings"]
