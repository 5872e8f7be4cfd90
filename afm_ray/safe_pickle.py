"""Unpickle data files without running code from them.

A pickle can call any importable function while it loads (`os.system` is one `__reduce__`
away), so a CIFAR batch downloaded from anywhere, or a `data.root` taken from a checkpoint's
stored config or from MLflow params, must never reach `pickle.load`. `load_data_pickle` uses
an Unpickler whose `find_class` admits only what a CIFAR python batch is made of: builtin
containers and numpy arrays (the Python 2 files of the official archive and pickles written by
numpy 1 or 2, any protocol). Anything else is refused, with its name, before it is called.
"""

from __future__ import annotations

import importlib
import pickle
from typing import IO, Any

from afm_ray.errors import DataError

# (module, name) as a pickle spells them -> (module to take the object from, in order of preference).
# numpy 2 moved numpy.core to numpy._core; pickles name either spelling, numpy 1 has only the first.
_CORE = ("numpy._core", "numpy.core")
_ALLOWED: dict[tuple[str, str], tuple[str, ...]] = {
    ("numpy", "ndarray"): ("numpy",),
    ("numpy", "dtype"): ("numpy",),
    **{
        (f"{spelling}.{sub}", name): tuple(f"{core}.{sub}" for core in _CORE)
        for spelling in _CORE
        for sub, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    },
    # protocol 2 writes bytes as _codecs.encode(str, "latin1"); sets, bytearrays and complex numbers
    # go through their builtin constructors
    ("_codecs", "encode"): ("_codecs",),
    **{("builtins", name): ("builtins",) for name in ("set", "frozenset", "bytearray", "complex")},
}
# Python 2 module names (the official CIFAR files were written by Python 2's cPickle).
_PY2_MODULES = {"__builtin__": "builtins"}


class UnsafePickleError(DataError):
    """A data pickle names a callable outside the allowlist: loading it could run code."""


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        sources = _ALLOWED.get((module, name))
        if sources is None:
            raise UnsafePickleError(f"{module}.{name}")
        for source in sources:
            try:
                return getattr(importlib.import_module(source), name)
            except (ImportError, AttributeError):
                continue
        raise UnsafePickleError(f"{module}.{name}")  # allowed, but this numpy lacks it

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"persistent id {pid!r}")


def load_data_pickle(file: IO[bytes], *, encoding: str = "bytes") -> Any:
    """`pickle.load(file, encoding=encoding)` restricted to builtin containers and numpy arrays.

    Raises UnsafePickleError (a DataError) naming the first refused class; other failures are
    pickle's own (UnpicklingError, EOFError, ...).
    """
    return _DataUnpickler(file, encoding=encoding).load()
