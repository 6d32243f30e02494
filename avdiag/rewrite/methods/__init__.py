"""Rewrite methods, registered by name: ``abri``, ``reset``, ``relearn``, ``recalibrate``.

Each method is one module of this package that registers a :class:`Method` (name, options dataclass,
validation, ``apply``); every module here is imported with the package, so a new method is a new file.
``get(name)`` returns one, ``names()`` lists them, ``register`` / ``unregister`` add and remove one
(a method of your own can be registered from anywhere).
"""

from __future__ import annotations

import importlib
import pkgutil

from avdiag.rewrite.methods.base import (
    DataAccess,
    Method,
    Rewrite,
    RewriteInput,
    get,
    names,
    register,
    unregister,
)

__all__ = ["DataAccess", "Method", "Rewrite", "RewriteInput", "get", "names", "register", "unregister"]


def _import_method_modules() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_method_modules()
