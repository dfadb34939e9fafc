"""``tbps index build|add|remove|info``: create and maintain a gallery index.

Top-level imports stay light; the encoder (torch) and the index are imported in ``run``.
"""

from __future__ import annotations

import argparse
import json
import sys

from tbps.cli.common import add_store_arguments

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
  tbps index build qdrant:gallery.qdrant --checkpoint best.pt --images crops/   # Qdrant's local engine
  tbps index build qdrant://db.example:6333/people --checkpoint best.pt --images crops/  # a Qdrant server
  tbps index build city.idx --checkpoint best.pt --list paths.txt --partition-size 50000 --search-mode ivfpq
  torchrun --nproc_per_node 4 -m tbps.cli.main index build city.idx --checkpoint best.pt --list paths.txt --device cuda

stores: INDEX (or --store NAME) is a folder (faiss + SQLite, the default) or a Qdrant
store: qdrant:PATH (the local engine, in-process) or qdrant://HOST[:PORT]/COLLECTION
(qdrants:// for HTTPS; API key from $QDRANT_API_KEY). A Qdrant write lands batch by batch:
a killed add keeps what landed, `tbps index info` counts it, and a rerun adds the rest.

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
    add_store_arguments(b, "index directory to create, or a store (see below)")
    b.add_argument("--checkpoint", required=True, metavar="CKPT", help="model checkpoint to embed with")
    b.add_argument("--images", metavar="DIR", help="folder of person crops (or the root of --list's relative paths)")
    _common_write_args(b)
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at INDEX")
    b.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="flip: average each image's features with its mirror image's (left-right); twice the "
                   "embedding time, +1.4 to +1.9 text-to-image R@1 on average on tiny CPU models (docs/search.md); "
                   "recorded in the index, so `index add` and image queries mirror too (default: none)")
    _partition_args(b)

    a = sub.add_parser("add", help="embed new or changed images into an existing index",
                       description="Embed only the files under DIR that are new or changed "
                       "(size/mtime differ and the content hash confirms it).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_arguments(a, "index directory or store")
    a.add_argument("images", metavar="DIR", help="folder to scan (usually the one the index was built from)")
    a.add_argument("--checkpoint", metavar="CKPT", help="checkpoint (default: the one the index was built with)")
    _common_write_args(a, mode_default=None)

    r = sub.add_parser("remove", help="drop images (or whole folders) from an index",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_arguments(r, "index directory or store")
    r.add_argument("paths", metavar="PATH", nargs="+",
                   help="image path or folder (as given, or relative to the index's image folder)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")

    i = sub.add_parser("info", help="print counts, model, search mode and sizes on disk")
    add_store_arguments(i, "index directory or store")
    i.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _partition_args(b) -> None:
    g = b.add_argument_group("partitioned builds (very large galleries, resumable, torchrun)")
    g.add_argument("--list", metavar="FILE", help="a file of image paths, one per line, instead of scanning --images "
                   "(relative paths are taken from --images, or from the list's folder)")
    g.add_argument("--partition-size", type=int, metavar="N",
                   help="embed in partitions of N files of the sorted list, each saved in the work folder as it "
                   "finishes; a killed build resumes from them (default 4096 with --list or under torchrun; "
                   "without this, --list or torchrun the build is one pass)")
    g.add_argument("--work-dir", metavar="DIR", help="where partitions are kept (default INDEX.parts)")
    g.add_argument("--keep-parts", action="store_true", help="keep the partitions after publishing the index")


def _common_write_args(p, mode_default: str | None = "auto") -> None:
    p.add_argument("--recursive", "-r", action="store_true", help="also scan subfolders")
    p.add_argument("--metadata", metavar="FILE.csv", help="per-image metadata CSV (see below)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding processes (default: CPU cores - 1, at most 4; 0 = in-process)")
    p.add_argument("--search-mode", choices=["auto", "exact", "ivf", "ivfpq", "hnsw"], default=mode_default,
                   help="exact or approximate search; auto picks by gallery size "
                   "(exact below 50k items, IVF beyond; IVF-PQ, compressed codes for 10^7+ items, "
                   "and HNSW only when asked for)" + ("" if mode_default else "; default: keep"))
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from tbps.cli.common import UserError, check_device, index_tta, load_encoder, resolve_store
    from tbps.index import add_to_index, build_index, remove_from_index
    from tbps.index.ingest import add_to_store, build_store, remove_from_store
    from tbps.index.vectorstore import open_store, parse_store

    action = args.index_command
    resolve_store(args, {"add": "images", "remove": "paths"}.get(action))
    spec = parse_store(args.index)  # a folder (faiss + SQLite, the default) or qdrant:PATH / qdrant://HOST/COLL
    if action == "info":
        with open_store(spec) as ix:
            info = ix.info()
        _print(info, args.json, _format_info)
        return 0
    if action == "remove":
        stats = (remove_from_index if spec.is_local_index else remove_from_store)(args.index, args.paths)
        _print(stats, args.json, lambda s: f"removed {s['removed']} item(s); index now holds {s['count']}"
               + (f" (generation {s['generation']})" if s["generation"] is not None else ""))
        for p in stats["not_found"]:
            print(f"tbps: warning: {p} is not in the index", file=sys.stderr)
        return 0 if stats["removed"] or not stats["not_found"] else 1
    if getattr(args, "batch_size", 1) <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0 (0: decode in this process), got {args.workers}")
    if not spec.is_local_index and args.search_mode not in (None, "auto"):
        raise UserError("--search-mode applies to the local index folder; a qdrant store searches with its engine's index")
    check_device(args.device)
    common = {"recursive": args.recursive, "metadata_csv": args.metadata, "batch_size": args.batch_size,
              "workers": args.workers, "progress": not args.no_progress}
    partitioned = action == "build" and (args.list or args.partition_size is not None or _world() > 1)
    if partitioned and not spec.is_local_index:
        raise UserError("--list, --partition-size and torchrun builds write a local index folder; "
                        "a qdrant store is written batch by batch (tbps index build --store ...)")
    if partitioned:
        stats = _build_partitioned(args)
        if stats is None:  # a rank other than 0: rank 0 reports
            return 0
    elif action == "build":
        if not args.images:
            raise UserError("give --images DIR (or --list FILE)")
        encoder = load_encoder(args.checkpoint, args.device, image_tta=args.tta)
        if spec.is_local_index:
            stats = build_index(args.index, encoder, args.images, search_mode=args.search_mode,
                                checkpoint=args.checkpoint, overwrite=args.overwrite, **common)
        else:
            stats = build_store(spec, encoder, args.images, checkpoint=args.checkpoint, overwrite=args.overwrite,
                                **common)
    else:  # add
        with open_store(spec) as ix:  # the checkpoint (unless given) and the mirror average it was built with
            checkpoint, tta = args.checkpoint or ix.checkpoint, index_tta(ix)
        if not checkpoint:
            raise UserError(f"index {args.index} does not record its checkpoint; pass --checkpoint")
        encoder = load_encoder(checkpoint, args.device, image_tta=tta)
        if spec.is_local_index:
            stats = add_to_index(args.index, encoder, args.images, search_mode=args.search_mode, **common)
        else:
            stats = add_to_store(spec, encoder, args.images, **common)
    for s in stats["skipped"]:
        print(f"tbps: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    for s in stats.get("unreadable_folders", []):
        print(f"tbps: warning: cannot read folder {s['path']} ({s['reason']}); its images are not indexed",
              file=sys.stderr)
    _print(stats, args.json, _format_write)
    return 0


def _world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _build_partitioned(args) -> dict | None:
    """`index build` in partitions; under torchrun each rank embeds its share and rank 0 publishes."""
    from tbps.cli.common import UserError, load_encoder
    from tbps.engine.distributed import barrier, init_distributed, leave_distributed
    from tbps.index.partition import DEFAULT_PARTITION_SIZE, build_index_partitioned, read_file_list, scan_for_partitions

    if args.partition_size is not None and args.partition_size <= 0:
        raise UserError(f"--partition-size must be positive, got {args.partition_size}")
    if not (args.list or args.images):
        raise UserError("give --images DIR or --list FILE")
    if args.list:
        files, root = read_file_list(args.list, args.images)
    else:
        files, root = scan_for_partitions(args.images, args.recursive, args.index, args.metadata), args.images
    info = init_distributed(args.device)
    device = args.device
    if info.enabled and device.startswith("cuda") and ":" not in device:
        device = f"cuda:{info.local_rank}"  # one GPU per process
    try:
        encoder = load_encoder(args.checkpoint, device, image_tta=args.tta)
        stats = build_index_partitioned(
            args.index, encoder, files, root, work_dir=args.work_dir,
            partition_size=args.partition_size or DEFAULT_PARTITION_SIZE, rank=info.rank, world=info.world_size,
            barrier=(lambda: barrier(info)) if info.enabled else None, metadata_csv=args.metadata,
            batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
            search_mode=args.search_mode, checkpoint=_abspath(args.checkpoint), recursive=args.recursive,
            keep_parts=args.keep_parts, overwrite=args.overwrite)
        barrier(info)  # the others wait for rank 0's publish, so that all exit after the index exists
    finally:
        leave_distributed(info)
    return stats if info.is_main else None


def _abspath(p: str) -> str:
    import pathlib

    return str(pathlib.Path(p).expanduser().resolve())


def _print(obj: dict, as_json: bool, fmt) -> None:
    print(json.dumps(obj, indent=2) if as_json else fmt(obj))


def _format_write(s: dict) -> str:
    lines = [
        f"index {s['index']}" + (f" (generation {s['generation']})" if s["generation"] is not None else "")
        + f": {s['count']} item(s), search mode {s['search_mode']}",
        f"  scanned {s['scanned']} file(s): added {s['added']}, updated {s['updated']}"
        + (f", unchanged {s['unchanged']}" if "unchanged" in s else "")
        + f", skipped {s['skipped_count']}",
    ]
    if "partitions" in s:
        lines.append(f"  partitions: {s['partitions']} (embedded {s['embedded_partitions']} here, "
                     f"{s['reused_partitions']} reused from an earlier run)")
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
        f"index:       {i['path']}" + (f" (generation {i['generation']})" if i["generation"] is not None else ""),
        *([f"store:       qdrant collection {i['collection']!r}, engine {i['engine']} ({i['engine_status']}); "
           f"count is the engine's; next id {i['next_id']}"] if i.get("backend") == "qdrant" else []),
        f"items:       {i['count']} x {i['dim']}-d features",
        f"model:       {fp.get('arch', '?')}, checkpoint {i['checkpoint'] or '(not recorded)'}",
        f"             sha256 {str(fp.get('checkpoint_sha256', '?'))[:16]}..., image size {fp.get('image_size')}",
        f"images:      {i['images_dir']}{' (recursive)' if i['recursive'] else ''}",
        f"search:      {i['search_mode']} (requested {i['search_mode_requested']}) {i['search_params'] or ''}",
        f"columns:     {', '.join(i['columns'])}",
        "disk:        " + (", ".join(f"{k} {_mb(v)}" for k, v in sizes.items() if v is not None) or "(on the server)"),
        f"updated:     {i['updated']}",
    ])


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
