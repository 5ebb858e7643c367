"""Gemma 4 with its Multi-Token-Prediction drafter on MLX: faster, and exactly the target's output."""

from .adaptive import DraftLengthController
from .batch import BatchEngine, BatchResponse, RowEvent, batch_generate
from .drafter import Drafter, load_drafter
from .generate import GenerationResponse, SpeculativeStats, generate, make_prompt_cache, stream_generate
from .loading import load
from .target import Target

__version__ = "0.1.0"

__all__ = [
    "BatchEngine",
    "BatchResponse",
    "RowEvent",
    "batch_generate",
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
