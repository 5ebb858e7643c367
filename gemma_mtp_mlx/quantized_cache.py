"""A quantized K/V cache for the target's full-attention layers that speculation can roll
back: `kv_bits` (4 or 8), `kv_group_size` and `quantized_kv_start` as mlx-lm names them.

The first `quantized_kv_start` positions stay in float (mlx-lm's `KVCache`); every later
position is stored quantized (mlx-lm's `QuantizedKVCache`), each position's K and V
vectors on their own, in groups of `kv_group_size` along the head dimension. So what a
position stores depends only on that position: a verify of k + 1 tokens stores exactly
what k + 1 decode steps would, and dropping rejected drafts (`trim`) leaves exactly the
kept positions, at any group or float/quantized boundary. Attention reads the cache
dequantized (`update_and_fetch` returns float K/V), which every Gemma 4 layer takes,
the KV-shared layers of E2B/E4B included (mlx-lm's quantized attention path does not
serve them); the drafter reads the same dequantized K/V. The memory held between steps is
the quantized size; a step's attention holds one layer's float copy at a time.
"""

from typing import Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, create_attention_mask

from .validate import InvalidInput

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


def check_kv_options(kv_bits: Optional[int], kv_group_size: int, quantized_kv_start: int, head_dims) -> None:
    """Clear errors for bits, group sizes that do not divide every full-attention head
    dimension (`head_dims`), and a negative start."""
    if kv_bits is None:
        return
    if kv_bits not in KV_BITS:
        raise InvalidInput(f"kv_bits must be 4 or 8 (None keeps the K/V cache in float), got {kv_bits!r}")
    if kv_group_size not in KV_GROUP_SIZES:
        raise InvalidInput(f"kv_group_size must be 32, 64 or 128, got {kv_group_size!r}")
    for dim in head_dims:
        if dim % kv_group_size:
            raise InvalidInput(f"kv_group_size {kv_group_size} does not divide this model's head dimension {dim}: "
                               f"use one of {[g for g in KV_GROUP_SIZES if dim % g == 0]}")
    if not isinstance(quantized_kv_start, int) or quantized_kv_start < 0:
        raise InvalidInput(f"quantized_kv_start must be a whole number >= 0, got {quantized_kv_start!r}")


class QuantizedFullKVCache:
    """Float K/V for positions < `start`, quantized K/V after: [B, kv_heads, positions, D]."""

    def __init__(self, bits: int, group_size: int = 64, start: int = 0):
        # (not `bits`: mlx-lm's attention takes a cache with `bits` for its quantized path)
        self.kv_bits, self.kv_group_size, self.start = bits, group_size, start
        self.head = KVCache()  # positions < start, in float
        self.tail = QuantizedKVCache(group_size, bits)

    @property
    def offset(self) -> int:
        return self.head.offset + self.tail.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        into_head = max(0, min(keys.shape[2], self.start - self.head.offset))
        if into_head:
            self.head.update_and_fetch(keys[..., :into_head, :], values[..., :into_head, :])
        if into_head < keys.shape[2]:
            self.tail.update_and_fetch(keys[..., into_head:, :], values[..., into_head:, :])
        return self.fetch()

    def fetch(self) -> Tuple[mx.array, mx.array]:
        """Every cached position's K and V, dequantized: ([B, heads, offset, D], same)."""
        parts = []
        if self.head.offset:
            parts.append(self.head.keys_and_values())
        if self.tail.offset:
            keys, values = self.tail.keys_and_values()
            parts.append((mx.dequantize(*keys, group_size=self.kv_group_size, bits=self.kv_bits),
                          mx.dequantize(*values, group_size=self.kv_group_size, bits=self.kv_bits)))
        if len(parts) == 1:
            return parts[0]
        return tuple(mx.concatenate(p, axis=2) for p in zip(*parts))

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest `n` positions (quantized ones first)."""
        n = min(n, self.offset)
        from_tail = min(n, self.tail.offset)
        self.tail.trim(from_tail)
        self.head.trim(n - from_tail)
        return n

    @property
    def nbytes(self) -> int:
        total = self.head.nbytes if self.head.keys is not None else 0
        if self.tail.keys is not None:
            total += sum(a.nbytes for a in (*self.tail.keys, *self.tail.values))
        return total

    def empty(self) -> bool:
        return self.offset == 0
