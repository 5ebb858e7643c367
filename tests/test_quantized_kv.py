"""A quantized K/V cache (`kv_bits`) under exact speculation.

"Exact" with a quantized cache means: speculative output identical to plain decoding with
the same quantized cache. Each position's K/V is quantized on its own, so a verify of k + 1
tokens stores what k + 1 decode steps store, and rollback drops exactly the rejected
positions (across quantization groups and across the float/quantized start). Tested past
3x the window on fixture pairs with KV-shared layers (E2B-like), K = V (31B-like) and the
12B-like layout, k = 1, 3, 6, auto, 4 and 8 bits, with and without a float start.
"""

import mlx.core as mx
import numpy as np
import pytest

from conftest import WINDOW, eos_tokens
from gemma_mtp_mlx import make_prompt_cache, stream_generate
from gemma_mtp_mlx.quantized_cache import QuantizedFullKVCache

PROMPT = list(range(30, 50))
N = 3 * WINDOW + 4


def tokens(pair, prompt=PROMPT, **options):
    return [r.token for r in stream_generate(pair.target, pair.tokenizer, prompt, max_tokens=N, **options)]


@pytest.mark.parametrize("name", ["e2b", "dense", "unified"])
def test_quantized_speculative_equals_quantized_plain_past_3x_window(name, mlx_pairs):
    p = mlx_pairs[name]
    with eos_tokens(p.tokenizer, []):
        floats = tokens(p)
        differs = False
        for bits in (4, 8):
            for start in (0, len(PROMPT) + 5):  # a float start that a round straddles
                kv = dict(kv_bits=bits, kv_group_size=32, quantized_kv_start=start)
                plain = tokens(p, **kv)
                differs |= plain != floats
                for k in (1, 3, 6, "auto"):
                    assert tokens(p, draft_model=p.drafter, num_draft_tokens=k, **kv) == plain, (bits, start, k)
        assert differs  # quantization changes the output, so the comparisons mean something


def test_rollback_across_groups_and_the_float_start_leaves_exactly_the_kept_positions():
    rng = np.random.default_rng(0)
    keys, values = (mx.array(rng.standard_normal((1, 2, 40, 64)).astype(np.float32)) for _ in range(2))
    for start in (0, 7, 19):
        cache = QuantizedFullKVCache(4, 32, start)
        cache.update_and_fetch(keys[:, :, :10], values[:, :, :10])
        cache.update_and_fetch(keys[:, :, 10:25], values[:, :, 10:25])  # a "verify" crossing the start
        cache.trim(9)  # back across the start and a group of positions
        cache.update_and_fetch(keys[:, :, 16:40], values[:, :, 16:40])
        fresh = QuantizedFullKVCache(4, 32, start)
        for i in range(40):  # one position at a time, as plain decoding writes
            fresh.update_and_fetch(keys[:, :, i : i + 1], values[:, :, i : i + 1])
        got, want = cache.fetch(), fresh.fetch()
        assert cache.offset == fresh.offset == 40
        assert all(mx.array_equal(a, b).item() for a, b in zip(got, want)), start
        assert mx.array_equal(got[0][:, :, :start], keys[:, :, :start]).item()  # the start stays in float
        if start < 40:
            assert not mx.array_equal(got[0][:, :, start:], keys[:, :, start:]).item()


def test_a_quantized_prompt_cache_carries_over_calls(mlx_pairs):
    p = mlx_pairs["e2b"]
    with eos_tokens(p.tokenizer, []):
        whole = tokens(p, kv_bits=8, kv_group_size=32)
        cache = make_prompt_cache(p.target, kv_bits=8, kv_group_size=32)
        first = [r.token for r in stream_generate(p.target, p.tokenizer, PROMPT, draft_model=p.drafter, max_tokens=20,
                                                  prompt_cache=cache)]
        assert first == whole[:20]
        assert any(isinstance(c, QuantizedFullKVCache) for c in cache)
        later = [r.token for r in stream_generate(p.target, p.tokenizer, [first[-1]], draft_model=p.drafter,
                                                  max_tokens=N - 20, prompt_cache=cache)]
        assert later == whole[20:]


def test_memory_is_the_quantized_size(mlx_pairs):
    p = mlx_pairs["dense"]
    caches = {bits: make_prompt_cache(p.target, kv_bits=bits, kv_group_size=32) for bits in (None, 8, 4)}
    for bits, cache in caches.items():
        list(stream_generate(p.target, p.tokenizer, PROMPT * 12, max_tokens=1, prompt_cache=cache))
    full = {bits: sum(c.nbytes for c in cache if isinstance(c, QuantizedFullKVCache) or type(c).__name__ == "KVCache")
            for bits, cache in caches.items()}
    head_dim = p.target.args.global_head_dim or p.target.args.head_dim
    for bits in (8, 4):  # packed values plus a float32 scale and bias per group of 32
        expected = (bits / 32 + 2 / 32) / 1  # per float32 element: bits/32 of the packed word, 2 floats per 32
        assert full[bits] / full[None] == pytest.approx(expected, rel=0.15), (bits, head_dim)


@pytest.mark.parametrize("options, message", [
    (dict(kv_bits=3), "kv_bits must be 4 or 8"),
    (dict(kv_bits=4, kv_group_size=48), "kv_group_size must be 32, 64 or 128"),
    (dict(kv_bits=4, kv_group_size=128), "does not divide this model's head dimension"),
    (dict(kv_bits=4, kv_group_size=32, quantized_kv_start=-1), "quantized_kv_start"),
])
def test_bad_kv_options_are_clear_errors(options, message, mlx_pairs):
    p = mlx_pairs["e2b"]
    with pytest.raises(ValueError, match=message):
        list(stream_generate(p.target, p.tokenizer, PROMPT, max_tokens=2, **options))
