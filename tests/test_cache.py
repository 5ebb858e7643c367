"""The sliding-window cache: exact windows under writes and rollbacks, bounded memory, and
mlx-lm's save / load of a prompt cache."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from conftest import WINDOW, prompt_of
from gemma_mtp_mlx import make_prompt_cache, stream_generate
from gemma_mtp_mlx.cache import SlidingKVCache


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
    prompt = prompt_of(5 * WINDOW, seed=3)
    list(stream_generate(target, tokenizer, prompt, draft_model=drafter, num_draft_tokens=k,
                         max_tokens=5 * WINDOW, prompt_cache=cache))
    sliding = [c for c in cache if isinstance(c, SlidingKVCache)]
    assert sliding and all(c.offset >= 10 * WINDOW - 1 for c in sliding)
    for c in sliding:
        slots = c.keys.shape[2]
        assert slots <= WINDOW + 1 + 2 * (k + 1) + c.step  # window + draft slack


def test_mlx_lm_saves_and_loads_our_prompt_cache(mlx_pairs, tmp_path):
    """mlx-lm's save_prompt_cache / load_prompt_cache: the loaded cache continues exactly as
    the original, past the window (a compacted sliding buffer) and when still empty."""
    target, tokenizer, drafter = mlx_pairs["e2b"]
    path = str(tmp_path / "cache.safetensors")
    empty = make_prompt_cache(target, num_draft_tokens=3)
    save_prompt_cache(path, empty)
    assert [type(c) for c in load_prompt_cache(path)] == [type(c) for c in empty]

    cache = make_prompt_cache(target, num_draft_tokens=3)
    first = [r.token for r in stream_generate(target, tokenizer, prompt_of(3 * WINDOW, seed=6), draft_model=drafter,
                                              num_draft_tokens=3, max_tokens=40, prompt_cache=cache)]
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert [(type(c), c.offset) for c in loaded] == [(type(c), c.offset) for c in cache]
    assert any(isinstance(c, SlidingKVCache) and c.start > 0 for c in loaded)

    def go_on(prompt_cache):
        return [(r.token, r.logprob) for r in stream_generate(target, tokenizer, [first[-1], 7, 8], draft_model=drafter,
                                                              num_draft_tokens=3, max_tokens=20, temp=1.0, seed=0,
                                                              prompt_cache=prompt_cache)]

    resumed, original = go_on(loaded), go_on(cache)
    assert [t for t, _ in resumed] == [t for t, _ in original]
    np.testing.assert_allclose([lp for _, lp in resumed], [lp for _, lp in original], atol=1e-5)
