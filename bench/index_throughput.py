"""Images/s embedded by ``index build`` against the model's own forward-pass ceiling.

Writes a few hundred synthetic person-crop JPEGs to a temp dir, makes an untrained
checkpoint (``create_untrained_checkpoint``, tiny model by default), and measures:

  ceiling   encode_images on already-preprocessed batches (no decoding at all)
  decode    JPEG read + SHA-256 + decode + preprocess, one thread, no model
  build     ``build_index`` end to end, for each --workers setting: "auto" (the default,
            ``default_workers``: on CPU, decoding in threads), 0 (the same, explicitly) or
            W decoding processes

each at every torch thread count of --threads (on a busy machine one thread can be
faster than two: the figures show which).
Each repeat measures the ceiling and every build setting one after another, so that they
share the machine's load; the best of --repeats is shown for each, and the build as a
fraction of the ceiling. "embedding" counts the time from the first file read to the last
feature (what ``build_index`` reports as images_per_s); "overall" adds the scan, the SQLite
rows and publishing the generation.

    python bench/index_throughput.py                 # 400 images, workers auto,0,1
    python bench/index_throughput.py --images 200 --arch tiny-vit --workers auto,1
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_crops(folder: Path, n: int, size=(64, 160), seed: int = 0) -> list[Path]:
    """n JPEG person-crop stand-ins (W x H = size): smooth colour blocks plus texture."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    w, h = size
    for i in range(n):
        base = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR))
        img = np.clip(base.astype(np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
        p = folder / f"crop{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--arch", default="tiny-vit")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default="auto,0,1", help="decoding worker counts to try (auto: the default)")
    p.add_argument("--size", default="64x160", help="crop size WxH of the synthetic JPEGs")
    p.add_argument("--threads", default="2,1", help="torch thread counts to measure, each with its own ceiling")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is shown")
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    import tbps

    from tbps.index import build_index
    from tbps.index.embed import ImageReader
    from tbps.retrieval.encoder import Encoder, create_untrained_checkpoint

    work = Path(tempfile.mkdtemp(prefix="tbps-bench-"))
    try:
        w, h = map(int, args.size.split("x"))
        paths = write_crops(work / "imgs", args.images, (w, h))
        ckpt = create_untrained_checkpoint(work / "ckpt" / "best.pt", arch=args.arch)
        enc = Encoder.from_checkpoint(ckpt)
        print(f"{args.images} JPEGs {w}x{h}, model {args.arch} (input {list(enc.image_size)}, "
              f"d={enc.embed_dim}), batch {args.batch_size}, {os.cpu_count()} cores, "
              f"tbps from {Path(tbps.__file__).parent}")

        # Ceiling: forward passes over preprocessed batches.
        pixels = torch.stack([enc.preprocess(Image.open(x)) for x in paths[: args.batch_size]])
        enc.encode_images(pixels)  # warm up
        n_batches = max(1, args.images // args.batch_size)
        reader = ImageReader([str(x) for x in paths], enc.preprocess)
        settings = [None if x == "auto" else int(x) for x in args.workers.split(",")]
        thread_counts = [int(x) for x in args.threads.split(",")]
        ceiling = {t: 0.0 for t in thread_counts}  # the model alone at each thread count
        decode = 0.0
        build = {(t, nw): (0.0, 0.0) for t in thread_counts for nw in settings}
        for _ in range(args.repeats):  # interleaved, so that every figure sees the same load
            for threads in thread_counts:
                torch.set_num_threads(threads)
                t = time.perf_counter()
                for _ in range(n_batches):
                    enc.encode_images(pixels)
                ceiling[threads] = max(ceiling[threads], n_batches * len(pixels) / (time.perf_counter() - t))
                for nw in settings:
                    out = work / "idx"
                    t = time.perf_counter()
                    st = build_index(out, enc, work / "imgs", batch_size=args.batch_size, workers=nw, progress=False)
                    total = st["count"] / (time.perf_counter() - t)
                    old = build[threads, nw]
                    build[threads, nw] = (max(old[0], st["images_per_s"]), max(old[1], total))
                    shutil.rmtree(out)
            t = time.perf_counter()
            for i in range(len(reader)):
                reader[i]
            decode = max(decode, len(reader) / (time.perf_counter() - t))
        best_ceiling = max(ceiling.values())
        print(f"decode+hash+preprocess, 1 thread:      {decode:8.1f} images/s")
        for threads in thread_counts:
            print(f"torch threads {threads}: ceiling (forward only) {ceiling[threads]:8.1f} images/s")
            for nw in settings:
                name = "auto" if nw is None else str(nw)
                best, best_total = build[threads, nw]
                print(f"  index build, workers={name:4s}:   {best:8.1f} images/s embedding "
                      f"({best / ceiling[threads]:4.0%} of this ceiling, {best / best_ceiling:4.0%} of the best), "
                      f"{best_total:6.1f} images/s overall")
        print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
