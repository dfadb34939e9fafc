"""Images per second of `tbps.synth.synthesize` (default 500 ids x 4 images).

Usage: python bench/synth_speed.py [--ids 500] [--images-per-id 4] [--workers 1 2] [--dir .]
Prints one line per worker count: wall images/s, and the CPU time spent per image in
this process (with workers=1 that is the whole cost; the machine may be shared). The
dataset goes to a temporary folder inside --dir (default: the current folder; file
creation costs differ a lot between filesystems, e.g. 0.09 vs 1.3 ms on this machine's
/work vs /tmp).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from tbps.synth import synthesize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ids", type=int, default=500)
    p.add_argument("--images-per-id", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"))
    p.add_argument("--dir", default=".", help="where to put the temporary dataset")
    args = p.parse_args()
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix=".synth_speed.", dir=args.dir) as out:
            cpu = time.process_time()
            stats = synthesize(out, ids=args.ids, images_per_id=args.images_per_id, seed=0,
                               image_size=tuple(args.size), workers=workers, progress=False)
            cpu = time.process_time() - cpu
        print(f"workers={workers}: {stats['images']} images {args.size[0]}x{args.size[1]} in {stats['seconds']:.2f} s "
              f"= {stats['images_per_s']:.0f} images/s (main-process CPU {1e3 * cpu / stats['images']:.2f} ms/image)")


if __name__ == "__main__":
    main()
