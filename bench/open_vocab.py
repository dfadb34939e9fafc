"""Open-vocabulary check: R@1 on the test queries as written and with unseen synonyms.

Every test caption is rewritten with a fixed word map into words that the synthetic
captions never use (``tbps.synth.RESERVED_SYNONYMS``); each checkpoint is evaluated
on both query sets against the same gallery. Prints a table (and --json writes it).

    python bench/open_vocab.py --data /tmp/textreid-data800 minilm=/tmp/runs/minilm/best.pt trained=/tmp/runs/trained/best.pt
"""

from __future__ import annotations

import argparse
import re
import sys

# Original caption word -> a synonym no synthetic caption uses (all in RESERVED_SYNONYMS).
WORD_MAP = {
    "red": "crimson", "blue": "navy", "trousers": "slacks", "pants": "slacks", "backpack": "rucksack",
    "handbag": "tote", "purse": "tote", "sweater": "cardigan", "jumper": "cardigan", "pullover": "cardigan",
    "hat": "fedora",
}
_PATTERN = re.compile(r"\b(" + "|".join(sorted(WORD_MAP, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def rewrite(caption: str) -> str:
    """The caption with every mapped word replaced (case-insensitive, whole words)."""
    return _PATTERN.sub(lambda m: WORD_MAP[m.group(1).lower()], caption)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="NAME=PATH pairs")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    from tbps.data.dataset import eval_split
    from tbps.data.layouts import load_annotations
    from tbps.synth import RESERVED_SYNONYMS
    from tbps.models.checkpoint import load_model
    from tbps.models.checkpoint import max_words as checkpoint_max_words
    from tbps.retrieval.encoder import encode_captions, encode_images
    from tbps.retrieval.metrics import retrieval_metrics
    from tbps.models.factory import get_tokenizer

    assert set(WORD_MAP.values()) <= set(RESERVED_SYNONYMS), "the map must only use reserved synonyms"
    records = load_annotations(args.data, progress=False).split(args.split)
    paths, image_ids, captions, caption_ids = eval_split(records)
    rewritten = [rewrite(c) for c in captions]
    changed = torch.tensor([a != b for a, b in zip(captions, rewritten)])
    qids, gids = torch.tensor(caption_ids), torch.tensor(image_ids)
    rows = {"queries": len(captions), "changed": int(changed.sum()), "word_map": WORD_MAP, "models": {}}
    for spec in args.checkpoints:
        name, path = spec.split("=", 1)
        model, ckpt = load_model(path)
        tok = get_tokenizer(model.spec)
        mw = checkpoint_max_words(ckpt)
        img = encode_images(model, paths, progress=False)
        res = {}
        feats = {}
        for label, caps in (("original", captions), ("rewritten", rewritten)):
            feats[label] = encode_captions(model, tok, caps, max_words=mw, progress=False)
            sim = feats[label] @ img.t()
            res[label] = retrieval_metrics(sim, qids, gids)
            res[label + "_changed_only"] = retrieval_metrics(sim[changed], qids[changed], gids)
        # Text side alone (meaningful even when image retrieval is weak): does a rewritten query
        # stay closest to its own original caption among all original captions?
        tt = feats["rewritten"][changed] @ feats["original"].t()  # (C, Q)
        own = torch.nonzero(changed).flatten()
        res["text_self_R1"] = 100.0 * float((tt.argmax(1) == own).float().mean())
        res["text_self_cos"] = float(tt[torch.arange(len(own)), own].mean())
        res["text_other_cos"] = float(tt.mean())
        rows["models"][name] = res
        print(f"{name:<16} R1 all: {res['original']['R1']:6.2f} -> {res['rewritten']['R1']:6.2f}   "
              f"R1 rewritten queries only: {res['original_changed_only']['R1']:6.2f} -> "
              f"{res['rewritten_changed_only']['R1']:6.2f}   mAP all: {res['original']['mAP']:6.2f} -> "
              f"{res['rewritten']['mAP']:6.2f}   rewritten->own caption R1 {res['text_self_R1']:6.2f} "
              f"(cos {res['text_self_cos']:.3f}, mean cos to all {res['text_other_cos']:.3f})", flush=True)
    print(f"({rows['changed']} of {rows['queries']} queries changed by the word map)")
    if args.json:
        from tbps.files import write_json

        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
