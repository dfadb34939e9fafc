"""``tbps index build|add|remove|info``: create and maintain a gallery index.

Top-level imports stay light; the encoder (torch) and the index are imported in ``run``.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "build and maintain a searchable index of a folder of person crops"

DESCRIPTION = """\
Embed a folder of person crops once with a TBPS checkpoint, then search it by text
(`tbps search`) or serve it (`tbps serve`). INDEX is a directory; every write makes a new
generation published atomically, so an interrupted command leaves the previous index.
"""

EPILOG = """\
examples:
  tbps index build gallery.idx --checkpoint runs/tbps/best.pt --images crops/ --recursive
  tbps index build gallery.idx --checkpoint best.pt --images crops/ --metadata crops.csv
  tbps index add gallery.idx crops/            # embed only new or changed files
  tbps index remove gallery.idx crops/cam3/    # drop a file or everything under a folder
  tbps index info gallery.idx --json

metadata CSV: a header row; one column (named path, image, file, filename, image_path or
relpath) gives each image's path relative to --images; every other column (camera, time,
person id, ...) is stored and usable in `tbps search --where`. Names become lower_snake_case.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="embed every image in a folder into a new index",
                       description="Embed every image under --images into a new index at INDEX.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("index", metavar="INDEX", help="index directory to create")
    b.add_argument("--checkpoint", required=True, metavar="CKPT", help="model checkpoint to embed with")
    b.add_argument("--images", required=True, metavar="DIR", help="folder of person crops")
    _common_write_args(b)
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at INDEX")

    a = sub.add_parser("add", help="embed new or changed images into an existing index",
                       description="Embed only the files under DIR that are new or changed "
                       "(size/mtime differ and the content hash confirms it).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("index", metavar="INDEX")
    a.add_argument("images", metavar="DIR", help="folder to scan (usually the one the index was built from)")
    a.add_argument("--checkpoint", metavar="CKPT", help="checkpoint (default: the one the index was built with)")
    _common_write_args(a, mode_default=None)

    r = sub.add_parser("remove", help="drop images (or whole folders) from an index",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("index", metavar="INDEX")
    r.add_argument("paths", metavar="PATH", nargs="+",
                   help="image path or folder (as given, or relative to the index's image folder)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")

    i = sub.add_parser("info", help="print counts, model, search mode and sizes on disk")
    i.add_argument("index", metavar="INDEX")
    i.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _common_write_args(p, mode_default: str | None = "auto") -> None:
    p.add_argument("--recursive", "-r", action="store_true", help="also scan subfolders")
    p.add_argument("--metadata", metavar="FILE.csv", help="per-image metadata CSV (see below)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding processes (default: CPU cores - 1, at most 4; 0 = in-process)")
    p.add_argument("--search-mode", choices=["auto", "exact", "ivf", "hnsw"], default=mode_default,
                   help="exact or approximate search; auto picks by gallery size "
                   "(exact below 50k items, IVF beyond; HNSW only when asked for)" + ("" if mode_default else "; default: keep"))
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from tbps.cli.common import UserError, check_device, load_encoder
    from tbps.index import GalleryIndex, add_to_index, build_index, remove_from_index

    action = args.index_command
    if action == "info":
        with GalleryIndex.open(args.index) as ix:
            info = ix.info()
        _print(info, args.json, _format_info)
        return 0
    if action == "remove":
        stats = remove_from_index(args.index, args.paths)
        _print(stats, args.json, lambda s: f"removed {s['removed']} item(s); index now holds {s['count']} (generation {s['generation']})")
        for p in stats["not_found"]:
            print(f"tbps: warning: {p} is not in the index", file=sys.stderr)
        return 0 if stats["removed"] or not stats["not_found"] else 1
    if getattr(args, "batch_size", 1) <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    check_device(args.device)
    if action == "build":
        encoder = load_encoder(args.checkpoint, args.device)
        stats = build_index(args.index, encoder, args.images, recursive=args.recursive,
                            metadata_csv=args.metadata, batch_size=args.batch_size, workers=args.workers,
                            progress=not args.no_progress, search_mode=args.search_mode,
                            checkpoint=args.checkpoint, overwrite=args.overwrite)
    else:  # add
        checkpoint = args.checkpoint
        if checkpoint is None:
            with GalleryIndex.open(args.index) as ix:
                checkpoint = ix.checkpoint
            if not checkpoint:
                raise UserError(f"index {args.index} does not record its checkpoint; pass --checkpoint")
        encoder = load_encoder(checkpoint, args.device)
        stats = add_to_index(args.index, encoder, args.images, recursive=args.recursive,
                             metadata_csv=args.metadata, batch_size=args.batch_size, workers=args.workers,
                             progress=not args.no_progress, search_mode=args.search_mode)
    for s in stats["skipped"]:
        print(f"tbps: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    _print(stats, args.json, _format_write)
    return 0


def _print(obj: dict, as_json: bool, fmt) -> None:
    print(json.dumps(obj, indent=2) if as_json else fmt(obj))


def _format_write(s: dict) -> str:
    lines = [
        f"index {s['index']} (generation {s['generation']}): {s['count']} item(s), search mode {s['search_mode']}",
        f"  scanned {s['scanned']} file(s): added {s['added']}, updated {s['updated']}"
        + (f", unchanged {s['unchanged']}" if "unchanged" in s else "")
        + f", skipped {s['skipped_count']}",
    ]
    if s.get("missing"):
        lines.append(f"  {s['missing']} indexed file(s) no longer exist (drop them with `tbps index remove`)")
    if s.get("metadata_rows_matched") or s.get("metadata_rows_unmatched"):
        lines.append(f"  metadata: {s['metadata_rows_matched']} row(s) matched, "
                     f"{s['metadata_rows_unmatched']} name no indexed image")
    if s.get("images_per_s"):
        lines.append(f"  embedded at {s['images_per_s']:.1f} images/s; total {s['seconds']:.1f} s")
    return "\n".join(lines)


def _format_info(i: dict) -> str:
    fp = i["fingerprint"]
    sizes = i["sizes_bytes"]
    return "\n".join([
        f"index:       {i['path']} (generation {i['generation']})",
        f"items:       {i['count']} x {i['dim']}-d features",
        f"model:       {fp.get('arch', '?')}, checkpoint {i['checkpoint'] or '(not recorded)'}",
        f"             sha256 {str(fp.get('checkpoint_sha256', '?'))[:16]}..., image size {fp.get('image_size')}",
        f"images:      {i['images_dir']}{' (recursive)' if i['recursive'] else ''}",
        f"search:      {i['search_mode']} (requested {i['search_mode_requested']}) {i['search_params'] or ''}",
        f"columns:     {', '.join(i['columns'])}",
        "disk:        " + ", ".join(f"{k} {_mb(v)}" for k, v in sizes.items() if v is not None),
        f"updated:     {i['updated']}",
    ])


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
