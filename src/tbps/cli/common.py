"""What the subcommands share: the one-line user error, the --device check, loading a checkpoint as an
encoder, the re-scoring options and reading a query image. Subcommands import this module, never each other."""

from __future__ import annotations

DEFAULT_RESCORE = 128  # candidates re-scored by --rescore without a value (LAIP, RaSa)


class UserError(Exception):
    """An error the user can fix: printed as one line, exit status 2, no traceback."""


def check_device(name: str | None, default: str | None = "cpu") -> str:
    """``--device`` checked before any work: a malformed name, or a GPU this machine lacks, is a
    one-line error (exit 2), not a traceback after the model has loaded. None gives ``default``
    (None: cuda when available, else cpu)."""
    from tbps.engine.runtime import check_device as _check

    return _check(name, default)


def load_encoder(checkpoint: str, device: str = "cpu", image_tta: str = "none"):
    """The ``tbps.retrieval.encoder.Encoder`` for ``checkpoint`` (torch is imported here)."""
    from tbps.retrieval.encoder import Encoder

    return Encoder.from_checkpoint(checkpoint, device=device, image_tta=image_tta)


def index_tta(store) -> str:
    """The image test-time average an index was built with ("none" unless its fingerprint says)."""
    return str((getattr(store, "fingerprint", None) or {}).get("image_tta", "none"))


def add_rescore_arguments(p, k_help: str) -> None:
    """--rescore [K], --rescore-mode, --rescore-weight (shared by `tbps search` and `tbps serve`)."""
    p.add_argument("--rescore", type=int, nargs="?", const=DEFAULT_RESCORE, default=None, metavar="K", help=k_help)
    p.add_argument("--rescore-mode", choices=["itm", "itm+itc"], default=None,
                   help="itm: the match probability alone (RaSa, default); itm+itc: minmax(ITM) + W * minmax(cosine)")
    p.add_argument("--rescore-weight", type=float, default=None, metavar="W",
                   help="W of --rescore-mode itm+itc (default 0.002)")


def check_rescore_args(k: int | None, mode: str | None, weight: float | None) -> dict | None:
    """--rescore/--rescore-mode/--rescore-weight -> ``{"mode", "weight"}`` (None without --rescore)."""
    import math

    if k is None:
        if mode is not None or weight is not None:
            raise UserError("--rescore-mode and --rescore-weight need --rescore [K]")
        return None
    if k <= 0:
        raise UserError(f"--rescore must be a positive integer, got {k}")
    mode = mode or "itm"
    if weight is not None and mode != "itm+itc":
        raise UserError("--rescore-weight is the cosine weight of --rescore-mode itm+itc")
    weight = 0.002 if weight is None else weight
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"--rescore-weight must be a finite number >= 0, got {weight}")
    return {"mode": mode, "weight": weight}


def load_rescorer(encoder, mode: str = "itm", weight: float = 0.002):
    """The ``tbps.retrieval.rescore.SearchRescorer`` sharing ``encoder``'s model; a checkpoint without a
    trained fusion encoder raises ``CheckpointError`` (a one-line user error)."""
    from tbps.retrieval.rescore import SearchRescorer

    return SearchRescorer.from_encoder(encoder, mode=mode, weight=weight)


def encode_image_file(encoder, path):
    """(1, D) features of the image file ``path``; unreadable file -> a one-line user error."""
    import pathlib

    import torch

    from tbps.data.images import ImageError, open_image

    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise UserError(f"query image {str(p)!r} does not exist")
    try:
        pixels = encoder.preprocess(open_image(p))
    except (ImageError, OSError) as e:
        raise UserError(f"cannot read query image {str(p)!r}: {e}") from None
    with torch.inference_mode():
        return encoder.encode_images(pixels[None])


STORE_HELP = ("the gallery, instead of INDEX: an index folder (the default backend), qdrant:PATH (Qdrant's "
              "local engine) or qdrant://HOST[:PORT]/COLLECTION (a Qdrant server; qdrants:// for HTTPS)")


def add_store_arguments(p, index_help: str) -> None:
    """INDEX (optional positional) and --store NAME, which says the same as a flag."""
    p.add_argument("index", metavar="INDEX", nargs="?", help=index_help)
    p.add_argument("--store", metavar="NAME", help=STORE_HELP)


def resolve_store(args, shift: str | None = None) -> None:
    """Put the store into ``args.index``. With --store, the first positional argparse gave INDEX
    belongs to the next positional, ``shift`` (TEXT of `tbps search`, DIR of `index add`...)."""
    if args.store is None:
        if args.index is None:
            raise UserError("give INDEX (an index folder or a store name) or --store NAME")
        return
    if args.index is not None:
        current = getattr(args, shift) if shift else None
        if shift is None or (current is not None and not isinstance(current, list)):
            raise UserError(f"give either INDEX or --store, not both ({args.index!r} and {args.store!r})")
        setattr(args, shift, [args.index, *current] if isinstance(current, list) else args.index)
    args.index = args.store


def options_anywhere(parser) -> None:
    """Let options come before, between or after ``parser``'s positionals (``tbps search INDEX -k 3
    "red coat"``): argparse alone gives an optional positional its empty value at the first
    option and then calls the text an unrecognised argument. Parses intermixed
    (``parse_known_intermixed_args``) whenever the subcommand parser is asked to parse."""
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        parser.parse_known_args = plain  # the intermixed parser calls parse_known_args itself
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser.parse_known_args = parse_known_args

    parser.parse_known_args = parse_known_args


def quiet_broken_pipe() -> int:
    """What a command returns when its reader went away (``tbps search ... | head``): stdout is
    pointed at /dev/null so that Python's final flush does not print a traceback either."""
    import os
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a file (tests, embedding): nothing will flush to a closed pipe
    return 0
