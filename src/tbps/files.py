"""Files a user keeps: atomic writes, and the one cache folder (``$TBPS_CACHE``)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over ``path``.

    A crash (or kill -9) at any moment leaves either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def cache_dir(*parts: str) -> Path:
    """tbps's cache folder, ``$TBPS_CACHE`` (default ``~/.cache/tbps``), joined with ``parts``.

    Everything tbps caches lives below it: word-vector dictionaries (``word_vectors/``), parsed
    phrases (``phrases/``) and the caption parses of MeFa's text negatives (``text_negatives/``).
    Nothing in it is needed for correctness: delete it at any time.
    """
    root = os.environ.get("TBPS_CACHE") or Path.home() / ".cache" / "tbps"
    return Path(root).joinpath(*parts)
