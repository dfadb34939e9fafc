"""Reading and writing checkpoint files as data, never as code.

Two formats hold the same nested state (dicts, lists, tuples, strings, numbers, tensors):

- ``.pt``: ``torch.save``'s zip of a pickle. It is read with ``torch.load(weights_only=True)``,
  whose unpickler rebuilds tensors and plain containers only and refuses every other global
  before calling it. Writing first checks that the state holds nothing else, so every file tbps
  writes reads back that way.
- ``.safetensors``: the tensors in safetensors' flat table (named by their path in the state,
  e.g. ``model.visual.conv1.weight``); everything else as JSON in the header's metadata under
  ``tbps``, with each tensor replaced by ``{"__tensor__": name}`` (tuples, dicts with non-string
  keys and dicts with ``__x__`` keys are tagged so they come back exactly). No pickle at all.

A file that needs arbitrary code to unpickle raises :class:`UnsafeCheckpointError` naming the
first global it asked for; nothing of it runs.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_SUFFIX = ".safetensors"
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.Size)


class TensorFileError(ValueError):
    """A checkpoint file cannot be read as data (refused, truncated, foreign)."""

    user_error = True


class UnsafeCheckpointError(TensorFileError):
    """The file's pickle asks for code (a global other than tensors and plain containers)."""


# ------------------------------------------------------------------------- plain values
def plain_state(obj: Any, where: str = "state") -> Any:
    """``obj`` with numpy scalars turned into the equal python numbers; raises ``TypeError``
    naming the first value that is not a tensor, plain number, string or container of those
    (it would need code to unpickle)."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return obj
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, plain_state(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    item = getattr(obj, "item", None)
    if type(obj).__module__ == "numpy" and callable(item) and getattr(obj, "ndim", 1) == 0:
        return plain_state(item(), where)  # np.float64(0.5) -> 0.5, exactly
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}: a checkpoint holds tensors, "
                    "numbers, strings and lists/dicts of them only")


# ------------------------------------------------------------------------------ writing
def write_state(f, state: dict[str, Any], fmt: str) -> None:
    """Write ``state`` to the open binary file ``f`` as ``fmt`` ("pt" or "safetensors")."""
    state = plain_state(state)
    if fmt == "pt":
        torch.save(state, f)
        return
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(state, "", tensors)
    f.write(save(tensors, metadata={"format": "tbps-checkpoint", "tbps": json.dumps(meta)}))


def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key, n = name or "tensor", 1
        while key in tensors:  # two paths that join to one name ("a.b" + "c" and "a" + "b.c")
            key, n = f"{name}#{n}", n + 1
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(obj, (torch.dtype, torch.Size)):
        return {"__" + type(obj).__name__.lower() + "__": str(obj) if isinstance(obj, torch.dtype) else list(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}.{i}".lstrip("."), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}.{i}".lstrip("."), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        items = [(k, _encode(v, f"{name}.{k}".lstrip("."), tensors)) for k, v in obj.items()]
        if all(isinstance(k, str) and not (k.startswith("__") and k.endswith("__")) for k in obj):
            return dict(items)
        return {"__items__": [[_encode(k, "", {}), v] for k, v in items]}
    return obj  # str, int, float (NaN too: Python's json writes and reads it), bool, None


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, v), = obj.items()
        if tag == "__tensor__":
            return tensors[v]
        if tag == "__tuple__":
            return tuple(_decode(x, tensors) for x in v)
        if tag == "__items__":
            return {_decode(k, tensors): _decode(x, tensors) for k, x in v}
        if tag == "__dtype__":
            return getattr(torch, v.removeprefix("torch."))
        if tag == "__size__":
            return torch.Size(v)
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ------------------------------------------------------------------------------ reading
def is_safetensors(path: Path) -> bool:
    """True when ``path`` is laid out as safetensors (8-byte header length, then JSON), whatever its name."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= min(path.stat().st_size - 8, 100 << 20)


def read_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """The state stored in ``path`` (either format), read as data only.

    Raises :class:`UnsafeCheckpointError` for a pickle that asks for code, :class:`TensorFileError`
    for anything else that cannot be read (one line each, naming the file)."""
    path = Path(path)
    if is_safetensors(path):
        return _read_safetensors(path, map_location)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _refused_global(path, str(e))
        if detail:
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: it needs arbitrary code to unpickle ({detail}); "
                "tbps checkpoints hold tensors and plain values only") from None
        raise TensorFileError(f"{path}: cannot be read as a checkpoint (not a torch or safetensors file: "
                              f"{_unpickler_reason(str(e))})") from None
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise TensorFileError(f"{path}: cannot be read as a checkpoint ({_describe(e)})") from None


def _read_safetensors(path: Path, map_location) -> Any:
    from safetensors import safe_open

    device = str(map_location) if map_location is not None else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise TensorFileError(f"{path}: cannot be read as safetensors ({_describe(e)})") from None
    if "tbps" not in meta:  # a foreign safetensors file: the bare tensors
        return tensors
    try:
        return _decode(json.loads(meta["tbps"]), tensors)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TensorFileError(f"{path}: corrupt tbps metadata in the safetensors header ({e!r})") from None


def _refused_global(path: Path, message: str) -> str | None:
    """The global torch's restricted unpickler refused in ``path`` ("GLOBAL posix.system"), None
    when the failure was something else (a damaged or foreign file)."""
    if "Weights only load failed" not in message and "WeightsUnpickler" not in message:
        return None
    name = _first_foreign_global(path)
    return f"GLOBAL {name}" if name else None


def _unpickler_reason(message: str) -> str:
    """The restricted unpickler's own reason ("Unsupported operand 110"), else the first line."""
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    return m.group(1).strip() if m else _first_line(message)


def _first_foreign_global(path: Path) -> str | None:
    """The first global the file's pickle(s) name that the safe loader does not allow, found by
    reading the opcodes (``pickletools.genops`` executes nothing)."""
    import io
    import pickletools
    import zipfile

    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:  # private API: fall back to "torch itself and the containers it rebuilds"
        allowed = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(member) if member else b""
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)
        stream, strings = io.BytesIO(data), []
        while stream.tell() < len(data):  # a legacy torch file is several pickles in a row
            for op, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str) and "UNICODE" in op.name:
                    strings = (strings + [arg])[-2:]
                name = (arg.replace(" ", ".") if op.name in ("GLOBAL", "INST") else
                        ".".join(strings) if op.name == "STACK_GLOBAL" and len(strings) == 2 else None)
                if name and name not in allowed and not (not allowed and name.startswith("torch.")):
                    return name
    except Exception:  # a damaged stream: report what torch said instead
        return None
    return None


def _first_line(e: BaseException | str) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else ""


def _describe(e: BaseException) -> str:
    """"EOFError: empty or truncated file", "RuntimeError: <its first line>"."""
    return f"{type(e).__name__}: {_first_line(e) or 'empty or truncated file'}"
