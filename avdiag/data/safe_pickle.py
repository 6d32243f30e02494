"""Reading pickled numpy arrays (Kinetics-Sounds/AVE ``audio_spec/{id}.pkl``) without running code.

:class:`ArrayUnpickler` overrides ``pickle.Unpickler.find_class``: the only globals it hands out
are the ones numpy needs to rebuild a plain array, under both the numpy 1.x (``numpy.core``) and
2.x (``numpy._core``) module names:

* ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``, ``...scalar``,
  ``numpy.ndarray``, ``numpy.dtype`` and the ``numpy.dtypes.*DType`` classes;
* ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer`` (protocol-5 pickles of
  arrays: builds an array from the pickled bytes);
* ``_codecs.encode`` restricted to the latin-1 codec (protocol-2 pickles store array bytes as a
  latin-1 string; any other codec is refused).

Any other global (``os.system``, ``builtins.eval``, ``numpy.load``, even other numpy functions) is
refused with a :class:`DataError` naming it, before anything is called: the payload never runs.
Persistent ids are refused too. The result must be a numeric (bool/int/float) ndarray.
"""

from __future__ import annotations

import _codecs
import io
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

from avdiag.data.base import DataError, MediaError


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise RefusedGlobal(f"_codecs.encode (codec {str(encoding)[:40]!r})")
    return _codecs.encode(text, "latin1", errors)


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = _multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = _multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = _numeric._frombuffer
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and name.endswith("DType"):
            allowed[("numpy.dtypes", name)] = cls
    return allowed


_ALLOWED = _allowed_globals()


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal(f"persistent id {str(pid)[:60]!r}")


def loads_array(data: bytes, label: str = "<bytes>") -> np.ndarray:
    """Unpickle ``data`` as a numeric numpy array, refusing everything else."""
    try:
        obj = ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except RefusedGlobal as exc:
        raise DataError(f"refused global {exc.name} in {label}: only numpy arrays are admitted "
                        "(the file was not executed)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError, UnicodeDecodeError, RecursionError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise MediaError(f"unreadable pickle {label}: {text}") from None
    if not isinstance(obj, np.ndarray) or type(obj) is not np.ndarray:
        raise DataError(f"{label} holds a {type(obj).__name__}, expected a numpy array")
    if obj.dtype.kind not in "biuf":
        raise DataError(f"{label} holds a {obj.dtype} array, expected a numeric array")
    return obj


def load_array(path: Path | str, where: str = "") -> np.ndarray:
    """Read a pickled numpy array from ``path`` safely; DataError naming the file on any problem."""
    prefix = f"{where}: " if where else ""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MediaError(f"{prefix}expected {path}", "missing") from None
    except OSError as exc:
        raise MediaError(f"{prefix}cannot read {path}: {exc.strerror or exc}") from None
    try:
        return loads_array(data, str(path))
    except DataError as exc:  # a damaged file stays a MediaError; a refused pickle stays an error
        if isinstance(exc, MediaError):
            raise MediaError(f"{prefix}{exc}", exc.kind) from None
        raise DataError(f"{prefix}{exc}") from None
