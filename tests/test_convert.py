"""`tbps convert`: tiny checkpoints written from scratch in each source's layout (its key names and shapes,
random weights) convert, and the converted model's features equal an independent computation from the
same weights (tests/convert_refs.py: forwards written from the published architectures; open_clip's own
model for the stock-CLIP formats). Refusals: wrong key, missing tensor, misfit shape, code in the file."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import convert_refs as R  # noqa: E402

from tbps.cli.main import main  # noqa: E402
from tbps.models.convert import ConvertError, convert  # noqa: E402
from tbps.retrieval.encoder import Encoder  # noqa: E402

TEXTS = ["A woman in a RED coat, carrying a bag.", "man; black jacket (blue jeans)!", "x"]
TOL = 2e-5


def _ids(texts):
    import open_clip

    return open_clip.tokenize(texts)  # CLIP's BPE: OpenAI's / IRRA's tokenize, 77 tokens, end-of-text kept


def _pixels(n=3, size=(32, 16)):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


def _irra_file(tmp_path, extra=None, drop=(), tse=False):
    sd = R.clip_state(0)
    model = {f"base_model.{k}": v for k, v in sd.items() if k != "logit_scale"}  # IRRA's CLIP has none
    model.update({"classifier.weight": torch.randn(11, 32), "classifier.bias": torch.zeros(11),
                  "mlm_head.fc.weight": torch.randn(8, 32), "ln_pre_t.weight": torch.ones(32)})
    if tse:
        model.update(R.tse_state("visul_emb_layer.", 32, 48, True, 1))
        model.update(R.tse_state("texual_emb_layer.", 32, 48, False, 2))
        del model["mlm_head.fc.weight"]
    model.update(extra or {})
    for k in drop:
        del model[k]
    path = tmp_path / ("rde.pth" if tse else "best.pth")
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in model.items()},
                "num_epoch": 60, "iteration": 1000}, path)
    return path, {k: (v.half().float() if v.is_floating_point() else v) for k, v in model.items()}


def _features(enc: Encoder, pixels, texts):
    return torch.from_numpy(enc.encode_images(pixels)), torch.from_numpy(enc.encode_texts(texts))


def test_irra_features_and_preprocessing(tmp_path):
    src, model = _irra_file(tmp_path)
    out = tmp_path / "irra.pt"
    summary = convert("irra", src, out, image_size=(32, 16))
    assert summary["image_size"] == [32, 16] and summary["embed_dim"] == 32
    enc = Encoder.from_checkpoint(out)
    p = {k[len("base_model."):]: v for k, v in model.items() if k.startswith("base_model.")}
    img_ref, txt_ref = R.ref_global(p, _pixels(), _ids(TEXTS))  # IRRA: raw captions, punctuation kept
    img, txt = _features(enc, _pixels(), TEXTS)
    assert (img - img_ref).abs().max() < TOL and (txt - txt_ref).abs().max() < TOL
    # IRRA's test transform: Resize((H, W), bicubic), ToTensor, CLIP mean/std
    import torchvision.transforms as T

    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 30, 3), dtype=np.uint8))
    ref = T.Compose([T.Resize((32, 16), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                     T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])(im)
    assert torch.allclose(enc.preprocess(im), ref, atol=1e-6)
    ck = torch.load(out, weights_only=True)  # tensors and plain types only
    assert ck["model_spec"]["preprocess"]["caption_cleaning"] == "none"
    assert enc.fingerprint["preprocess"]["source"] == "irra"


def test_rde_matches_rde_evaluation(tmp_path):
    src, model = _irra_file(tmp_path, tse=True)
    out = tmp_path / "rde.pt"
    convert("rde", src, out, image_size=(32, 16))
    enc = Encoder.from_checkpoint(out)
    assert enc.embed_dim == 32 + 48
    p = {k[len("base_model."):]: v for k, v in model.items() if k.startswith("base_model.")}
    texts = TEXTS + ["a man " * 40]  # longer than k = int(75 * 0.3) selected tokens
    ids = _ids(texts)
    itok, iattn = R.ref_image_tokens(p, _pixels())
    ttok, tattn = R.ref_text_tokens(p, ids)
    g_i, g_t = F.normalize(itok[:, 0], dim=-1), F.normalize(ttok[torch.arange(len(ids)), ids.argmax(-1)], dim=-1)
    s_i = F.normalize(R.ref_rde_image(model, itok, iattn), dim=-1)
    s_t = F.normalize(R.ref_rde_text(model, ttok, ids, tattn), dim=-1)
    rde_sims = (g_t @ g_i.T + s_t @ s_i.T) / 2  # RDE's 'BGE+TSE' similarity
    img, txt = _features(enc, _pixels(), texts)
    assert (txt @ img.T - rde_sims).abs().max() < TOL
    assert (txt @ img.T).argsort(1).equal(rde_sims.argsort(1))
    # the TSE half is not the global one: a wrong branch would not match
    assert (g_t @ g_i.T - rde_sims).abs().max() > 1e-3


def _tbps_clip_file(tmp_path):
    sd = R.clip_state(3, image_size=(32, 32))
    model = {(k if k.startswith("visual.") or k == "logit_scale" else f"encode_text.{k}"): v for k, v in sd.items()}
    model["simclr_mlp.0.weight"] = torch.randn(16, 32)
    path = tmp_path / "tbps_clip.pth"
    torch.save({"model": model, "epoch": 5, "config": {"experiment": {"text_length": 77}}}, path)
    return path, sd


def test_tbps_clip_features_and_caption_cleaning(tmp_path):
    src, p = _tbps_clip_file(tmp_path)
    out = tmp_path / "tc.pt"
    assert convert("tbps-clip", src, out)["image_size"] == [32, 32]
    enc = Encoder.from_checkpoint(out)
    pix = _pixels(size=(32, 32))
    cleaned = ["a woman in a red coat, carrying a bag", "man black jacket blue jeans", "x"]  # TBPS-CLIP's pre_caption
    img_ref, txt_ref = R.ref_global(p, pix, _ids(cleaned))
    img, txt = _features(enc, pix, TEXTS)
    assert (img - img_ref).abs().max() < TOL and (txt - txt_ref).abs().max() < TOL
    assert enc.model.spec.mean == (0.485, 0.456, 0.406)  # TBPS-CLIP normalises with ImageNet statistics


def _openai_archive(tmp_path):
    import open_clip

    sd = R.clip_state(5, image_size=(32, 32))
    model = open_clip.create_model(R.ARCH).eval()
    model.load_state_dict(sd)
    traced = torch.jit.trace(model, (torch.randn(1, 3, 32, 32), _ids(["a"])), strict=False, check_trace=False)
    path = tmp_path / "ViT-T.pt"
    traced.save(str(path))
    return path, model


def test_openai_torchscript_read_without_running_it(tmp_path):
    import open_clip

    src, ref = _openai_archive(tmp_path)
    out = tmp_path / "oa.pt"
    convert("openai", src, out)
    enc = Encoder.from_checkpoint(out)
    pix = _pixels(size=(32, 32))
    with torch.no_grad():
        img_ref = F.normalize(ref.encode_image(pix), dim=-1)
        txt_ref = F.normalize(ref.encode_text(_ids(TEXTS)), dim=-1)
    img, txt = _features(enc, pix, TEXTS)
    assert (img - img_ref).abs().max() < TOL and (txt - txt_ref).abs().max() < TOL
    # OpenAI's/open_clip's eval transform: short side, centre crop
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 40, 3), dtype=np.uint8))
    oc = open_clip.image_transform(32, is_train=False)
    assert torch.allclose(enc.preprocess(im), oc(im), atol=1e-6)


def _malicious_archive(path, marker):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    pickle.dump({"visual.proj": Boom()}, buf, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", buf.getvalue())
        z.writestr("m/code/__torch__/m.py", "")
        z.writestr("m/constants.pkl", b"")


def test_refuses_code_in_archives_and_pickles(tmp_path, capsys):
    marker = tmp_path / "pwned"
    arch = tmp_path / "evil.pt"
    _malicious_archive(arch, marker)
    with pytest.raises(ConvertError, match="not a tensor; refusing"):
        convert("openai", arch, tmp_path / "o.pt")
    plain = tmp_path / "evil.pth"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(plain, "wb") as f:
        pickle.dump({"model": Boom()}, f)
    assert main(["convert", "irra", str(plain), str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0]
    assert not marker.exists() and not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("case, message", [
    ("wrong_key", "unexpected key 'clip.visual.extra_head.weight'"),
    ("missing", "missing tensor 'clip.ln_final.bias'"),
    ("shape", "'clip.ln_final.weight' has shape (63,)"),
    ("no_base", "no tensor under 'base_model.'"),
])
def test_refusals_name_the_tensor(tmp_path, case, message):
    extra, drop = {}, ()
    if case == "wrong_key":
        extra = {"base_model.visual.extra_head.weight": torch.ones(2)}
    elif case == "missing":
        drop = ("base_model.ln_final.bias",)
    elif case == "shape":
        extra = {"base_model.ln_final.weight": torch.ones(63)}
    src, _ = _irra_file(tmp_path, extra=extra, drop=drop)
    if case == "no_base":
        torch.save({"model": {"visual.proj": torch.ones(2, 2)}}, src)
    with pytest.raises(ConvertError) as e:
        convert("irra", src, tmp_path / "o.pt", image_size=(32, 16))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o.pt").exists()


def test_irra_positional_embedding_must_fit_the_input_size(tmp_path):
    src, _ = _irra_file(tmp_path)
    with pytest.raises(ConvertError, match="8 patches, which a 384x128 input"):
        convert("irra", src, tmp_path / "o.pt")  # IRRA's default 384x128 does not fit a 4x2 grid


def _images(folder, n=6):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 24, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_open_clip_file_end_to_end_cli(tmp_path, capsys):
    import open_clip

    sd = R.clip_state(7, image_size=(32, 32))
    weights = tmp_path / "random.pt"
    torch.save(sd, weights)
    ckpt = tmp_path / "oc.pt"
    assert main(["convert", "open_clip", str(weights), str(ckpt), "--arch", R.ARCH]) == 0
    enc = Encoder.from_checkpoint(ckpt)
    ref = open_clip.create_model(R.ARCH).eval()
    ref.load_state_dict(sd)
    im = Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 20, 3), dtype=np.uint8))
    _, _, oc_pre = open_clip.create_model_and_transforms(R.ARCH)
    pix = enc.preprocess(im)[None]
    assert torch.allclose(pix, oc_pre(im)[None], atol=1e-6)
    with torch.no_grad():
        want = F.normalize(ref.encode_image(pix), dim=-1)
    assert (torch.from_numpy(enc.encode_images(pix)) - want).abs().max() < TOL
    capsys.readouterr()
    idx = tmp_path / "g.idx"
    assert main(["index", "build", str(idx), "--checkpoint", str(ckpt), "--images", str(_images(tmp_path / "imgs")),
                 "--workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), "a person in a red coat", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    hits = hits["results"] if isinstance(hits, dict) else hits
    assert len(hits) == 3


def test_converted_checkpoint_initialises_training_and_fingerprints_differ(tmp_path):
    from tbps.engine.train import _init_weights
    from tbps.models.factory import create_model
    from tbps.models.spec import ModelSpec

    src, _ = _irra_file(tmp_path)
    out = tmp_path / "irra.pt"
    convert("irra", src, out, image_size=(32, 16))
    spec = ModelSpec.from_dict(torch.load(out, weights_only=True)["model_spec"])
    fresh = create_model(ModelSpec(arch=spec.arch, arch_config=spec.arch_config), load_pretrained=False)
    msg = _init_weights({"model": fresh}, str(out), None)  # released models have no conv stem
    assert "tensors loaded" in msg and "new here" not in msg
    convert("irra", src, tmp_path / "irra2.pt", image_size=(32, 16), resize="shortest")
    a, b = Encoder.from_checkpoint(out).fingerprint, Encoder.from_checkpoint(tmp_path / "irra2.pt").fingerprint
    assert a["preprocess"]["resize"] != b["preprocess"]["resize"]


def test_eval_of_a_converted_checkpoint_uses_its_preprocessing(tmp_path, tiny_dataset):
    """`tbps eval`'s path (evaluate_checkpoint) encodes as the encoder does: IRRA's raw captions, its resize."""
    from tbps.engine.evaluate import evaluate_checkpoint

    src, _ = _irra_file(tmp_path)
    out = tmp_path / "irra.pt"
    convert("irra", src, out, image_size=(32, 16))
    ev = evaluate_checkpoint(out, tiny_dataset, "test")
    enc = Encoder.from_checkpoint(out)
    pix = torch.stack([enc.preprocess(Image.open(p)) for p in ev.result.image_paths])
    want = enc.encode_texts(ev.result.captions) @ enc.encode_images(pix).T
    assert np.abs(ev.result.similarity.numpy() - want).max() < 1e-5
    assert any(c != c.lower() or "." in c or "," in c for c in ev.result.captions)  # cleaning would matter


def test_openai_resnet_state_dict(tmp_path):
    """A CLIP ResNet (RN50's layout, tiny): layers, width and input size read from the shapes."""
    import open_clip

    cfg = {"embed_dim": 32, "quick_gelu": True,
           "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "patch_size": None},
           "text_cfg": dict(R.CFG["text_cfg"])}
    open_clip.factory._MODEL_CONFIGS["convtest-rn"] = cfg
    torch.manual_seed(0)
    ref = open_clip.create_model("convtest-rn").eval()
    torch.save(ref.state_dict(), tmp_path / "RN-T.pt")
    summary = convert("openai", tmp_path / "RN-T.pt", tmp_path / "rn.pt")
    assert summary["image_size"] == [64, 64]
    enc = Encoder.from_checkpoint(tmp_path / "rn.pt")
    pix = _pixels(2, (64, 64))
    with torch.no_grad():
        img_ref = F.normalize(ref.encode_image(pix), dim=-1)
        txt_ref = F.normalize(ref.encode_text(_ids(TEXTS)), dim=-1)
    img, txt = _features(enc, pix, TEXTS)
    assert (img - img_ref).abs().max() < TOL and (txt - txt_ref).abs().max() < TOL
