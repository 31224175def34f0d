"""Lazy package exports: a package's public names resolved from its submodules on first use.

Packages whose submodules pull in heavy dependencies (megatron-core, torch, DeepSpeed) list their
public names as ``{name: submodule}`` and install the pair returned by ``lazy_exports`` as their
module ``__getattr__`` / ``__dir__``, so importing one light submodule (or running ``--help``)
does not import the heavy ones. Sits below every layer (imports only the standard library).
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable, Callable]:
    """(``__getattr__``, ``__dir__``) for ``package``: ``package.<name>`` imports
    ``package.<exports[name]>`` once and keeps the value in the package namespace."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
