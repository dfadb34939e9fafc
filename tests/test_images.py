"""``tbps.data.images.open_image``: every PIL mode to RGB by its meaning, EXIF orientation, bombs;
and the index, training and thumbnail paths all seeing an image the same way."""

from __future__ import annotations

import io
import pathlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tbps.data.images import ImageError, ImageTooLarge, open_image, to_rgb
from tests.fake_encoder import FakeEncoder


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels but holds a few bytes of data:
    a decompression bomb's header without allocating anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _p_image(transparent: bool) -> Image.Image:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    if transparent:
        im.info["transparency"] = 1
    return im


def _i16b(value: int) -> Image.Image:
    return Image.frombytes("I;16B", (4, 4), np.full((4, 4), value, ">u2").tobytes())


# mode -> (an image in that mode, the RGB every pixel must become, tolerance)
MODES = {
    "1": (lambda: Image.new("1", (4, 4), 1), (255, 255, 255), 0),
    "L": (lambda: Image.new("L", (4, 4), 128), (128, 128, 128), 0),
    "LA opaque": (lambda: Image.new("LA", (4, 4), (128, 255)), (128, 128, 128), 0),
    "LA transparent": (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255), 0),  # over white, not black
    "P": (lambda: _p_image(False), (200, 10, 10), 0),
    "P transparent": (lambda: _p_image(True), (255, 255, 255), 0),
    "PA transparent": (lambda: Image.new("RGBA", (4, 4), (200, 10, 10, 0)).convert("PA"), (255, 255, 255), 0),
    "RGB": (lambda: Image.new("RGB", (4, 4), (200, 10, 10)), (200, 10, 10), 0),
    "RGBA opaque": (lambda: Image.new("RGBA", (4, 4), (200, 10, 10, 255)), (200, 10, 10), 0),
    "RGBA half": (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127), 1),
    "RGBA transparent": (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255, 255, 255), 0),
    "CMYK": (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0), 0),
    "I;16": (lambda: Image.fromarray(np.full((4, 4), 128 * 257, np.uint16)), (128, 128, 128), 0),
    "I;16 dark": (lambda: Image.fromarray(np.full((4, 4), 20 * 257, np.uint16)), (20, 20, 20), 0),
    "I;16B": (lambda: _i16b(200 * 257), (200, 200, 200), 0),
    "I 16-bit range": (lambda: Image.new("I", (4, 4), 128 * 257), (128, 128, 128), 0),
    "I 8-bit range": (lambda: Image.new("I", (4, 4), 100), (100, 100, 100), 0),
    "F unit range": (lambda: Image.new("F", (4, 4), 0.5), (128, 128, 128), 0),
    "F 8-bit range": (lambda: Image.new("F", (4, 4), 200.0), (200, 200, 200), 0),
    "YCbCr": (lambda: Image.new("RGB", (4, 4), (200, 10, 10)).convert("YCbCr"), (200, 10, 10), 3),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_becomes_rgb_by_its_meaning(mode):
    make, want, tol = MODES[mode]
    im = make()
    assert im.mode == mode.split()[0]
    out = np.asarray(to_rgb(im), dtype=np.int16)
    assert out.shape == (4, 4, 3)
    assert np.abs(out - np.array(want)).max() <= tol, (mode, out[0, 0], want)


@pytest.mark.parametrize("mode", ["I;16", "LA transparent", "P transparent", "RGBA half", "1", "CMYK"])
def test_modes_survive_a_file_round_trip(mode, tmp_path):
    make, want, tol = MODES[mode]
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    make().save(path, fmt)
    out = np.asarray(open_image(path), dtype=np.int16)
    assert np.abs(out - np.array(want)).max() <= tol, (mode, out[0, 0])


def _oriented(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _bytes(im, "PNG", exif=exif)


def _arrow() -> Image.Image:
    """A 6x10 image whose every pixel differs from its rotations' (no symmetry)."""
    return Image.fromarray(np.arange(6 * 10 * 3, dtype=np.uint8).reshape(10, 6, 3) * 3, "RGB")


def test_exif_orientation_is_applied():
    upright = _arrow()
    # orientation 6: the stored pixels must be turned 90 degrees clockwise to be upright,
    # so store them turned 90 degrees anticlockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    out = open_image(_oriented(stored, 6))
    assert out.size == upright.size
    assert np.array_equal(np.asarray(out), np.asarray(upright))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bombs_are_refused_before_decoding():
    with pytest.raises(ImageTooLarge, match="12000x8000"):
        open_image(png_header(12000, 8000))  # 96 MP > the 64 MP default: refused on the header
    with pytest.raises(ImageTooLarge):
        open_image(png_header(2000, 2000), max_pixels=1_000_000)


def test_jpeg_draft_decodes_a_big_jpeg_small():
    data = _bytes(Image.new("L", (4000, 3000), 90), "JPEG", quality=50)
    with pytest.raises(ImageTooLarge):
        open_image(data, max_pixels=1_000_000)
    out = open_image(data, max_pixels=1_000_000, draft=(512, 512))
    assert out.size == (1000, 750) and out.mode == "RGB"  # decoded at 1/4 scale
    assert abs(int(np.asarray(out)[10, 10, 0]) - 90) <= 2


def test_unreadable_images_are_image_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(b"<html>not an image</html>")
    with pytest.raises(ImageError, match="not an image"):
        open_image(tmp_path / "x.png")
    with pytest.raises(ImageError, match="cannot decode"):
        open_image(_bytes(_arrow(), "PNG")[:60])
    assert ImageError.user_error


# ---- every use sees the same image ----------------------------------------------------


def _features(root, files: dict[str, bytes]):
    """Index ``files`` with the fake encoder; {name: feature}."""
    from tbps.index import GalleryIndex, build_index

    images = root / "images"
    images.mkdir()
    for name, data in files.items():
        (images / name).write_bytes(data)
    enc = FakeEncoder()
    build_index(root / "idx", enc, images, workers=0, progress=False)
    with GalleryIndex.open(root / "idx") as ix:
        return {pathlib.Path(ix.get(int(i)).path).name: ix.feature(int(i)) for i in ix.ids}, enc


def test_index_embeds_16_bit_png_like_its_8_bit_twin(tmp_path):
    grey = np.tile(np.linspace(10, 240, 8).astype(np.uint8), (16, 1))  # (16, 8) a grey ramp
    files = {"g8.png": _bytes(Image.fromarray(grey, "L")),
             "g16.png": _bytes(Image.fromarray(grey.astype(np.uint16) * 257))}
    assert Image.open(io.BytesIO(files["g16.png"])).mode == "I;16"
    feats, _ = _features(tmp_path, files)
    assert float(feats["g8.png"] @ feats["g16.png"]) == pytest.approx(1.0, abs=1e-5)


def test_index_training_and_thumbnails_share_the_orientation(tmp_path):
    from tbps.data.transforms import load_image
    from tbps.serve.runtime import make_thumbnail

    upright = _arrow().resize((40, 80), Image.Resampling.NEAREST)
    files = {"upright.png": _bytes(upright), "tagged.png": _oriented(upright.transpose(Image.Transpose.ROTATE_90), 6)}
    feats, _ = _features(tmp_path, files)
    assert float(feats["upright.png"] @ feats["tagged.png"]) == pytest.approx(1.0, abs=1e-5)
    a, b = (load_image(tmp_path / "images" / n, (16, 8)) for n in files)  # the training pipeline
    assert np.array_equal(np.asarray(a), np.asarray(b))
    ta, tb = (Image.open(io.BytesIO(make_thumbnail(tmp_path / "images" / n))) for n in files)
    assert ta.size == tb.size == (40, 80)


def test_to_tensor_is_bit_identical_to_torchvision():
    """tbps's NumPy to_tensor gives exactly torchvision's pil_to_tensor / 255 then normalize."""
    import torch
    from torchvision.transforms.functional import normalize, pil_to_tensor

    from tbps.data.transforms import to_tensor

    rng = np.random.default_rng(3)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for h, w in ((96, 48), (7, 13)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = normalize(pil_to_tensor(img).float().div_(255.0), mean, std)
        out = to_tensor(img, mean, std)
        assert out.dtype == torch.float32 and out.shape == (3, h, w)
        assert torch.equal(out, ref)
