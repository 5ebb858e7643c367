"""Gemma 4 with its Multi-Token-Prediction drafter on MLX: faster, and exactly the target's output."""

from .adaptive import DraftLengthController
from .drafter import Drafter, load_drafter
from .generate import (
    GenerationResponse,
    SpeculativeStats,
    generate,
    load,
    make_prompt_cache,
    stream_generate,
)
from .target import Target

__version__ = "0.1.0"

__all__ = [
    "DraftLengthController",
    "Drafter",
    "GenerationResponse",
    "SpeculativeStats",
    "Target",
    "generate",
    "load",
    "load_drafter",
    "make_prompt_cache",
    "stream_generate",
]
