"""`tbps export onnx`: both graphs in onnxruntime give PyTorch's features (1e-4) at batch 1 and 3,
preprocess.json describes the real preprocessing, and towers that cannot export are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tbps.cli.main import main
from tbps.retrieval.encoder import Encoder, create_untrained_checkpoint, tokenize_captions

ort = pytest.importorskip("onnxruntime")

CAPTIONS = ["A man in a RED coat; black shoes!", "a woman with a bag", "x " * 100]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tbps-clip-cpu recipe's model (tiny-vit) with random weights, exported through the CLI."""
    root = tmp_path_factory.mktemp("onnx")
    ckpt = create_untrained_checkpoint(root / "run" / "best.pt", arch="tiny-vit", seed=7)
    assert main(["export", "onnx", str(ckpt), str(root / "out")]) == 0
    return Encoder.from_checkpoint(ckpt), root / "out"


@pytest.mark.parametrize("batch", [1, 3])
def test_graphs_match_pytorch_with_a_dynamic_batch(exported, batch):
    enc, out = exported
    image = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    pixels = torch.randn(batch, 3, *enc.image_size, generator=torch.Generator().manual_seed(batch))
    got = image.run(None, {"pixels": pixels.numpy()})[0]
    want = enc.encode_images(pixels)
    assert got.shape == (batch, enc.embed_dim) and np.abs(got - want).max() < 1e-4
    captions = CAPTIONS[:batch]
    tokens = tokenize_captions(enc.tokenizer, captions, enc.max_words).numpy()
    got = text.run(None, {"tokens": tokens})[0]
    want = enc.encode_texts(captions)
    assert got.shape == (batch, enc.embed_dim) and np.abs(got - want).max() < 1e-4
    # different inputs give different features: the graphs did not freeze the example batch
    assert batch == 1 or np.abs(got[0] - got[1]).max() > 1e-3


def test_preprocess_json_reproduces_the_encoder_without_torch_transforms(exported):
    """Preprocess an image with numpy/PIL from preprocess.json alone: equal to Encoder.preprocess."""
    enc, out = exported
    s = json.loads((out / "preprocess.json").read_text())
    assert (out / s["text"]["tokenizer"]["vocab_file"]).is_file()
    assert s["fingerprint"] == json.loads(json.dumps(enc.fingerprint))
    assert s["text"]["context_length"] == enc.model.context_length and s["features"]["dim"] == enc.embed_dim
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 30, 3), dtype=np.uint8))
    cfg = s["image"]
    assert cfg["resize"]["interpolation"] == "bicubic"
    h, w = cfg["size"]
    x = np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) * cfg["scale"]
    x = ((x - np.array(cfg["mean"], np.float32)) / np.array(cfg["std"], np.float32)).transpose(2, 0, 1)
    assert np.abs(x - enc.preprocess(im).numpy()).max() < 1e-5
    chars = s["text"]["caption_cleaning"]["replace_with_space"]
    assert set(chars) == set('.!"()*#:;~')


def test_towers_that_cannot_export_are_refused_in_one_line(tmp_path, capsys):
    from tbps.models.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(create_untrained_checkpoint(tmp_path / "a.pt", arch="micro-vit"))
    ckpt["model_spec"]["text_tower"] = {"type": "frozen-words", "source": "random", "hidden": 8, "dim": 8}
    from tbps.models.factory import create_model
    from tbps.models.spec import ModelSpec

    ckpt["model"] = create_model(ModelSpec.from_dict(ckpt["model_spec"]), load_pretrained=False).state_dict()
    save_checkpoint(tmp_path / "textreid.pt", ckpt)
    assert main(["export", "onnx", str(tmp_path / "textreid.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "text tower 'frozen-words' does not export" in err
    assert not (tmp_path / "out" / "image_encoder.onnx").exists()


def test_a_converted_model_exports_with_its_source_preprocessing(tmp_path):
    """A converted open_clip model keeps raw captions (no tbps-clip cleaning) and shortest-side resize:
    preprocess.json says so, and the text graph fed the source's tokens gives the encoder's features."""
    sys.path.insert(0, str(Path(__file__).parent))
    import convert_refs as R

    weights = tmp_path / "random.pt"
    torch.save(R.clip_state(7, image_size=(32, 32)), weights)
    ckpt = tmp_path / "oc.pt"
    assert main(["convert", "open_clip", str(weights), str(ckpt), "--arch", R.ARCH]) == 0
    out = tmp_path / "out"
    assert main(["export", "onnx", str(ckpt), str(out)]) == 0
    settings = json.loads((out / "preprocess.json").read_text())
    assert settings["text"]["caption_cleaning"]["kind"] == "none"
    assert settings["image"]["resize"]["mode"] == "shortest"
    enc = Encoder.from_checkpoint(ckpt)
    tokens = tokenize_captions(enc.tokenizer, CAPTIONS, enc.max_words, "none").numpy()
    assert not np.array_equal(tokens, tokenize_captions(enc.tokenizer, CAPTIONS, enc.max_words).numpy())
    txt = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = txt.run(None, {"tokens": tokens})[0]
    assert np.abs(got - enc.encode_texts(CAPTIONS)).max() < 1e-4
