"""Reads PyTorch ``.pt`` / ``.bin`` checkpoints without torch and without running code from the
file.

A ``torch.save`` file is a zip holding ``data.pkl`` and one raw byte file per storage. Unpickling an
arbitrary pickle can call any importable function, so ``load_pt`` uses an unpickler that resolves
only an allow-list: the tensor-rebuild functions and storage types (turned into NumPy arrays), plain
containers, and the ``argparse.Namespace`` that fair-esm stores its config in. Anything else is
refused with ``UnsafeCheckpointError`` before it is called. Writing (``save_pt``) needs torch, an
optional extra.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from esmjax.errors import InputError


class UnsafeCheckpointError(InputError, pickle.UnpicklingError):
    """The pickle reaches for a global that a weights file has no reason to use."""


class TorchFileError(InputError):
    """Not a file ``load_pt`` can read: legacy (pre-1.6, non-zip) serialization, not a torch file,
    or a damaged archive."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float32": np.float32,
    "float": np.float32,
    "float64": np.float64,
    "double": np.float64,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


class _StorageType:
    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


class _TorchDtype:
    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor_v2(
    storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None
):
    arr = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * storage.itemsize for s in stride)
    )
    return np.array(arr)  # own the memory, contiguous


def _rebuild_parameter(data, requires_grad=False, hooks=None, *args):
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch", "Size"): tuple,
}
_ALLOWED.update({("torch", name): _StorageType(dt) for name, dt in _STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", name): _TorchDtype(dt) for name, dt in _TORCH_DTYPES.items()})


class Opaque:
    """An inert stand-in for a class from an ``opaque_modules`` package (e.g. the OmegaConf config
    objects in fair-esm ESMFold files): it records the constructor arguments and pickled state
    and runs no code of its own."""

    qualname = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items = args, None, {}
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value


class _SafeUnpickler(pickle.Unpickler):
    def __init__(
        self, file, archive: zipfile.ZipFile, prefix: str, opaque_modules: tuple[str, ...] = ()
    ):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._opaque = opaque_modules

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            if module.split(".")[0] in self._opaque:
                return type(name, (Opaque,), {"qualname": f"{module}.{name}"})
            raise UnsafeCheckpointError(
                f"refusing to load: the checkpoint's pickle asks for {module}.{name}, which a "
                "weights file does not need (only tensors, plain containers and "
                "argparse.Namespace are allowed)"
            ) from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        elif isinstance(storage_type, _TorchDtype):  # UntypedStorage-era pickles carry a dtype
            dtype = storage_type.dtype
        else:
            raise UnsafeCheckpointError(f"unexpected storage type {storage_type!r}")
        raw = self._archive.read(f"{self._prefix}data/{key}")
        return np.frombuffer(raw, dtype=dtype)


def load_pt(path: str | Path, opaque_modules: tuple[str, ...] = ()) -> Any:
    """Loads a ``torch.save`` zip file into NumPy arrays and plain Python objects, safely.

    Classes from the packages named in ``opaque_modules`` load as inert ``Opaque`` records instead
    of being refused (their code never runs); everything else outside the allow-list is refused."""
    p = Path(path)
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as f:
            magic = f.read(2)
        if magic[:1] == b"\x80":  # a bare pickle: torch.save before 1.6 (or _use_new_zipfile=False)
            raise TorchFileError(
                f"{p}: legacy (pre-1.6, non-zip) torch serialization is not supported; re-save it "
                "with a current torch: torch.save(torch.load(OLD), NEW)"
            )
        raise TorchFileError(f"{p}: not a PyTorch checkpoint (not a zip archive)")
    with zipfile.ZipFile(p) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise TorchFileError(f"{p}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        with zf.open(pkl[0]) as f:
            return _SafeUnpickler(f, zf, prefix, opaque_modules).load()


def save_pt(obj: Any, path: str | Path) -> None:
    """Writes ``obj`` (NumPy arrays become torch tensors) with ``torch.save``; needs the
    ``torch`` extra."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("writing .pt files needs PyTorch: pip install 'esmjax[torch]'") from None

    def conv(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            if x.dtype == ml_dtypes.bfloat16:
                return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
            return torch.from_numpy(np.array(x, copy=True, order="C"))
        if isinstance(x, dict):
            return type(x)((k, conv(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return type(x)(conv(v) for v in x)
        return x

    # Through a Python file: torch's own file writer reports a failed write (a full disk) as
    # "iostream error" without its errno; a Python file's OSError is kept as the context of
    # torch's error (esmjax.io.paths.write_failure finds it there)
    with open(path, "wb") as f:
        torch.save(conv(obj), f)
