"""The synthetic pedestrian dataset: layout, splits, determinism, captions vs attributes,
fine-grained identities, and rendered pixels vs attributes."""

from __future__ import annotations

import io
import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tbps.synth as S

KEYS = {"split", "captions", "file_path", "processed_tokens", "id"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 30-identity dataset at a non-default image size, written once for several tests."""
    out = tmp_path_factory.mktemp("synth")
    stats = S.synthesize(out, ids=30, images_per_id=3, seed=3, image_size=(96, 48), workers=1, progress=False)
    return out, stats, json.loads((out / "reid_raw.json").read_text())


def _phrase_in(phrase: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text) is not None


def _mentions(text: str, phrases) -> bool:
    return any(_phrase_in(p, text.lower()) for p in phrases)


def test_layout_keys_and_counts(small):
    out, stats, records = small
    assert isinstance(records, list) and len(records) == 30 * 3
    assert stats["images"] == 90 and stats["captions"] == 180 and stats["ids"] == 30
    assert Path(stats["annotation_file"]) == out / "reid_raw.json"
    for r in records:
        assert set(r) == KEYS
        assert r["split"] in ("train", "val", "test")
        assert isinstance(r["id"], int) and not isinstance(r["id"], bool)
        assert len(r["captions"]) == 2 and all(isinstance(c, str) and c for c in r["captions"])
        # processed_tokens: the caption lower-cased, split on spaces and punctuation (naive reference)
        for cap, toks in zip(r["captions"], r["processed_tokens"], strict=True):
            assert toks == re.sub(r"[.,]", " ", cap.lower()).split()
        path = out / "imgs" / r["file_path"]
        assert not Path(r["file_path"]).is_absolute() and path.is_file()
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 96)
    assert len({r["file_path"] for r in records}) == len(records)
    ids = sorted({r["id"] for r in records})
    assert ids == list(range(1, 31))  # ids start at 1, no gaps
    assert all(sum(r["id"] == i for r in records) == 3 for i in ids)
    per_split = {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test")}
    assert per_split == {s: v["images"] for s, v in stats["splits"].items()}


def test_splits_disjoint_by_identity_and_families_together():
    identities, families = S.sample_identities(200, seed=5)
    splits = S.assign_splits(families, (0.7, 0.1, 0.2), seed=5)
    by_id = {}
    for pid, s in enumerate(splits):
        by_id.setdefault(pid, set()).add(s)
    assert all(len(v) == 1 for v in by_id.values())
    for f in set(families):
        assert len({splits[i] for i, g in enumerate(families) if g == f}) == 1  # siblings stay together
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert abs(counts["train"] - 140) <= 4 and abs(counts["val"] - 20) <= 4 and abs(counts["test"] - 40) <= 4
    # tiny datasets still get every split, even a single family of three
    assert set(S.assign_splits([0, 1, 2, 3], (0.7, 0.1, 0.2), seed=0)) == {"train", "val", "test"}
    assert sorted(S.assign_splits([0, 0, 0], (0.7, 0.1, 0.2), seed=0)) == ["test", "train", "val"]
    assert set(S.assign_splits([0, 0, 1, 2], (1.0, 0.0, 0.0), seed=0)) == {"train"}


def test_split_disjoint_in_written_dataset(small):
    _, _, records = small
    split_of = {}
    for r in records:
        assert split_of.setdefault(r["id"], r["split"]) == r["split"]
    assert set(split_of.values()) == {"train", "val", "test"}


def _pixels(root: Path, records) -> list[np.ndarray]:
    return [np.asarray(Image.open(root / "imgs" / r["file_path"])) for r in records]


def test_deterministic_by_seed_and_workers(tmp_path):
    a = S.synthesize(tmp_path / "a", ids=8, images_per_id=2, seed=11, workers=1, progress=False)
    b = S.synthesize(tmp_path / "b", ids=8, images_per_id=2, seed=11, workers=2, progress=False)
    c = S.synthesize(tmp_path / "c", ids=8, images_per_id=2, seed=12, workers=1, progress=False)
    ja, jb, jc = (Path(s["annotation_file"]).read_bytes() for s in (a, b, c))
    assert ja == jb
    assert ja != jc
    recs = json.loads(ja)
    for x, y in zip(_pixels(tmp_path / "a", recs), _pixels(tmp_path / "b", recs), strict=True):
        assert np.array_equal(x, y)
    recs_c = json.loads(jc)
    pairs = zip(_pixels(tmp_path / "a", recs), _pixels(tmp_path / "c", recs_c), strict=True)
    assert all(not np.array_equal(x, y) for x, y in pairs)


def _colour_tokens(identity) -> set[str]:
    """Every colour word a caption of this identity may legitimately contain."""
    ok = set()
    for f in ("upper_colour", "lower_colour", "shoe_colour", "bag_colour", "headwear_colour"):
        if identity[f] is not None:
            ok |= set(S.COLOUR_WORDS[identity[f]])
    ok |= set(S.CAPTION_WORDS["hair_colour"][identity["hair_colour"]])
    return ok


def test_captions_say_the_attributes_and_nothing_else():
    identities, _ = S.sample_identities(150, seed=2)
    all_colour_words = {w for ws in S.COLOUR_WORDS.values() for w in ws}
    dropped_total = 0
    for i, a in enumerate(identities):
        rng, twin = np.random.default_rng([99, i]), np.random.default_rng([99, i])
        for j in range(6):
            cap = S.make_caption(a, rng, facing=("front", "back", "left", "right")[j % 4])
            same, named = S.described_caption(a, twin, facing=("front", "back", "left", "right")[j % 4])
            assert same == cap
            low = cap.lower()
            toks = set(S.tokenize(cap))
            # always: gender, upper colour + type, lower colour + type
            assert _mentions(low, S.CAPTION_WORDS["gender"][a["gender"]]), cap
            other = {"man": {"she", "her", "woman", "lady", "girl"}, "woman": {"he", "his", "man", "guy", "boy"}}
            assert not toks & other[a["gender"]], cap
            assert _mentions(low, S.COLOUR_WORDS[a["upper_colour"]]), cap
            assert _mentions(low, S.CAPTION_WORDS["upper_type"][a["upper_type"]]), cap
            if a["lower_type"] is not None:
                assert _mentions(low, S.COLOUR_WORDS[a["lower_colour"]]), cap
                assert _mentions(low, S.CAPTION_WORDS["lower_type"][a["lower_type"]]), cap
            else:
                assert not _mentions(low, [w for ws in S.CAPTION_WORDS["lower_type"].values() for w in ws]), cap
            # no colour that the identity does not have
            assert toks & all_colour_words <= _colour_tokens(a), cap
            # absent items are never described; present minor ones are dropped at most twice
            bag_words = [w for ws in S.CAPTION_WORDS["bag_type"].values() for w in ws]
            if a["bag_type"] == "none":
                assert not _mentions(low, bag_words) or "not carrying a bag" in low, cap
            hw_words = [w for ws in S.CAPTION_WORDS["headwear"].values() for w in ws]
            if a["headwear"] == "none":
                assert not _mentions(low, hw_words), cap
            minor = {
                "hair": "hair" in toks,
                "shoes": _mentions(low, S.CAPTION_WORDS["shoes"]["shoes"]) or "shoes" in toks,
            }
            if a["pattern"] != "plain":
                minor["pattern"] = _mentions(low, S.CAPTION_WORDS["pattern"][a["pattern"]] +
                                             ("stripes", "checked pattern", "polka dots"))
            else:
                assert not _mentions(low, ("striped", "stripes", "plaid", "checked", "dotted", "polka")), cap
            if a["bag_type"] != "none":
                minor["bag"] = _mentions(low, S.CAPTION_WORDS["bag_type"][a["bag_type"]])
            if a["headwear"] != "none":
                minor["headwear"] = _mentions(low, S.CAPTION_WORDS["headwear"][a["headwear"]])
            # the fields a caption names (what bench/synth_errors.py reads) are exactly those it mentions
            fields = {"hair": {"hair_length", "hair_colour"}, "shoes": {"shoe_colour"}, "pattern": {"pattern"},
                      "bag": {"bag_type", "bag_colour"}, "headwear": {"headwear", "headwear_colour"}}
            said = {f for fact, told in minor.items() if told for f in fields[fact]}
            if a["bag_type"] == "none" and "not carrying a bag" in low:
                said.add("bag_type")
            assert named == {"gender", "upper_type", "upper_colour", "lower_type", "lower_colour"} | said, (cap, named)
            n_dropped = sum(not v for v in minor.values())
            assert n_dropped <= 2 and n_dropped < len(minor), (cap, minor)
            dropped_total += n_dropped
            for word in S.RESERVED_SYNONYMS:
                assert word not in toks, cap
    assert dropped_total > 0  # omission does happen


def test_captions_vary(small):
    _, _, records = small
    caps = [c for r in records for c in r["captions"]]
    assert len(set(caps)) == len(caps)
    first_words = {c.split()[0].lower() for c in caps}
    assert len(first_words) >= 4  # several templates in use
    assert all(r["captions"][0] != r["captions"][1] for r in records)


def test_written_captions_match_identity(small):
    out, _, records = small
    identities, _ = S.sample_identities(30, seed=3)
    for r in records:
        a = identities[r["id"] - 1]
        for cap in r["captions"]:
            assert _mentions(cap, S.COLOUR_WORDS[a["upper_colour"]]), cap
            assert _mentions(cap.lower(), S.CAPTION_WORDS["upper_type"][a["upper_type"]]), cap


def test_identities_unique_valid_and_fine_grained():
    identities, families = S.sample_identities(300, seed=0)
    keys = [S.identity_key(a) for a in identities]
    assert len(set(keys)) == 300
    for a in identities:
        assert a["gender"] in S.GENDERS and a["upper_type"] in S.UPPER_TYPES and a["upper_colour"] in S.COLOURS
        assert (a["upper_type"] == "dress") == (a["lower_type"] is None)
        assert not (a["gender"] == "man" and (a["upper_type"] == "dress" or a["lower_type"] in ("skirt", "long skirt")))
        assert (a["bag_type"] == "none") == (a["bag_colour"] is None)
        assert (a["headwear"] == "none") == (a["headwear_colour"] is None)
    # naive distance: differing fields, with an item's colour not counted when the item appears/disappears
    def naive(a, b):
        n = 0
        for f in S.ATTRIBUTE_FIELDS:
            if f.endswith("_colour") and f != "upper_colour" and f != "shoe_colour" and f != "hair_colour" \
                    and (a[f] is None) != (b[f] is None):
                continue
            n += a[f] != b[f]
        return n

    close = [0] * 300
    n_pairs = 0
    for i, j in combinations(range(300), 2):
        d = S.attribute_distance(identities[i], identities[j])
        assert d == naive(identities[i], identities[j])
        assert d >= 1
        if d <= 2:
            close[i] += 1
            close[j] += 1
            n_pairs += 1
    assert n_pairs >= 150
    assert sum(c > 0 for c in close) >= 0.7 * 300  # most identities have a near-duplicate
    # within a family every sibling is 1-2 attributes from some member
    for f in set(families):
        members = [identities[i] for i, g in enumerate(families) if g == f]
        for m in members[1:]:
            assert 1 <= S.attribute_distance(members[0], m) <= 2


def test_same_seed_same_identities_other_seed_differs():
    a, _ = S.sample_identities(50, seed=4)
    b, _ = S.sample_identities(50, seed=4)
    c, _ = S.sample_identities(50, seed=5)
    assert a == b and a != c


def _nearest(rgb) -> str:
    names = list(S.COLOURS)
    pal = np.asarray([S.COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((pal - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]


def test_rendered_upper_colour_matches_attribute_clean_view():
    """Neutral camera: the torso probe's median colour is the identity's upper colour."""
    base, _ = S.sample_identities(1, seed=0)
    view = S.View(facing="front", phase=0.3, height=0.9, cx=0.5, top=0.04, brightness=1.0, contrast=1.0,
                  cast=(0.0, 0.0, 0.0), blur=0.0, occluder=None, noise=0.0)
    for colour in S.COLOURS:
        for ut in S.UPPER_TYPES:
            a = dict(base[0], upper_colour=colour, upper_type=ut, pattern="plain", bag_type="none", bag_colour=None)
            img, info = S.render_person(a, view, (128, 64), np.random.default_rng(0))
            x0, y0, x1, y1 = info["upper_probe"]
            patch = np.asarray(img)[y0:y1, x0:x1].reshape(-1, 3)
            assert patch.shape[0] >= 20
            assert _nearest(np.median(patch, axis=0)) == colour, (colour, ut, np.median(patch, axis=0))


def test_rendered_garment_colours_match_attributes_in_written_jpegs(tmp_path):
    """Through the real files: re-derive each view's probe box and read the saved JPEG."""
    seed, size = 8, (128, 64)
    S.synthesize(tmp_path, ids=60, images_per_id=3, seed=seed, image_size=size, workers=1, progress=False)
    records = json.loads((tmp_path / "reid_raw.json").read_text())
    identities, _ = S.sample_identities(60, seed=seed)
    checked = right = plain = plain_right = lower_seen = lower_right = 0
    for r in records:
        pid = r["id"]
        k = int(r["file_path"].rsplit("_c", 1)[1][:2])
        rendered, info = S.render_image(identities[pid - 1], seed, pid, k, size)
        path = tmp_path / "imgs" / r["file_path"]
        buf = io.BytesIO()
        rendered.save(buf, format="JPEG", quality=S.JPEG_QUALITY)
        assert path.read_bytes() == buf.getvalue()  # the file is exactly this render
        saved = np.asarray(Image.open(path), dtype=np.float64)
        if info["lower_visible"]:
            x0, y0, x1, y1 = info["lower_probe"]
            lower_seen += 1
            lower_right += _nearest(np.median(saved[y0:y1, x0:x1].reshape(-1, 3), axis=0)) == \
                identities[pid - 1]["lower_colour"]
        if not info["upper_visible"]:
            continue
        x0, y0, x1, y1 = info["upper_probe"]
        colour = _nearest(np.median(saved[y0:y1, x0:x1].reshape(-1, 3), axis=0))
        ok = colour == identities[pid - 1]["upper_colour"]
        checked += 1
        right += ok
        if identities[pid - 1]["pattern"] == "plain":
            plain += 1
            plain_right += ok
    assert checked >= 100 and plain >= 50
    # Patterns and camera blur mix colours a little; plain garments must read right.
    assert right / checked >= 0.93, (right, checked)
    assert plain_right / plain >= 0.97, (plain_right, plain)
    assert lower_seen >= 80 and lower_right / lower_seen >= 0.97, (lower_right, lower_seen)


def test_bad_arguments_are_user_errors(tmp_path):
    for kwargs in ({"ids": 0}, {"images_per_id": 0}, {"split_fractions": (0.5, 0.1, 0.1)},
                   {"image_size": (8, 4)}):
        with pytest.raises(S.SynthError) as e:
            S.synthesize(tmp_path / "x", progress=False, **kwargs)
        assert getattr(type(e.value), "user_error", False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(S.SynthError, match="not a folder"):
        S.synthesize(f, ids=2, progress=False)
