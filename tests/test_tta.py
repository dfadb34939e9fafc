"""The gallery's mirror-image average (``--tta flip``): the formula, evaluation, and an index that keeps
using it for additions and image queries."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tbps.cli.main import main
from tbps.index import GalleryIndex
from tbps.index.errors import EncoderMismatchError
from tbps.retrieval.encoder import Encoder, create_untrained_checkpoint, image_features

sys.path.insert(0, os.path.dirname(__file__))
from test_index import write_images  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return create_untrained_checkpoint(tmp_path_factory.mktemp("tta") / "best.pt", arch="micro-vit", seed=5)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_flip_is_the_normalised_mean_with_the_left_right_mirror(ckpt):
    model = Encoder.from_checkpoint(ckpt).model
    h, w = model.image_size
    assert h != w  # a person crop: flipping the wrong axis would change the shape's meaning, and the figures
    torch.manual_seed(0)
    x = torch.randn(3, 3, h, w)
    with torch.no_grad():
        plain, got = image_features(model, x), image_features(model, x, "flip")
        mirrored = F.normalize(model.encode_image(x.flip(3)).float(), dim=-1)
        upside_down = F.normalize(model.encode_image(x.flip(2)).float(), dim=-1)
        mirror_of_mirror = image_features(model, x.flip(3), "flip")
    torch.testing.assert_close(got, F.normalize((plain + mirrored) / 2, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(mirror_of_mirror, got, atol=1e-5, rtol=0)  # a mirror image gets the same feature
    assert (got - plain).abs().max() > 1e-3 and (got - F.normalize(plain + upside_down, dim=-1)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown image test-time augmentation 'rot90'"):
        image_features(model, x, "rot90")


def test_eval_with_flip_ranks_the_mirror_averaged_gallery(ckpt, tiny_dataset, capsys):
    from tbps.data.layouts import load_annotations
    from tbps.data.dataset import eval_split
    from tbps.engine.evaluate import evaluate_checkpoint
    from tbps.retrieval.encoder import encode_captions, encode_images
    from tbps.retrieval.metrics import evaluate_both

    rc, out, err = run_cli(capsys, "eval", ckpt, "--data", tiny_dataset, "--tta", "flip", "--json")
    assert rc == 0, err
    cli = json.loads(out)
    assert cli["image_tta"] == "flip"
    # By hand: the test split's captions against its images, each averaged with its mirror image.
    enc = Encoder.from_checkpoint(ckpt)
    paths, image_ids, captions, caption_ids = eval_split(load_annotations(tiny_dataset, progress=False).split("test"))
    img = encode_images(enc.model, paths, batch_size=7, progress=False, tta="flip")
    txt = encode_captions(enc.model, enc.tokenizer, captions, max_words=enc.max_words, progress=False)
    by_hand = evaluate_both(txt @ img.t(), torch.tensor(caption_ids), torch.tensor(image_ids))
    assert cli["t2i"] == pytest.approx(by_hand["t2i"], abs=1e-4) and cli["i2t"] == pytest.approx(by_hand["i2t"], abs=1e-4)
    plain = evaluate_checkpoint(ckpt, tiny_dataset, "test").result.similarity
    flipped = evaluate_checkpoint(ckpt, tiny_dataset, "test", image_tta="flip").result.similarity
    torch.testing.assert_close(flipped, txt @ img.t(), atol=1e-5, rtol=0)
    assert (plain - flipped).abs().max() > 1e-3
    rc, out, _ = run_cli(capsys, "eval", ckpt, "--data", tiny_dataset, "--tta", "flip")
    assert rc == 0 and "mirror images (--tta flip)" in out


def _features_by_path(index_dir) -> dict[str, np.ndarray]:
    with GalleryIndex.open(index_dir) as ix:
        return {ix.get(int(i)).path: ix.feature(int(i)) for i in ix.ids}


def _flip_features(enc: Encoder, paths) -> np.ndarray:
    pixels = torch.stack([enc.preprocess(Image.open(p).convert("RGB")) for p in paths])
    return enc.encode_images(pixels)


def test_index_built_with_flip_keeps_it_for_additions_and_image_queries(ckpt, tmp_path, capsys):
    imgs, idx = tmp_path / "imgs", tmp_path / "idx"
    paths = write_images(imgs, 8)
    flip = Encoder.from_checkpoint(ckpt, image_tta="flip")
    assert flip.fingerprint["image_tta"] == "flip" and "image_tta" not in Encoder.from_checkpoint(ckpt).fingerprint
    rc, out, err = run_cli(capsys, "index", "build", idx, "--checkpoint", ckpt, "--images", imgs, "--tta", "flip",
                           "--workers", "0", "--no-progress", "--json")
    assert rc == 0, err
    feats = _features_by_path(idx)
    want = _flip_features(flip, paths)
    np.testing.assert_allclose(np.stack([feats[str(p.resolve())] for p in paths]), want, atol=1e-5)
    with GalleryIndex.open(idx) as ix:
        assert ix.fingerprint["image_tta"] == "flip"
        ix.check_encoder(flip)
        with pytest.raises(EncoderMismatchError, match="image_tta: index has 'flip'") as e:
            ix.check_encoder(Encoder.from_checkpoint(ckpt))  # a plain encoder would mix two kinds of features
        assert "has changed since" not in str(e.value)  # the same checkpoint file: not a changed checkpoint
    # `index add` and `search` read the index's setting: no flag to forget.
    added = write_images(imgs, 2, seed=3, start=100)
    rc, out, err = run_cli(capsys, "index", "add", idx, imgs, "--workers", "0", "--no-progress", "--json")
    assert rc == 0 and json.loads(out)["added"] == 2, err
    feats = _features_by_path(idx)
    np.testing.assert_allclose(np.stack([feats[str(p.resolve())] for p in added]), _flip_features(flip, added), atol=1e-5)
    rc, out, err = run_cli(capsys, "search", idx, "a man in a red coat", "-k", "3", "--json")
    assert rc == 0 and len(json.loads(out)["results"]) == 3, err
    rc, out, err = run_cli(capsys, "search", idx, "--image", paths[5], "-k", "1", "--json")
    top = json.loads(out)["results"][0]
    assert rc == 0 and top["path"] == str(paths[5].resolve()) and top["score"] == pytest.approx(1.0, abs=1e-5), err
    # A partitioned build records and applies it the same way.
    rc, out, err = run_cli(capsys, "index", "build", tmp_path / "parts.idx", "--checkpoint", ckpt, "--images", imgs,
                           "--tta", "flip", "--partition-size", "4", "--workers", "0", "--no-progress", "--json")
    assert rc == 0, err
    np.testing.assert_allclose(np.stack([_features_by_path(tmp_path / "parts.idx")[str(p.resolve())] for p in paths]),
                               want, atol=1e-5)
