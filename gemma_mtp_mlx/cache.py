"""Speculation-safe K/V caches for the target model.

Full-attention layers keep mlx-lm's `KVCache` (it trims exactly). Sliding-window layers
use `SlidingKVCache`: a linear buffer that always keeps the last `window + 1 + rollback`
positions, so a rejected draft tail can be dropped at any context length (mlx-lm's
`RotatingKVCache` cannot be trimmed once it wraps) while memory stays O(window).
"""

from typing import List, NamedTuple, Optional, Tuple

import mlx.core as mx
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import KVCache

from .quantized_cache import QuantizedFullKVCache, check_kv_options


class SharedKV(NamedTuple):
    """What one drafter layer attends to: a K/V buffer and the slots of it that it may
    see, `[start, end)` (`end` None: up to the end). Handing the drafter whole buffers
    (no copies) with the visible span as numbers keeps its input shapes stable while the
    cache fills, so one compiled draft graph serves many rounds."""

    keys: mx.array  # [B, kv_heads, S, D]
    values: mx.array  # [B, kv_heads, S, D]
    start: int = 0
    end: Optional[int] = None

    def views(self) -> Tuple[mx.array, mx.array]:
        """The visible slots only: [B, kv_heads, end - start, D] each (no copy)."""
        return self.keys[..., self.start : self.end, :], self.values[..., self.start : self.end, :]


class SlidingKVCache:
    """K/V of a sliding-window layer, trimmable by up to `rollback` positions.

    The buffer holds absolute positions `[start, start + used)`. Before new entries are
    written it keeps at least the last `keep = window + 1 + rollback` positions: the
    target's queries need `window - 1` earlier keys, the drafter reads the last
    `window + 1` verified ones, and `rollback` more let a caller drop that many tokens
    after the write.
    """

    def __init__(self, window: int, rollback: int, step: int = 64):
        self.window = window
        self.keep = window + 1 + rollback
        self.step = step
        self.keys = None
        self.values = None
        self.offset = 0  # number of positions processed (absolute position of the next)
        self.start = 0  # absolute position of buffer slot 0
        self.used = 0  # filled buffer slots

    def _needs_room(self, num_new: int) -> bool:
        return self.keys is None or self.used + num_new > self.keys.shape[2]

    def _kept_before_write(self, num_new: int) -> int:
        """Slots that survive before `num_new` entries are written."""
        return min(self.used, self.keep) if self._needs_room(num_new) else self.used

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        # keys, values: [B, kv_heads, L, D]
        num_new = keys.shape[2]
        slot = self.reserve(num_new, keys, values)
        self.keys[..., slot : slot + num_new, :] = keys
        self.values[..., slot : slot + num_new, :] = values
        self.used += num_new
        self.offset += num_new
        return self.keys[..., : self.used, :], self.values[..., : self.used, :]

    def reserve(self, num_new: int, keys: Optional[mx.array] = None, values: Optional[mx.array] = None) -> int:
        """Make room for `num_new` entries as a write would, and return the slot the first
        goes to. keys, values: entries of the new shape and dtype (needed only before the
        first write)."""
        if self._needs_room(num_new):
            self._reallocate(self._kept_before_write(num_new), num_new,
                             self.keys if keys is None else keys, self.values if values is None else values)
        return self.used

    def _reallocate(self, kept: int, num_new: int, keys: mx.array, values: mx.array):
        """A new buffer holding the last `kept` slots and room for `num_new` and more;
        keys, values give the shapes and dtype."""
        capacity = self.keep + max(num_new, self.step)
        B, heads, _, k_dim = keys.shape
        new_keys = mx.zeros((B, heads, capacity, k_dim), keys.dtype)
        new_values = mx.zeros((B, heads, capacity, values.shape[3]), values.dtype)
        if kept:
            new_keys[..., :kept, :] = self.keys[..., self.used - kept : self.used, :]
            new_values[..., :kept, :] = self.values[..., self.used - kept : self.used, :]
        self.keys, self.values = new_keys, new_values
        self.start = self.offset - kept
        self.used = kept

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        """Causal sliding-window mask for `N` new queries over the keys the next write returns."""
        window = window_size or self.window
        kept = self._kept_before_write(N)
        query_pos = mx.arange(self.offset, self.offset + N)[:, None]
        key_pos = mx.arange(self.offset - kept, self.offset + N)[None]
        return (key_pos <= query_pos) & (query_pos - key_pos < window)

    def last(self, n: int):
        """Views of the newest `n` entries (fewer if fewer exist): [B, kv_heads, <=n, D]."""
        first = max(0, self.used - n)
        return self.keys[..., first : self.used, :], self.values[..., first : self.used, :]

    @property
    def rollback(self) -> int:
        """How many positions a caller may drop after a write."""
        return self.keep - self.window - 1

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(n, self.used)
        # After trimming, the last `window + 1` positions must still be in the buffer.
        if self.start > max(0, self.offset - n - self.window - 1):
            raise RuntimeError(
                f"cannot roll the sliding cache back by {n} positions: only "
                f"{self.rollback} were reserved when it was made"
            )
        self.used -= n
        self.offset -= n
        return n

    def size(self) -> int:
        return self.offset

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        """Everything the cache holds, for mlx-lm's `save_prompt_cache`: the filled slots
        [B, kv_heads, used, D] and the positions they stand for."""
        keys, values = (None, None) if self.keys is None else self.last(self.used)
        return keys, values, self.window, self.keep, self.step, self.offset, self.start, self.used

    @state.setter
    def state(self, state):
        self.keys, self.values, self.window, self.keep, self.step, self.offset, self.start, self.used = state

    @classmethod
    def from_state(cls, state):
        """The cache `state` describes (mlx-lm's `load_prompt_cache` calls this)."""
        cache = cls.__new__(cls)
        cache.state = state
        return cache


# mlx-lm's load_prompt_cache finds each cache's class by name in its own module.
setattr(mlx_lm_cache, SlidingKVCache.__name__, SlidingKVCache)


def visible_slots(positions: mx.array, starts: mx.array, num_new: int, num_slots: int,
                  window: Optional[int] = None) -> mx.array:
    """[B, 1, L, S] boolean: which of a buffer's S slots (row b's slot s holds position
    starts[b] + s) each of row b's L new tokens (from position positions[b]) may attend to:
    causal, and within `window` positions when given."""
    query = positions[:, None] + mx.arange(num_new)[None]  # [B, L]
    key = starts[:, None] + mx.arange(num_slots)[None]  # [B, S]
    distance = query[:, :, None] - key[:, None]  # [B, L, S]
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance < window)
    return visible[:, None]


def reserve_write(cache, num_new: int) -> Tuple[int, int]:
    """Make room for `num_new` entries in a cache that already holds some, without writing
    them (a compiled forward writes them): (the buffer slot the first goes to, the absolute
    position of slot 0). Full-attention buffers grow as mlx-lm's `KVCache` grows them."""
    if isinstance(cache, SlidingKVCache):
        return cache.reserve(num_new), cache.start
    used = cache.offset
    if used + num_new > cache.keys.shape[2]:
        blocks = (cache.step + num_new - 1) // cache.step
        cache.keys, cache.values = (
            mx.concatenate([buffer[..., :used, :], mx.zeros((*buffer.shape[:2], blocks * cache.step,
                                                              buffer.shape[3]), buffer.dtype)], axis=2)
            for buffer in (cache.keys, cache.values)
        )
    return used, 0


def commit_write(cache, keys: mx.array, values: mx.array, num_new: int) -> None:
    """Adopt the buffers a compiled forward wrote `num_new` entries into at the slot
    `reserve_write` gave."""
    cache.keys, cache.values = keys, values
    cache.offset += num_new
    if isinstance(cache, SlidingKVCache):
        cache.used += num_new


def rollback_needed(num_draft_tokens: int) -> int:
    """Positions to reserve: a verify pass of k + 1 tokens, plus tokens emitted past a stop."""
    return 2 * (num_draft_tokens + 1)


def num_kv_layers(args) -> int:
    """Layers of a `gemma4_text` model that compute K/V (the last `num_kv_shared_layers`
    reuse earlier layers'): one cache each."""
    return args.num_hidden_layers - args.num_kv_shared_layers


def make_target_cache(args, max_draft: int, kv_bits: Optional[int] = None, kv_group_size: int = 64,
                      quantized_kv_start: int = 0) -> List:
    """One cache per K/V-computing layer of a mlx-lm `gemma4_text` model.

    `args` is the text model's `ModelArgs`; `max_draft` bounds how many tokens a caller
    may roll back after one write (a verify pass of `max_draft + 1` tokens, plus the
    tokens emitted past a stop). With `kv_bits` the full-attention layers (whose caches
    grow with the context) hold their K/V quantized after the first `quantized_kv_start`
    positions (quantized_cache.py); the sliding layers' window stays in float.
    """
    check_kv_options(kv_bits, kv_group_size, quantized_kv_start, full_attention_head_dims(args))
    rollback = rollback_needed(max_draft)
    return [
        SlidingKVCache(args.sliding_window, rollback)
        if args.layer_types[i] == "sliding_attention"
        else KVCache() if kv_bits is None else QuantizedFullKVCache(kv_bits, kv_group_size, quantized_kv_start)
        for i in range(num_kv_layers(args))
    ]


def full_attention_head_dims(args) -> set:
    """The head dimension of the full-attention layers (the global one where set)."""
    dim = getattr(args, "global_head_dim", None) or args.head_dim
    return {dim} if "full_attention" in args.layer_types else set()


def rollback_cache(cache: List, offset: int) -> None:
    """Drop every cached position at or after `offset`."""
    for c in cache:
        if c.offset > offset:
            c.trim(c.offset - offset)
