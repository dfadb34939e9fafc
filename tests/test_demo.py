"""`tbps demo` end to end with a tiny amount of work: metrics printed, picture and results written;
the figures it tells a user to expect are the README's and apply only to the settings they were
measured with."""

import json
import re
from pathlib import Path

from PIL import Image

from tbps.cli.main import main
from tests.conftest import MICRO


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--ids", "15", "--images-per-id", "2", "--epochs", "2",
               "--queries", "3", *MICRO])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "text->image" in printed and "picture:" in printed
    assert "no measured figures to expect for these settings (ids, images_per_id, epochs, recipe overrides" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["test"]["t2i"]) == {"R1", "R5", "R10", "mAP", "mINP"}
    assert res["test"]["gallery"] > 0
    # a fixed amount of work: every step of the 2 epochs, whatever the machine's speed
    raw = json.loads((out / "data" / "reid_raw.json").read_text())
    steps_per_epoch = sum(len(r["captions"]) for r in raw if r["split"] == "train") // 8  # pairs / micro batch
    assert (res["train"]["global_step"], res["train"]["total_steps"]) == (2 * steps_per_epoch, 2 * steps_per_epoch)
    assert not res["train"]["stopped_by_budget"] and res["settings"]["epochs"] == 2
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
    assert "time budget" in capsys.readouterr().out  # a budget run is never promised the measured figures


def test_expected_figures_only_for_the_measured_settings():
    from tbps.cli.demo import expected, expected_figures

    spec = expected()
    same = {**spec["settings"], "minutes": None, "user_overrides": []}
    fig, spread = spec["figures"], spec["spread"]
    line = expected_figures(spec, same)
    assert f"R@1 {fig['R1']:.2f}, mAP {fig['mAP']:.2f}" in line and f"±{2 * spread['R1_std']:.1f} R@1" in line
    assert "also changes the dataset" in expected_figures(spec, {**same, "seed": same["seed"] + 1})
    for change, named in (({"epochs": same["epochs"] + 1}, "epochs"), ({"ids": 10}, "ids"),
                          ({"minutes": 8.0}, "time budget"), ({"user_overrides": ["optim.lr=1"]}, "recipe overrides"),
                          ({"recipe": "irra-cpu"}, "recipe")):
        line = expected_figures(spec, {**same, **change})
        assert line.startswith("no measured figures") and f"({named} differ" in line, line


def test_readme_shows_the_figures_the_demo_prints():
    """One source: the demo prints demo_expected.json; the README's demo section must show the same."""
    from tbps.cli.demo import expected

    spec = expected()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### The demo run"):]
    section = section[:section.index("\n## ")]
    fig, want = spec["figures"], spec["settings"]
    assert re.search(rf"test text->image R@1 {fig['R1']:.2f}, R@5 {fig['R5']:.2f}, R@10 {fig['R10']:.2f}, "
                     rf"mAP {fig['mAP']:.2f}, mINP {fig['mINP']:.2f}", section), "the demo's figures are missing"
    assert f"{want['epochs']} epochs ({fig['steps']} steps" in section and " ".join(want["overrides"]) in section
    assert f"{spec['spread']['R1_std']:.2f}" in section
