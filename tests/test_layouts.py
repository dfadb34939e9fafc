"""Annotation adapters: tiny fake datasets in each public layout, written here with PIL."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from tbps.data.layouts import LAYOUTS, detect_layout, load_annotations
from tbps.data.records import Annotations, DataError, DataWarning, Record
from tbps.data.text import clean_caption


def _image(path: Path, fmt: str = "PNG", color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), color).save(path, fmt)


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# Three images, one per split, shared by the public-layout fixtures.
BASE = [
    {"rel": "cam1/0001_a.png", "id": 1, "split": "train", "captions": ["A man in a RED coat.", "He walks."]},
    {"rel": "cam1/0002_a.jpg", "id": 2, "split": "val", "captions": ["A woman with a bag."]},
    {"rel": "cam2/0003_b.png", "id": 3, "split": "test", "captions": ["Kid; blue shirt!", "jeans"]},
]


def _public(root: Path, ann_name: str, image_key: str, records=BASE, extra=None) -> Path:
    """A CUHK/ICFG/RSTP-style dataset: one json list + images under imgs/."""
    for r in records:
        _image(root / "imgs" / r["rel"], "JPEG" if r["rel"].endswith(".jpg") else "PNG")
    anns = [
        {image_key: r["rel"], "id": r["id"], "split": r["split"], "captions": r["captions"], **(extra or {})}
        for r in records
    ]
    _write_json(root / ann_name, anns)
    return root


@pytest.fixture
def cuhk(tmp_path):
    return _public(tmp_path / "CUHK-PEDES", "reid_raw.json", "file_path", extra={"processed_tokens": [["a"]]})


def _expect_error(root, *parts, layout=None, **kw):
    """load_annotations must raise a DataError whose message holds every part."""
    with pytest.raises(DataError) as info:
        load_annotations(root, layout, **kw)
    msg = str(info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# Detection and records of each layout.


@pytest.mark.parametrize(
    "name, ann_name, image_key",
    [
        ("cuhk-pedes", "reid_raw.json", "file_path"),
        ("icfg-pedes", "ICFG-PEDES.json", "file_path"),
        ("icfg-pedes", "ICFG_PEDES.json", "file_path"),
        ("rstpreid", "data_captions.json", "img_path"),
    ],
)
def test_public_layouts_detect_and_load(tmp_path, name, ann_name, image_key):
    root = _public(tmp_path / "ds", ann_name, image_key)
    assert detect_layout(root) == name
    ann = load_annotations(root)
    assert isinstance(ann, Annotations)
    assert ann.layout == name and ann.root == root and ann.skipped == []
    assert len(ann.records) == 3
    for rec, src in zip(ann.records, BASE):
        assert rec.image == root / "imgs" / src["rel"]
        assert rec.image.is_absolute() and rec.image.is_file()
        assert rec.pid == src["id"]  # raw id, not remapped (CUHK starts at 1)
        assert rec.split == src["split"]
        assert rec.captions == tuple(src["captions"])  # raw, uncleaned
        assert rec.captions_bt is None
    assert ann.splits() == ["train", "val", "test"]
    assert [r.pid for r in ann.split("test")] == [3]


def test_load_accepts_relative_root_and_annotation_file(cuhk, monkeypatch):
    monkeypatch.chdir(cuhk.parent)
    ann = load_annotations("CUHK-PEDES")
    assert ann.root == cuhk and ann.records[0].image == cuhk / "imgs" / BASE[0]["rel"]
    # naming the annotation file itself picks its folder and layout
    assert detect_layout(cuhk / "reid_raw.json") == "cuhk-pedes"
    assert len(load_annotations(cuhk / "reid_raw.json").records) == 3


def test_tbps_clip_bundle(tmp_path):
    root = tmp_path / "bundle"
    for r in BASE:
        _image(root / "imgs" / r["rel"])
    train = [{"file_path": "cam1/0001_a.png", "id": 1, "captions": ["a b", "c d"], "captions_bt": ["a-b", ""]}]
    test = [
        {"file_path": "cam2/0003_b.png", "id": 3, "captions": ["kid"], "split": "train"},  # file decides
        {"file_path": "cam1/0002_a.jpg", "id": 2, "captions": ["woman"]},
    ]
    _write_json(root / "train_reid.json", train)
    _write_json(root / "test_reid.json", test)
    assert detect_layout(root) == "tbps-clip"
    ann = load_annotations(root)
    assert ann.splits() == ["train", "test"]
    (tr,) = ann.split("train")
    assert tr.captions == ("a b", "c d")
    # empty back-translation falls back to the caption it paraphrases
    assert tr.captions_bt == ("a-b", "c d")
    assert [r.pid for r in ann.split("test")] == [3, 2]
    assert all(r.captions_bt is None for r in ann.split("test"))
    assert ann.split("test")[0].image == root / "imgs" / "cam2/0003_b.png"
    # no val file -> asking for val names what exists
    with pytest.raises(DataError, match=r"'val'.*train \(1 images\), test \(2 images\)"):
        ann.split("val")
    # an optional val_reid.json is read as the val split
    _write_json(root / "val_reid.json", [{"file_path": "cam1/0002_a.jpg", "id": 2, "captions": ["v"]}])
    assert load_annotations(root).splits() == ["train", "val", "test"]


def test_tbps_clip_image_root_elsewhere(tmp_path):
    anno, images = tmp_path / "anno", tmp_path / "images"
    _image(images / "x/1.png")
    _write_json(anno / "test_reid.json", [{"file_path": "x/1.png", "id": 5, "captions": ["c"]}])
    _expect_error(anno, "image folder", "imgs")  # default imgs/ beside the json is absent
    ann = load_annotations(anno, image_root=images)
    assert ann.records[0].image == images / "x/1.png"


def test_bt_length_mismatch(tmp_path):
    root = tmp_path / "b"
    _image(root / "imgs/1.png")
    _write_json(root / "train_reid.json", [{"file_path": "1.png", "id": 1, "captions": ["a", "b"], "captions_bt": ["x"]}])
    _expect_error(root, "train_reid.json", "record 0", "captions_bt", "1 entries for 2 captions")


def test_jsonl_layout(tmp_path):
    root = tmp_path / "mine"
    _image(root / "crops/a.png")
    _image(root / "crops/b.jpg", "JPEG")
    lines = [
        json.dumps({"image": "crops/a.png", "captions": ["one", "two"], "id": 7, "split": "train"}),
        "",  # blank lines are ignored
        json.dumps({"image": "crops/b.jpg", "caption": "single caption", "id": 8, "split": "test",
                    "extra": "ignored"}),
    ]
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    assert detect_layout(root) == "jsonl"
    ann = load_annotations(root)
    a, b = ann.records
    assert a.image == root / "crops/a.png" and a.captions == ("one", "two") and a.pid == 7 and a.split == "train"
    assert b.image == root / "crops/b.jpg" and b.captions == ("single caption",) and b.split == "test"


def test_jsonl_errors_name_the_line(tmp_path):
    root = tmp_path / "mine"
    _image(root / "a.png")
    good = json.dumps({"image": "a.png", "captions": ["x"], "id": 1, "split": "train"})
    (root / "annotations.jsonl").write_text(good + "\n\n{broken\n")
    _expect_error(root, "annotations.jsonl", "line 3", "invalid JSON")
    (root / "annotations.jsonl").write_text(good + "\n" + json.dumps({"image": "a.png", "id": 1, "split": "train"}))
    _expect_error(root, "annotations.jsonl", "line 2", "'captions'", "missing field")
    (root / "annotations.jsonl").write_text("\n\n")
    _expect_error(root, "annotations.jsonl", "no records")


def test_layout_names_and_aliases(cuhk):
    assert set(LAYOUTS) == {"cuhk-pedes", "icfg-pedes", "rstpreid", "tbps-clip", "jsonl"}
    for name, adapter in LAYOUTS.items():
        assert adapter.name == name
    assert load_annotations(cuhk, "CUHK_PEDES").layout == "cuhk-pedes"
    # an explicit layout is obeyed even if it does not match: the error names its file
    _expect_error(cuhk, "data_captions.json", layout="rstpreid")


# ---------------------------------------------------------------------------------------------
# Detection errors.


def test_unknown_layout_lists_known(cuhk):
    msg = _expect_error(cuhk, "unknown dataset layout 'coco'", layout="coco")
    for name in LAYOUTS:
        assert name in msg


def test_ambiguous_layout(cuhk):
    _write_json(cuhk / "data_captions.json", [])
    with pytest.raises(DataError, match="ambiguous.*cuhk-pedes.*rstpreid"):
        detect_layout(cuhk)
    assert load_annotations(cuhk, "cuhk-pedes").layout == "cuhk-pedes"


def test_no_layout_lists_what_it_looked_for(tmp_path, cuhk):
    empty = tmp_path / "nothing"
    empty.mkdir()
    msg = _expect_error(empty, "no known dataset layout", "reid_raw.json", "ICFG_PEDES.json", "data_captions.json",
                        "train_reid.json", "annotations.jsonl")
    assert "Subfolders" not in msg
    # the parent of a dataset folder: the message points at the subfolder
    _expect_error(cuhk.parent, "CUHK-PEDES/ (cuhk-pedes)")


def test_root_missing(tmp_path, cuhk):
    _expect_error(tmp_path / "nope", "nope", "does not exist")
    _expect_error(cuhk, "image folder", "elsewhere", "does not exist", image_root=tmp_path / "elsewhere")
    _expect_error(cuhk / "imgs" / BASE[0]["rel"], "0001_a.png", "not a dataset folder")
    with pytest.raises(DataError, match="does not exist"):
        detect_layout(tmp_path / "nope")


def test_data_error_is_a_one_line_cli_error():
    from tbps.cli.main import _is_user_error

    assert _is_user_error(DataError("x")) and not _is_user_error(ValueError("x"))


def test_both_icfg_names_warns_and_reads_hyphenated(tmp_path):
    root = _public(tmp_path / "icfg", "ICFG-PEDES.json", "file_path")
    _write_json(root / "ICFG_PEDES.json", [{"file_path": "nope.png", "id": 9, "split": "train", "captions": ["x"]}])
    with pytest.warns(DataWarning, match="both ICFG-PEDES.json and ICFG_PEDES.json exist; reading ICFG-PEDES.json"):
        ann = load_annotations(root)
    assert [r.pid for r in ann.records] == [1, 2, 3]


def test_byte_order_mark_and_dotted_paths(tmp_path):
    root = tmp_path / "r"
    _image(root / "imgs/a/1.png")
    text = json.dumps([{"img_path": "b/../a/1.png", "id": 4, "split": "train", "captions": ["c"]}])
    (root / "data_captions.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (rec,) = load_annotations(root).records
    assert rec.image == root / "imgs/a/1.png"  # normalised, still absolute


# ---------------------------------------------------------------------------------------------
# Broken annotation files: always an error naming file, record and key.


def _cuhk_with(tmp_path, records) -> Path:
    root = tmp_path / "c"
    _image(root / "imgs/1.png")
    _write_json(root / "reid_raw.json", records)
    return root


GOOD = {"file_path": "1.png", "id": 1, "split": "train", "captions": ["a person"]}


@pytest.mark.parametrize(
    "bad, parts",
    [
        ({k: v for k, v in GOOD.items() if k != "captions"}, ["missing field 'captions'", "fields present"]),
        ({k: v for k, v in GOOD.items() if k != "id"}, ["missing field 'id'"]),
        ({k: v for k, v in GOOD.items() if k != "file_path"}, ["missing field 'file_path'"]),
        ({**GOOD, "captions": []}, ["'captions'", "empty list"]),
        ({**GOOD, "captions": ["ok", "  "]}, ["'captions'[1]", "empty caption"]),
        ({**GOOD, "captions": "a string"}, ["'captions'", "must be a list"]),
        ({**GOOD, "captions": ["ok", 3]}, ["'captions'[1]", "must be a string"]),
        ({**GOOD, "id": "7"}, ["'id'", "integer", "'7'"]),
        ({**GOOD, "id": 7.5}, ["'id'", "integer"]),
        ({**GOOD, "id": True}, ["'id'", "integer"]),
        ({**GOOD, "split": "dev"}, ["'split'", "'dev'", "train, val, test"]),
        ({**GOOD, "file_path": ""}, ["'file_path'", "non-empty"]),
        (["not", "an", "object"], ["expected an object"]),
    ],
)
def test_bad_record_names_file_record_and_key(tmp_path, bad, parts):
    root = _cuhk_with(tmp_path, [GOOD, GOOD, bad])
    _expect_error(root, str(root / "reid_raw.json"), "record 2", *parts)
    # check_images=False does not relax annotation checks
    _expect_error(root, "record 2", *parts, check_images=False)


def test_corrupt_json_names_line_and_column(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "reid_raw.json").write_text('[\n  {"id": 1,\n   "split": "train" "captions": []}\n]')
    _expect_error(root, "reid_raw.json", "invalid JSON", "line 3", "column 21")


def test_top_level_not_a_list(tmp_path):
    root = tmp_path / "r"
    _write_json(root / "data_captions.json", {"annotations": []})
    _expect_error(root, "data_captions.json", "expected a JSON list", "got an object")


def test_empty_annotation_list(tmp_path):
    root = tmp_path / "r"
    (root / "imgs").mkdir(parents=True)
    _write_json(root / "data_captions.json", [])
    _expect_error(root, "data_captions.json", "no records")


def test_not_utf8(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "data_captions.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    _expect_error(root, "data_captions.json", "not UTF-8")


def test_record_message_names_image_key_value(tmp_path):
    root = _cuhk_with(tmp_path, [GOOD, {**GOOD, "file_path": "x/9.png", "split": "holdout"}])
    _expect_error(root, "record 1 (file_path='x/9.png')")


# ---------------------------------------------------------------------------------------------
# Images: missing / corrupt are skipped with one warning, or raise with strict.


def test_missing_and_corrupt_images_skipped(cuhk):
    (cuhk / "imgs" / BASE[1]["rel"]).unlink()  # missing
    (cuhk / "imgs" / BASE[2]["rel"]).write_bytes(b"this is not a png")  # corrupt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ann = load_annotations(cuhk)
    data_warnings = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(data_warnings) == 1  # one summary, not one per image
    msg = str(data_warnings[0].message)
    assert "skipped 2 of 3 images" in msg and BASE[1]["rel"] in msg and BASE[2]["rel"] in msg
    assert [r.pid for r in ann.records] == [1]
    assert dict(ann.skipped) == {
        str(cuhk / "imgs" / BASE[1]["rel"]): "missing",
        str(cuhk / "imgs" / BASE[2]["rel"]): "not an image PIL can read",
    }
    # the warning points at the caller, not at library internals
    assert data_warnings[0].filename == __file__
    # without checks every record is kept
    assert len(load_annotations(cuhk, check_images=False).records) == 3


def test_empty_and_truncated_image_files_skipped(cuhk):
    (cuhk / "imgs" / BASE[0]["rel"]).write_bytes(b"")
    png = (cuhk / "imgs" / BASE[2]["rel"]).read_bytes()
    (cuhk / "imgs" / BASE[2]["rel"]).write_bytes(png[:20])  # cut inside the header
    with pytest.warns(DataWarning, match="skipped 2 of 3"):
        ann = load_annotations(cuhk)
    assert [r.pid for r in ann.records] == [2]
    assert dict(ann.skipped)[str(cuhk / "imgs" / BASE[0]["rel"])] == "not an image PIL can read"


def test_strict_raises_on_first_bad_image(cuhk):
    (cuhk / "imgs" / BASE[2]["rel"]).unlink()
    _expect_error(cuhk, "reid_raw.json", "record 2", BASE[2]["rel"], "missing", strict=True)


def test_all_images_bad_is_an_error(cuhk):
    for r in BASE:
        (cuhk / "imgs" / r["rel"]).unlink()
    _expect_error(cuhk, "none of the 3 images could be read")


def test_missing_image_folder(tmp_path):
    root = tmp_path / "r"
    _write_json(root / "data_captions.json", [{**GOOD, "img_path": "1.png"}])
    _expect_error(root, "image folder", "imgs", "does not exist")
    assert len(load_annotations(root, check_images=False).records) == 1


def test_skipped_counts_each_image_once(tmp_path):
    # two records of the same image (same person, two annotation rows)
    root = _cuhk_with(tmp_path, [GOOD, {**GOOD, "file_path": "gone.png"}, {**GOOD, "file_path": "gone.png"}])
    with pytest.warns(DataWarning, match="skipped 1 of 2 images"):
        ann = load_annotations(root)
    assert len(ann.records) == 1 and len(ann.skipped) == 1


def test_warning_truncates_long_lists(tmp_path):
    recs = [GOOD] + [{**GOOD, "file_path": f"missing_{i}.png"} for i in range(8)]
    root = _cuhk_with(tmp_path, recs)
    with pytest.warns(DataWarning) as caught:
        ann = load_annotations(root)
    msg = str(caught[0].message)
    assert "skipped 8 of 9" in msg and "missing_4.png" in msg and "missing_5.png" not in msg and "3 more" in msg
    assert len(ann.skipped) == 8


def test_progress_bar_for_many_images(tmp_path, capsys, monkeypatch):
    import tbps.data.layouts as layouts

    monkeypatch.setattr(layouts, "PROGRESS_MIN_IMAGES", 2)
    root = _public(tmp_path / "ds", "reid_raw.json", "file_path")
    load_annotations(root, progress=True)
    assert "checking images" in capsys.readouterr().err
    load_annotations(root, progress=False)
    assert "checking images" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Records and splits.


def test_annotations_split_errors(cuhk):
    ann = load_annotations(cuhk)
    with pytest.raises(DataError, match=r"unknown split 'dev'.*train \(1 images\), val \(1 images\), test \(1 images\)"):
        ann.split("dev")
    ann.records = [r for r in ann.records if r.split != "val"]
    with pytest.raises(DataError, match="no records in split 'val'"):
        ann.split("val")


def test_record_normalises_and_validates():
    r = Record(image="x.png", captions=["a"], pid=1, split="train", captions_bt=["b"])
    assert r.image == Path("x.png") and r.captions == ("a",) and r.captions_bt == ("b",)
    hash(r)  # frozen, hashable
    with pytest.raises(ValueError):
        Record(image=Path("x"), captions=(), pid=1, split="train")
    with pytest.raises(ValueError):
        Record(image=Path("x"), captions=("a",), pid=1, split="dev")


# ---------------------------------------------------------------------------------------------
# Caption cleaning.


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A Man in a RED coat.", "a man in a red coat"),
        ('She wears "black" (leather) shoes; a bag*#~ too!', "she wears black leather shoes a bag too"),
        ("time: 10:30", "time 10 30"),
        ("  tabs\tand\n\nnewlines   ", "tabs and newlines"),
        ("T-shirt, jeans/boots, man's hat", "t-shirt, jeans/boots, man's hat"),
        ("...", ""),
    ],
)
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected


def test_clean_caption_truncates():
    words = " ".join(f"w{i}" for i in range(100))
    assert clean_caption(words).split() == [f"w{i}" for i in range(77)]
    assert clean_caption("a. b. c. d.", max_words=3) == "a b c"
    with pytest.raises(ValueError):
        clean_caption("a", max_words=0)
