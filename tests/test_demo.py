"""`tbps demo` end to end with a tiny budget: metrics printed, picture and results written."""

import json

from PIL import Image

from tbps.cli.main import main
from tests.conftest import MICRO


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--ids", "15", "--images-per-id", "2", "--minutes", "0.05",
               "--queries", "3", *MICRO])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "text->image" in printed and "picture:" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["test"]["t2i"]) == {"R1", "R5", "R10", "mAP", "mINP"}
    assert res["test"]["gallery"] > 0
    with Image.open(out / "retrieval.png") as im:
        # three query rows of 5 thumbnails beside the text
        assert im.format == "PNG" and im.width > 5 * 64 and im.height > 3 * 128
    # rerunning refuses to replace the earlier run without --overwrite (its best.pt unchanged) ...
    best = (out / "run" / "best.pt").read_bytes()
    assert main(["demo", "--out", str(out), "--minutes", "0.02", "--queries", "2", *MICRO]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "run" / "best.pt").read_bytes() == best
    # ... and with it reuses the dataset, not rewriting it
    mtime = (out / "data" / "reid_raw.json").stat().st_mtime
    assert main(["demo", "--out", str(out), "--minutes", "0.02", "--queries", "2", "--overwrite", *MICRO]) == 0
    assert (out / "data" / "reid_raw.json").stat().st_mtime == mtime


def test_retrieval_grid_frames_correct_images_green(tmp_path):
    from tbps.retrieval.viz import GREEN, RED, retrieval_grid

    paths = []
    for i, colour in enumerate(["blue", "yellow"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 64), colour).save(p)
        paths.append(p)
    out = retrieval_grid(tmp_path / "grid.png", ["a query"], [paths], [[True, False]], [[0.9, 0.1]],
                         thumb=(64, 32), text_width=100)
    with Image.open(out) as im:
        im = im.convert("RGB")
        pad, border = 10, 4
        x0 = pad + 100  # first thumbnail's frame starts after the text column
        x1 = x0 + 32 + 2 * border + pad
        y = pad + 2
        assert im.getpixel((x0 + 1, y)) == GREEN and im.getpixel((x1 + 1, y)) == RED
        assert im.getpixel((x0 + border + 5, y + border + 5)) == (0, 0, 255)  # the image itself
