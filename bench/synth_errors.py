"""What a checkpoint gets wrong on a synthetic split, attribute by attribute, and the split's text-only ceiling.

A `tbps synth` dataset knows every person's attributes and which of them each caption names
(:func:`tbps.synth.write.image_captions` re-makes the captions from the seed, and this script checks
that they are the dataset's). So for a split it reports:

- the **text-only ceiling**: a caption fits every person whose attributes agree with it on the fields it
  names (a caption that drops the shoes fits a sibling who differs only in shoes). A reader that ranks
  the people who fit first, in random order, gets R@1 = mean over captions of 1 / (people who fit);
- for each checkpoint, its text-to-image top-1 errors: the share the caption cannot tell apart (the
  retrieved person fits the caption too), the share that land on a sibling (the same family of near
  duplicates), and for the rest, how often each named field is wrong in the retrieved person.

    tbps synth /tmp/d1 --ids 1000                   # seed 0
    python bench/synth_errors.py /tmp/d1 --seed 0 runs/a/best.pt runs/b/best.pt [--tta flip]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path


def named_fields(root: Path, seed: int, split: str) -> tuple[dict, dict, list[int], dict]:
    """({(pid, caption): fields named}, {pid: attributes}, the split's pids, {pid: family}) of a synth
    dataset made with ``seed``; exits with one line if its captions are not that seed's."""
    from tbps.synth import sample_identities
    from tbps.synth.write import image_captions

    records = json.loads((root / "reid_raw.json").read_text())
    n = max(r["id"] for r in records)
    attrs, families = sample_identities(n, seed)
    named, pids = {}, set()
    for r in records:
        if r["split"] != split:
            continue
        pid, k = r["id"], int(re.search(r"_c(\d+)\.\w+$", r["file_path"]).group(1))
        made = image_captions(pid, attrs[pid - 1], k, seed)
        if [c for c, _ in made] != r["captions"]:
            sys.exit(f"synth_errors: {root}'s captions are not those of synth seed {seed} (person {pid}); "
                     "pass the --seed the dataset was made with")
        named.update({(pid, c): f for c, f in made})
        pids.add(pid)
    return named, {p: attrs[p - 1] for p in pids}, sorted(pids), {p: families[p - 1] for p in pids}


def fits(attrs: dict, pid: int, fields) -> list[int]:
    """The people whose attributes agree with ``pid``'s on ``fields``."""
    a = attrs[pid]
    return [q for q in attrs if all(attrs[q][f] == a[f] for f in fields)]


def main() -> None:
    from tbps.retrieval.encoder import IMAGE_TTA

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="a `tbps synth` dataset folder")
    ap.add_argument("checkpoints", nargs="*", help="checkpoints to break down (none: the ceiling only)")
    ap.add_argument("--seed", type=int, default=0, help="the seed `tbps synth` made the dataset with (default 0)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--tta", choices=IMAGE_TTA, default="none", help="as `tbps eval --tta`")
    args = ap.parse_intermixed_args()

    from tbps.engine.evaluate import evaluate_checkpoint
    from tbps.synth import ATTRIBUTE_FIELDS

    named, attrs, pids, family = named_fields(args.data, args.seed, args.split)
    inverse = [1 / len(fits(attrs, pid, f)) for (pid, _), f in named.items()]
    unique = sum(x == 1 for x in inverse)
    print(f"{args.data} [{args.split}]: {len(named)} captions of {len(pids)} people; a caption fits one person only: "
          f"{100 * unique / len(named):.2f} %; text-only ceiling R@1 {100 * sum(inverse) / len(inverse):.2f}")
    for ckpt in args.checkpoints:
        ev = evaluate_checkpoint(ckpt, args.data, args.split, image_tta=args.tta).result
        top = ev.similarity.argmax(1).tolist()
        wrong, fit, sibling, fields = 0, 0, 0, collections.Counter()
        for q, (caption, pid) in enumerate(zip(ev.captions, ev.caption_ids)):
            got = ev.image_ids[top[q]]
            if got == pid:
                continue
            wrong += 1
            differ = [f for f in ATTRIBUTE_FIELDS if f in named[(pid, caption)] and attrs[got][f] != attrs[pid][f]]
            if not differ:
                fit += 1
                continue
            sibling += family[got] == family[pid]
            fields.update(differ)
        real = max(wrong - fit, 1)
        print(f"{ckpt}: R@1 {ev.metrics['t2i']['R1']:.2f}; {100 * wrong / len(top):.2f} % of captions miss at top 1, "
              f"of which {100 * fit / max(wrong, 1):.1f} % retrieve a person the caption fits too; of the rest "
              f"{100 * sibling / real:.1f} % a sibling; a named field wrong in the retrieved person: "
              + ", ".join(f"{f} {100 * c / real:.0f} %" for f, c in fields.most_common()))


if __name__ == "__main__":
    main()
