"""Gemma 4 with its Multi-Token-Prediction drafter on MLX: faster, and exactly the target's output.

The names below are imported on first use, so `import gemma_mtp_mlx` (and the command
line's start-up) does not wait for MLX, mlx-lm and transformers until they are needed.
"""

import sys
import types

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BatchEngine": "batch.engine",
    "BatchResponse": "batch.generate",
    "RowEvent": "batch.rows",
    "batch_generate": "batch.generate",
    "DraftLengthController": "adaptive",
    "Drafter": "drafter",
    "load_drafter": "drafter",
    "GenerationResponse": "generate",
    "SpeculativeStats": "stats",
    "generate": "generate",
    "load": "loading",
    "make_prompt_cache": "generate",
    "stream_generate": "generate",
    "Target": "target",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule `generate` sets it as an attribute of the package; keep the
    function of that name there instead, as an eager `from .generate import generate` did."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
