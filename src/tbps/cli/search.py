"""``tbps search``: query a gallery index by text (or by an example image)."""

from __future__ import annotations

import argparse
import json
import sys

from tbps.cli.common import (
    DEFAULT_RESCORE,
    add_rescore_arguments,
    add_store_arguments,
    options_anywhere,
    quiet_broken_pipe,
)

HELP = "search a gallery index by text description or example image"

EPILOG = """\
examples:
  tbps search gallery.idx "a man in a black jacket with a red backpack"
  tbps search gallery.idx "woman in a white dress" -k 20 --where "camera = 'c3' AND time >= '2024-01-01'"
  tbps search gallery.idx --image query.jpg --json
  tbps search qdrant://db.example:6333/people "a woman in a red coat"   # a Qdrant store
  tbps search gallery.idx "red coat" --checkpoint other/best.pt   # must match the index's model
  tbps search gallery.idx "a man in a grey hoodie" --rescore       # LAIP checkpoints: ITM re-scores the top 128

re-scoring (--rescore [K], default K 128): the fusion encoder of the index's checkpoint (or of
--checkpoint) scores the top K candidates of the dual encoder with its ITM head and re-orders
them (itm: the match probability; itm+itc: minmax(ITM) + W * minmax(cosine)). Needs a checkpoint
trained with a fusion encoder and an ITM head (recipe laip, laip-cpu) and a text query. Results
past the top K keep their cosine order below, with score cosine - top cosine - 1 (<= -1).

unknown words: with a frozen word-dictionary text tower (textreid recipes), a query word that no
training caption used is read as its nearest training word in the frozen encoder's space, among
the training words WordNet relates to it where it relates any, else among those its WordNet
definitions name (model.text_tower.oov: wordnet, oov_definitions: true; WordNet from Debian's
wordnet-base or $TBPS_WORDNET); a colour name ("navy", "mint") is first read as the training
word of the nearest colour in the xkcd colour survey's names (oov_colours: true; matplotlib);
each such word is shown on stderr, e.g.
  tbps: "rucksack" (not in the training vocabulary) -> backpack (1.00)
(with model.text_tower.oov_k > 1, the k nearest and their weights)

filters (--where): column = 'text' | column > 3 | column IN ('c1', 'c2') | column LIKE 'c%'
| column BETWEEN 1 AND 5 | column IS NULL, combined with AND, OR, NOT and parentheses.
Columns: id, path, relpath, size, mtime, sha256, width, height and the metadata CSV's
columns (`tbps index info INDEX` lists them).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help=HELP, description=HELP + ".", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_arguments(p, "index directory made by `tbps index build`, or a store: qdrant:PATH (Qdrant's "
                        "local engine) or qdrant://HOST[:PORT]/COLLECTION (a Qdrant server)")
    p.add_argument("query", metavar="TEXT", nargs="?", help="text description of the person")
    p.add_argument("--image", metavar="QUERY.jpg", help="search by example image instead of text")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--where", metavar="EXPR", help="metadata filter, e.g. \"camera = 'c3'\"")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="checkpoint to encode the query (default: the one the index was built with)")
    p.add_argument("--exact", action="store_true", help="exact search even if the index has an ANN structure")
    p.add_argument("--nprobe", type=int, metavar="N",
                   help="IVF indexes: lists to visit (higher: better recall, slower; `tbps index info` shows the default)")
    add_rescore_arguments(p, "re-score the top K text-search candidates with the checkpoint's ITM head "
                          f"(K default {DEFAULT_RESCORE}; LAIP checkpoints)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run)
    options_anywhere(p)


def run(args) -> int:
    from tbps.cli.common import (
        DEFAULT_RESCORE, UserError, check_device, check_rescore_args, encode_image_file, index_tta, load_encoder,
        load_rescorer, resolve_store,
    )

    resolve_store(args, "query")

    if args.image is not None and args.query is not None:
        raise UserError("give either a TEXT query or --image, not both")
    if args.image is None and (args.query is None or not args.query.strip()):
        raise UserError("empty query: give a text description (or --image QUERY.jpg)")
    if args.k <= 0:
        raise UserError(f"-k must be a positive integer, got {args.k}")
    if args.nprobe is not None and args.nprobe <= 0:
        raise UserError(f"--nprobe must be a positive integer, got {args.nprobe}")
    rescore = check_rescore_args(args.rescore, args.rescore_mode, args.rescore_weight)
    check_device(args.device)
    if rescore and args.image is not None:
        raise UserError("--rescore re-scores text queries (the ITM head reads the description); "
                        "it cannot be used with --image")

    from tbps.index.vectorstore import open_store

    with open_store(args.index) as ix:
        checkpoint = args.checkpoint or ix.checkpoint
        if not checkpoint:
            raise UserError(f"index {args.index} does not record its checkpoint; pass --checkpoint")
        encoder = load_encoder(checkpoint, args.device, image_tta=index_tta(ix))  # image queries as the gallery
        ix.check_encoder(encoder)
        rescorer = load_rescorer(encoder, **rescore) if rescore else None
        options = {}
        if args.image is not None:
            feats = encode_image_file(encoder, args.image)
        elif rescorer is not None:  # one text pass: the stage-1 feature and the token maps
            bound = rescorer.for_texts([args.query.strip()], depth=args.rescore)
            feats, options = bound.query_features, {"reranker": bound, "rerank_depth": args.rescore}
        else:
            feats = encoder.encode_texts([args.query.strip()])
        unknown = encoder.unknown_words(args.query.strip()) if args.image is None else {}
        _print_unknown_words(unknown)  # stderr: beside the table, and beside --json's stdout too
        if args.nprobe is not None and ix.search_mode in ("ivf", "ivfpq"):
            ix.search_params["nprobe"] = args.nprobe
        hits = ix.search(feats, args.k, where=args.where, exact=args.exact, **options)[0]
        mode = "exact" if args.exact else ix.search_mode
        n = len(ix)
    try:
        _print_hits(args, hits, mode, n, rescore, rescorer, bound if rescorer is not None else None, unknown)
        sys.stdout.flush()
    except BrokenPipeError:
        return quiet_broken_pipe()
    return 0


def _print_unknown_words(unknown: dict) -> None:
    """One stderr line per query word the training never used: the training words it was read as."""
    for word, near in unknown.items():
        read = ", ".join(f"{w} ({p:.2f})" for w, p in near) if near else "left out"
        print(f'tbps: "{word}" (not in the training vocabulary) -> {read}', file=sys.stderr)


def _print_hits(args, hits, mode: str, n: int, rescore, rescorer, bound, unknown: dict) -> None:
    if args.json:
        out = {
            "query": args.query.strip() if args.image is None else None,
            "image": args.image,
            "k": args.k,
            "where": args.where,
            "index_size": n,
            "search_mode": mode,
            "rescored": rescorer is not None,
            "rescore": None,
            "results": [{"rank": r + 1, **h.to_dict()} for r, h in enumerate(hits)],
            "unknown_words": {w: dict(near) for w, near in unknown.items()},
        }
        if rescorer is not None:
            out["rescore"] = {"k": args.rescore, "mode": rescore["mode"],
                              "weight": rescore["weight"] if rescore["mode"] == "itm+itc" else None,
                              "candidates": bound.rescored[0] if bound.rescored else 0,
                              "ms": round(1e3 * bound.seconds, 3)}
            for res in out["results"]:  # score: re-scored; cosine: the dual encoder's stage-1 score
                res["cosine"] = bound.stage1[0].get(res["id"]) if bound.stage1 else None
        print(json.dumps(out, indent=2, default=str))
    else:
        if not hits:
            print("no results" + (" (no item matches the filter)" if args.where else ""))
        elif rescorer is None:
            print(f"{'rank':>4}  {'score':>7}  {'id':>7}  path")
            for r, h in enumerate(hits, start=1):
                print(f"{r:>4}  {h.score:7.4f}  {h.id:>7}  {h.path}")
        else:
            print(f"{'rank':>4}  {'score':>7}  {'cosine':>7}  {'id':>7}  path")
            for r, h in enumerate(hits, start=1):
                print(f"{r:>4}  {h.score:7.4f}  {bound.stage1[0][h.id]:7.4f}  {h.id:>7}  {h.path}")
        if rescorer is not None:
            n = bound.rescored[0] if bound.rescored else 0
            print(f"tbps: re-scored the top {n} by {rescore['mode']} in {1e3 * bound.seconds:.1f} ms", file=sys.stderr)
