"""The sliding-window cache: exact windows under writes and rollbacks, bounded memory."""

import mlx.core as mx
import numpy as np
import pytest

from gemma_mtp_mlx import stream_generate
from gemma_mtp_mlx.cache import SlidingKVCache

WINDOW = 16


def write(cache, start, count):
    """Write positions start..start+count-1, each key holding its own position."""
    keys = mx.arange(start, start + count, dtype=mx.float32).reshape(1, 1, count, 1)
    mask = cache.make_mask(count)
    fetched, _ = cache.update_and_fetch(keys, keys)
    return mask, np.array(fetched).reshape(-1)


def test_each_query_sees_exactly_its_window_through_writes_and_rollbacks():
    cache = SlidingKVCache(WINDOW, rollback=10, step=8)
    rng = np.random.default_rng(0)
    position = 0
    for _ in range(300):
        count = int(rng.choice([1, 3, 9, 40]))
        mask, keys = write(cache, position, count)
        for i, row in enumerate(np.array(mask)):
            query = position + i
            assert sorted(keys[row].tolist()) == list(range(max(0, query - WINDOW + 1), query + 1))
        drop = int(rng.integers(0, min(count, 10) + 1)) if count < 40 else 0
        cache.trim(drop)
        position += count - drop
        assert cache.offset == position
        recent, _ = cache.last(WINDOW + 1)
        assert np.array(recent).reshape(-1).tolist() == list(range(max(0, position - WINDOW - 1), position))


def test_rolling_back_more_than_reserved_is_refused():
    def cache_after_compaction():
        cache = SlidingKVCache(WINDOW, rollback=4, step=8)
        write(cache, 0, 100)
        write(cache, 100, 25)  # no room: keeps the last window + 1 + 4, then writes 25
        return cache

    assert cache_after_compaction().trim(25 + 4) == 29
    with pytest.raises(RuntimeError, match="reserved"):
        cache_after_compaction().trim(25 + 5)


def test_sliding_cache_memory_stays_bounded_after_10x_window(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    k = 4
    cache = target.make_cache(k)
    prompt = np.random.default_rng(3).integers(3, 256, size=5 * WINDOW).tolist()
    list(stream_generate(target, tokenizer, prompt, draft_model=drafter, num_draft_tokens=k,
                         max_tokens=5 * WINDOW, prompt_cache=cache))
    sliding = [c for c in cache if isinstance(c, SlidingKVCache)]
    assert sliding and all(c.offset >= 10 * WINDOW - 1 for c in sliding)
    for c in sliding:
        slots = c.keys.shape[2]
        assert slots <= WINDOW + 1 + 2 * (k + 1) + c.step  # window + draft slack
        assert c.nbytes == c.keys.nbytes * 2
