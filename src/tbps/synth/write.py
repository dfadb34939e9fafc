"""Writing a synthetic dataset in the CUHK-PEDES layout: splits by family, annotation
records, the (optionally parallel) chunk renderer, and ``synthesize``.

Images are written first; ``reid_raw.json`` last and atomically, so a folder without it is
an interrupted run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from tbps.files import atomic_write
from tbps.synth.attributes import SynthError, sample_identities
from tbps.synth.captions import described_caption, tokenize
from tbps.synth.render import person_shades, render_image, sample_view

SPLITS = ("train", "val", "test")
ANNOTATION_FILE = "reid_raw.json"
JPEG_QUALITY = 90


def assign_splits(families: list[int], fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Split identities by family (siblings stay together, so the test gallery holds
    near-duplicates); returns one split name per identity.

    Each split with a positive fraction first gets one of the smallest families; then the
    other families, largest first, go to the split furthest below its target count. A
    dataset with fewer families than such splits is split by identity instead.
    """
    n = len(families)
    rng = np.random.default_rng([seed, 5003])
    target = np.asarray(fractions, dtype=np.float64) * n
    wanted = [int(s) for s in np.argsort(target, kind="stable") if target[s] > 0]
    members: dict[int, list[int]] = {}
    for i, f in enumerate(families):
        members.setdefault(f, []).append(i)
    if len(members) < len(wanted) <= n:  # tiny dataset: split families rather than leave a split empty
        members = {i: [i] for i in range(n)}
    fams = list(members)
    fams = [fams[int(j)] for j in rng.permutation(len(fams))]
    fams.sort(key=lambda f: -len(members[f]))  # stable: random order within a size
    count = np.zeros(3)
    out = [""] * n

    def put(fam: int, s: int) -> None:
        for i in members[fam]:
            out[i] = SPLITS[s]
        count[s] += len(members[fam])

    if len(fams) >= len(wanted):
        for s in wanted:
            put(fams.pop(), s)
    for fam in fams:
        put(fam, int(np.argmax(target - count)))
    return out


def _image_path(split: str, pid: int, k: int) -> str:
    return f"{split}/{pid:05d}_c{k:02d}.jpg"


def image_captions(pid: int, attrs: dict[str, Any], k: int, seed: int) -> list[tuple[str, frozenset[str]]]:
    """The two captions of person ``pid``'s image ``k`` in a dataset of this ``seed``, each with the
    attribute fields it names (:func:`tbps.synth.captions.described_caption`)."""
    facing = sample_view(np.random.default_rng([seed, 2, pid, k])).facing  # as render_image sees it
    crng = np.random.default_rng([seed, 1, pid, k])
    return [described_caption(attrs, crng, facing) for _ in range(2)]


def _make_records(pid: int, attrs: dict[str, Any], split: str, images_per_id: int, seed: int) -> list[dict]:
    """The annotation records of one person: two captions per image, CUHK-PEDES keys."""
    out = []
    for k in range(images_per_id):
        caps = [caption for caption, _ in image_captions(pid, attrs, k, seed)]
        out.append({
            "split": split,
            "captions": caps,
            "file_path": _image_path(split, pid, k),
            "processed_tokens": [tokenize(c) for c in caps],
            "id": pid,
        })
    return out


def _render_chunk(job: tuple[list[tuple[int, dict[str, Any], str]], int, int, tuple[int, int], str]) -> list[dict]:
    """Worker: render and write every image of a list of identities; returns their records."""
    items, images_per_id, seed, size, img_root = job
    root = Path(img_root)
    records = []
    for pid, attrs, split in items:
        shades = person_shades(attrs, seed, pid)
        for k in range(images_per_id):
            img, _ = render_image(attrs, seed, pid, k, size, shades)
            # Plain write: reid_raw.json is written last and atomically, so a dataset
            # without its annotation file is visibly incomplete.
            img.save(root / _image_path(split, pid, k), format="JPEG", quality=JPEG_QUALITY)
        records += _make_records(pid, attrs, split, images_per_id, seed)
    return records


def planned_splits(ids: int, images_per_id: int = 4, seed: int = 0,
                   split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict[str, int]:
    """Images per split that :func:`synthesize` would write with these arguments, without rendering
    (two captions per image), so a caller can refuse a dataset too small before writing it."""
    _, families = sample_identities(int(ids), seed)
    counts = {s: 0 for s in SPLITS}
    for s in assign_splits(families, tuple(float(f) for f in split_fractions), seed):  # type: ignore[arg-type]
        counts[s] += int(images_per_id)
    return counts


def _checked(ids, images_per_id, seed, image_size, split_fractions, out_dir):
    """The arguments of ``synthesize`` as plain values, or a ``SynthError`` saying what is wrong."""
    ids, images_per_id, seed = int(ids), int(images_per_id), int(seed)
    if ids < 1:
        raise SynthError(f"ids must be at least 1, got {ids}")
    if seed < 0:
        raise SynthError(f"seed must be 0 or more, got {seed}")
    if images_per_id < 1:
        raise SynthError(f"images_per_id must be at least 1, got {images_per_id}")
    if len(image_size) != 2 or min(image_size) < 16:
        raise SynthError(f"image_size must be (height, width), both at least 16 pixels, got {tuple(image_size)}")
    size = (int(image_size[0]), int(image_size[1]))
    fr = tuple(float(f) for f in split_fractions)
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise SynthError(f"split_fractions must be three non-negative numbers summing to 1, got {split_fractions}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SynthError(f"output path exists and is not a folder: {out}")
    return ids, images_per_id, seed, size, fr, out


def _render_all(jobs: list[tuple], images_per_id: int, workers: int, progress: bool) -> list[dict]:
    """Run ``_render_chunk`` over the jobs, in this process or in ``workers`` processes;
    the records come back in job order (person-id order), so the JSON is reproducible."""
    from tqdm import tqdm

    records: list[dict] = []
    bar = tqdm(total=sum(len(job[0]) for job in jobs) * images_per_id, unit="img", desc="synth",
               disable=not progress)
    try:
        if workers == 1:
            for job in jobs:
                records += _render_chunk(job)
                bar.update(len(job[0]) * images_per_id)
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                for job, recs in zip(jobs, pool.map(_render_chunk, jobs), strict=True):
                    records += recs
                    bar.update(len(job[0]) * images_per_id)
    finally:
        bar.close()
    return records


def synthesize(
    out_dir: str | os.PathLike,
    ids: int = 300,
    images_per_id: int = 4,
    seed: int = 0,
    image_size: tuple[int, int] = (128, 64),
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic pedestrian dataset in the CUHK-PEDES layout under ``out_dir``.

    ``ids`` identities (person ids 1..ids, unique attribute sets, in families of near
    duplicates), ``images_per_id`` camera views each, two captions per image;
    ``image_size`` is (height, width); identities are split by family into
    train/val/test with ``split_fractions``. ``workers``: processes for rendering
    (None: one per CPU for large jobs; 0 or 1: in this process). The same ``seed`` gives
    a byte-identical ``reid_raw.json`` and identical pixels.

    Returns stats: ``ids``, ``images``, ``captions``, per-split ``splits`` counts,
    ``seconds``, ``images_per_s``, ``annotation_file``, ``image_root``.
    """
    ids, images_per_id, seed, size, fr, out = _checked(ids, images_per_id, seed, image_size, split_fractions,
                                                       out_dir)
    t0 = time.perf_counter()
    identities, families = sample_identities(ids, seed)
    splits = assign_splits(families, fr, seed)  # type: ignore[arg-type]
    img_root = out / "imgs"
    try:
        for s in set(splits):
            (img_root / s).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SynthError(f"cannot write the dataset to {out}: {e.strerror or e}") from None

    total = ids * images_per_id
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if total >= 2000 else 1
    workers = max(1, int(workers))
    items = [(i + 1, identities[i], splits[i]) for i in range(ids)]
    chunk = max(1, min(64, -(-ids // (workers * 4))))
    jobs = [(items[j:j + chunk], images_per_id, seed, size, str(img_root)) for j in range(0, ids, chunk)]
    records = _render_all(jobs, images_per_id, workers, progress)

    annotation = out / ANNOTATION_FILE
    # Atomic like tbps.files.write_json, but compact and with json's C encoder: the indented
    # writer is pure Python and cost as much as rendering. (CUHK's own file is compact too.)
    with atomic_write(annotation, "w") as f:
        f.write(json.dumps(records))
    seconds = time.perf_counter() - t0
    per_split = {s: {"ids": 0, "images": 0} for s in SPLITS}
    for s in splits:
        per_split[s]["ids"] += 1
        per_split[s]["images"] += images_per_id
    return {
        "ids": ids,
        "images": total,
        "captions": 2 * total,
        "splits": per_split,
        "families": len(set(families)),
        "seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 1) if seconds > 0 else float("inf"),
        "annotation_file": str(annotation),
        "image_root": str(img_root),
    }
