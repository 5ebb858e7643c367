"""K/V caches for a batch of sequences that each sit at their own length.

Row b holds its positions `[starts[b], lengths[b])` compactly in buffer slots
`[0, lengths[b] - starts[b])`: every row ends where its own verified positions end, so a
rejected draft tail is dropped by lowering that row's length alone (its slots are
overwritten by the next write and masked until then). Nothing is trimmed to the longest
row and no zeroed key is ever attended to: the masks `make_mask` hands mlx-lm's layers
(and `drafter_view` hands the drafter) select, per row, exactly the positions single-stream
decoding would see. `offset` is the per-row position array mlx-lm's attention uses for RoPE.

Full-attention layers keep every position. Sliding-window layers keep, when a write does
not fit, only each row's last `window + 1 + RESERVE` positions (the target's queries need
`window - 1` earlier keys, the drafter reads `window + 1`; the reserve lets a finished row's
cache be rolled back for a prompt that shares most of it, as the single-stream cache can),
so their memory stays O(window + draft) per row at any length.
"""

from typing import List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..cache import SlidingKVCache, num_kv_layers, rollback_needed, visible_slots
from ..validate import MAX_NUM_DRAFT_TOKENS


RESERVE = rollback_needed(MAX_NUM_DRAFT_TOKENS)


class RaggedKVCache:
    """K/V of one attention layer for B rows of different lengths: [B, kv_heads, slots, D]."""

    def __init__(self, window: Optional[int] = None, rows: int = 1, step: int = 64):
        self.window = window  # None: full attention
        self.keep = None if window is None else window + 1 + RESERVE
        self.step = step
        self.keys = None
        self.values = None
        self.lengths: List[int] = [0] * rows  # per row: positions processed
        self.starts: List[int] = [0] * rows  # per row: the position in slot 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def offset(self) -> mx.array:
        """Each row's next position [B] (mlx-lm's attention ropes new keys from here)."""
        return mx.array(self.lengths)

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _used(self, starts: Sequence[int]) -> List[int]:
        return [n - s for n, s in zip(self.lengths, starts)]

    def _compact_starts(self) -> List[int]:
        """Row starts once a sliding layer drops what no query or draft will read."""
        if self.keep is None:
            return self.starts
        return [max(s, n - self.keep) for s, n in zip(self.starts, self.lengths)]

    def _plan(self, num_new: int):
        """Where rows start after making room for `num_new` entries, and the new buffer
        size (None when the write fits as is)."""
        used = self._used(self.starts)
        if self.keys is not None and max(used) + num_new <= self.capacity:
            return self.starts, None
        starts = self._compact_starts()
        kept = max(self._used(starts))
        if self.keep is not None:
            return starts, kept + max(num_new, self.step)
        return starts, -(-(kept + num_new) // self.step) * self.step

    def _gathered(self, starts: Sequence[int], capacity: int):
        """(keys, values) re-laid so row b's slot 0 holds position starts[b]: [B, H, capacity, D]."""
        shift = mx.array([new - old for new, old in zip(starts, self.starts)])
        source = mx.minimum(shift[:, None] + mx.arange(capacity)[None], self.capacity - 1)

        def gather(a):
            index = mx.broadcast_to(source[:, None, :, None], (*a.shape[:2], capacity, a.shape[3]))
            return mx.take_along_axis(a, index, axis=2)

        return gather(self.keys), gather(self.values)

    def reserve(self, num_new: int, keys: Optional[mx.array] = None, values: Optional[mx.array] = None) -> List[int]:
        """Make room for `num_new` entries per row as a write would, and return the slot
        each row's first goes to. keys, values: entries of the new shape and dtype (needed
        only before the first write)."""
        starts, capacity = self._plan(num_new)
        if capacity is not None:
            if self.keys is None:
                B, H, _, D = keys.shape
                self.keys = mx.zeros((B, H, capacity, D), keys.dtype)
                self.values = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
            else:
                self.keys, self.values = self._gathered(starts, capacity)
            self.starts = list(starts)
        return self._used(self.starts)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Write each row's new entries right after its own last one; return the buffer up
        to the longest row's end. keys, values: [B, kv_heads, N, D]."""
        num_new = keys.shape[2]
        used = self.reserve(num_new, keys, values)
        if len(set(used)) == 1:
            self.keys[..., used[0] : used[0] + num_new, :] = keys
            self.values[..., used[0] : used[0] + num_new, :] = values
        else:
            slots = (mx.array(used)[:, None] + mx.arange(num_new)[None])[:, None, :, None]
            self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(slots, keys.shape), keys, axis=2)
            self.values = mx.put_along_axis(self.values, mx.broadcast_to(slots, values.shape), values, axis=2)
        self.lengths = [n + num_new for n in self.lengths]
        end = max(used) + num_new
        return self.keys[..., :end, :], self.values[..., :end, :]

    def advance(self, keys: mx.array, values: mx.array, num_new: int) -> None:
        """Adopt buffers a compiled forward wrote `num_new` entries per row into, at the
        slots `reserve` gave."""
        self.keys, self.values = keys, values
        self.lengths = [n + num_new for n in self.lengths]

    def make_mask(self, N: int, window_size=None, return_array: bool = False) -> mx.array:
        """[B, 1, N, S] boolean: query n of row b sees exactly the keys single-stream
        decoding gives it (its own positions, causal, within the window)."""
        starts, _ = self._plan(N)
        end = max(self._used(starts)) + N
        return visible_slots(mx.array(self.lengths), mx.array(starts), N, end, self.window)

    def drafter_view(self, span: Optional[int] = None, unsettled: Optional[mx.array] = None):
        """What the drafter reads for a query at each row's next position: (keys, values
        [B, H, S, D], mask [B, 1, 1, S]) over the verified positions, the last `span` of
        them when given. `unsettled` (int32 [B]): each row's newest positions, counted in
        its length, that are dropped (a queued round's rejected drafts, not read yet)."""
        used = self._used(self.starts)
        end = max(used)
        slot = mx.arange(end)[None]
        used = mx.array(used) if unsettled is None else mx.array(used) - unsettled
        mask = slot < used[:, None]
        if span is not None:
            mask = mask & (slot >= used[:, None] - span)
        return self.keys[..., :end, :], self.values[..., :end, :], mask[:, None, None]

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Roll rows back: row b keeps its positions below lengths[b]."""
        for new, old, start in zip(lengths, self.lengths, self.starts):
            if not start <= new <= old:
                raise RuntimeError(f"cannot move a row from length {old} to {new} (it starts at {start})")
        self.lengths = list(lengths)

    def take(self, rows: Sequence[int]) -> None:
        """Keep only `rows`, in that order; the buffer shrinks to the longest kept row."""
        self.lengths = [self.lengths[i] for i in rows]
        self.starts = [self.starts[i] for i in rows]
        if not rows or self.keys is None:
            self.keys = self.values = None
            return
        index = mx.array(list(rows))
        end = max(self._used(self.starts))
        capacity = min(self.capacity, -(-end // self.step) * self.step + self.step)
        self.keys = self.keys[index, :, :capacity]
        self.values = self.values[index, :, :capacity]

    def select(self, rows: Sequence[int]) -> "RaggedKVCache":
        """A new cache holding copies of `rows`."""
        other = RaggedKVCache(self.window, 0, self.step)
        other.keys, other.values = self.keys, self.values
        other.lengths, other.starts = list(self.lengths), list(self.starts)
        other.take(rows)
        return other

    def extend(self, other: "RaggedKVCache") -> None:
        """Append `other`'s rows (each keeping only what this layer needs)."""
        parts = [c for c in (self, other) if c.rows]
        lengths = [n for c in parts for n in c.lengths]
        starts = [s for c in parts for s in c._compact_starts()]
        filled = [c for c in parts if c.keys is not None]
        if filled:
            capacity = -(-max(n - s for n, s in zip(lengths, starts)) // self.step) * self.step + self.step
            like = filled[0]
            gathered = [c._gathered(c._compact_starts(), capacity) if c.keys is not None
                        else like._empty_rows(c.rows, capacity) for c in parts]
            self.keys = mx.concatenate([k for k, _ in gathered])
            self.values = mx.concatenate([v for _, v in gathered])
        self.lengths, self.starts = lengths, starts

    def _empty_rows(self, rows: int, capacity: int):
        """Zero buffers shaped like this cache's, for rows with nothing written yet."""
        B, H, _, D = self.keys.shape
        return (mx.zeros((rows, H, capacity, D), self.keys.dtype),
                mx.zeros((rows, H, capacity, self.values.shape[3]), self.values.dtype))

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_batch_cache(args, rows: int = 1) -> List[RaggedKVCache]:
    """One ragged cache per K/V-computing layer of a mlx-lm `gemma4_text` model."""
    return [
        RaggedKVCache(args.sliding_window if args.layer_types[i] == "sliding_attention" else None, rows)
        for i in range(num_kv_layers(args))
    ]


def ragged_row(cache: List) -> List[RaggedKVCache]:
    """One-row ragged caches holding what a single-stream cache (`make_target_cache`'s:
    mlx-lm's `KVCache` for full attention, `SlidingKVCache` for sliding layers) holds."""
    rows = []
    for c in cache:
        window = getattr(c, "window", None)
        row = RaggedKVCache(window, rows=1)
        if c.keys is not None and c.offset:
            used = c.used if window is not None else c.offset
            row.keys, row.values = c.keys[..., :used, :], c.values[..., :used, :]
            row.lengths, row.starts = [c.offset], [c.offset - used]
        rows.append(row)
    return rows


def single_stream(rows: List[RaggedKVCache]) -> List:
    """The single-stream cache (as `make_target_cache(args, MAX_NUM_DRAFT_TOKENS)` makes)
    holding what one-row ragged caches hold; the inverse of `ragged_row`."""
    cache = []
    for row in rows:
        if row.rows != 1:
            raise ValueError(f"single_stream takes one-row caches, got {row.rows} rows")
        length, start = row.lengths[0], row.starts[0]
        used = length - start
        keys = values = None
        if row.keys is not None and used:
            keys, values = (mx.contiguous(a[..., :used, :]) for a in (row.keys, row.values))
        if row.window is None:
            c = KVCache()
            if keys is not None:
                c.keys, c.values, c.offset = keys, values, length
        else:
            c = SlidingKVCache.from_state((keys, values, row.window, row.keep, row.step, length, start,
                                           used if keys is not None else 0))
        cache.append(c)
    return cache
