"""The ``tbps`` command: a table of subcommands, one module each.

Each module in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser and
sets ``func=run``, and ``run(args) -> int``. Modules keep their top-level imports light
(no torch, fastapi or faiss) so that ``tbps --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tbps.cli.common import UserError

# Order is the order shown by `tbps --help`.
COMMANDS = ["synth", "train", "eval", "demo", "convert", "index", "search", "serve", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbps",
        description="Text-based person search: train and evaluate TBPS models, "
        "and search your own gallery of person crops by text.",
        epilog="Run `tbps COMMAND --help` for the options of a command.",
    )
    from tbps import __version__

    parser.add_argument("--version", action="version", version=f"tbps {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tbps.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"tbps.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tbps.engine.runtime import passive_openmp_waits

    passive_openmp_waits()  # before anything loads torch: OpenMP reads it once (docs/performance.md, section 2)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tbps: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # errors a user can cause get one clear line
        if _is_user_error(e):
            print(f"tbps: error: {e}", file=sys.stderr)
            return 2
        raise


def _is_user_error(e: Exception) -> bool:
    if isinstance(e, UserError):
        return True
    # Library errors that carry a user-facing message mark themselves with `user_error = True`.
    return bool(getattr(type(e), "user_error", False))


if __name__ == "__main__":
    # Run through the package module so that `python -m tbps.cli.main` (torchrun) and the
    # `tbps` script share one copy of this module (and of UserError).
    from tbps.cli.main import main as _main

    sys.exit(_main())
