"""Batched exact speculative decoding: many sequences per round, each one exactly what
single-stream decoding gives it.

`engine.py` holds `BatchEngine` (continuous batching: `insert`, `step`, `remove`), which
coordinates three parts with one owner each: `admission.py` (waiting rows, chunked prefill
and the prompt cache hand-off), `rows.py` (the active rows' per-row state on the device and
the events they hand out) and `round.py` (drafting, verifying and judging one round for
every row). `cache.py` is the ragged K/V cache those rows share, `generate.py` the
`batch_generate` loop over the engine. The names below are imported on first use, so the
single-stream code can import the ragged cache without loading the engine.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "BatchEngine": "engine",
    "RowEvent": "rows",
    "BatchResponse": "generate",
    "batch_generate": "generate",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
