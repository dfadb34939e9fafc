"""Read a released checkpoint's tensors without running anything from the file.

- ``.safetensors``: safetensors' own reader;
- a TorchScript archive (OpenAI's ``ViT-B-16.pt``, ``RN50.pt``): never ``torch.jit.load`` (which runs the
  archive's code). A restricted unpickler reads the archive's ``data.pkl``: it rebuilds tensors from the
  archive's storages and records each scripted module's attributes as a plain dict; any other global
  (a function, a class outside the tensor machinery) is refused before it is called;
- any other file: ``torch.load(weights_only=True)``, which refuses code as well.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


class ConvertError(ValueError):
    """A source checkpoint cannot be converted (unreadable, unsafe, wrong layout); one line, exit 2."""

    user_error = True


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class ScriptModule:
    """A scripted module's pickled attributes (tensors, submodules, flags), kept as ``state``."""

    name = "?"

    def __setstate__(self, state):
        self.state = state


class _Storage:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    flat = storage
    return flat.as_strided(tuple(size), tuple(stride), int(offset)).clone()


class _TensorsOnly(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        if module.startswith("__torch__.") or module == "__torch__":
            return type(name, (ScriptModule,), {"name": f"{module}.{name}"})
        raise ConvertError(f"{self.path}: the archive asks for {module}.{name}, which is not a tensor; "
                           "refusing to load it (only tensors and module attributes are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise ConvertError(f"{self.path}: unexpected persistent object {str(pid)[:80]!r} in the archive")
        kind, key, numel = pid[1], str(pid[2]), int(pid[4])
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise ConvertError(f"{self.path}: storage {key} is missing from the archive") from None
            flat = torch.frombuffer(bytearray(raw), dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
            if flat.numel() < numel:
                raise ConvertError(f"{self.path}: storage {key} holds {flat.numel()} values, {numel} expected")
            self.storages[key] = flat
        return self.storages[key]


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, ScriptModule):
        for k, v in (obj.state or {}).items() if isinstance(getattr(obj, "state", None), dict) else ():
            _flatten(v, f"{prefix}{k}.", out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)


def read_torchscript(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive by attribute path (``visual.conv1.weight``), read without
    executing the archive."""
    path = str(path)
    with zipfile.ZipFile(path) as z:
        pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ConvertError(f"{path}: not a TorchScript archive (no single data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in z.namelist() and z.read(byteorder).strip() not in (b"little", b""):
            raise ConvertError(f"{path}: a big-endian archive is not supported")
        root = _TensorsOnly(z.read(pkls[0]), z, prefix, path).load()
    out: dict[str, torch.Tensor] = {}
    _flatten(root, "", out)
    if not out:
        raise ConvertError(f"{path}: the archive holds no tensors")
    return out


def is_torchscript(path: str | os.PathLike) -> bool:
    """A zip archive with TorchScript code (``*/code/``) or constants."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def read_source(path: str | os.PathLike) -> Any:
    """A released file's content as tensors and plain containers (see the module doc)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConvertError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:
            raise ConvertError(f"{p}: cannot be read as safetensors ({type(e).__name__}: {e})") from None
    if is_torchscript(p):
        try:
            return read_torchscript(p)
        except ConvertError:
            raise
        except Exception as e:
            raise ConvertError(f"{p}: cannot be read as a TorchScript archive ({type(e).__name__}: {e})") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{p}: refused: the file needs arbitrary unpickling, which could run code "
                           f"({first[:160]})") from None
    except Exception as e:
        raise ConvertError(f"{p}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from None
