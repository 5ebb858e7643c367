"""Names a package exports, imported on first use (so that importing the package, or the
command line's start-up, does not wait for MLX, mlx-lm and transformers)."""

import importlib
import sys
from typing import Callable, Dict


def lazy_exports(package: str, exports: Dict[str, str]) -> Callable:
    """A module `__getattr__` for `package` that imports `exports[name]` (a submodule,
    relative to the package) when `name` is first asked for, and keeps the value."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
