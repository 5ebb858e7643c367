"""The MLX target matches transformers' float32 logits, below and past the sliding window."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import TARGETS, WINDOW, prompt_of
from hf_reference import hf_logits
from gemma_mtp_mlx.speculative import prefill



def assert_close_logits(ours: np.ndarray, reference: np.ndarray):
    logit_range = reference.max() - reference.min()
    assert np.abs(ours - reference).max() <= 1e-3 * logit_range


@pytest.mark.parametrize("name", TARGETS)
@pytest.mark.parametrize("length", [WINDOW // 2, 3 * WINDOW + 5])
def test_prompt_logits_match_transformers(name, length, mlx_targets, hf_targets):
    target = mlx_targets[name]
    ids = prompt_of(length)
    logits, _ = target(mx.array([ids]), target.make_cache(4))
    assert_close_logits(np.array(logits[0]), hf_logits(hf_targets[name], ids))


@pytest.mark.parametrize("name", TARGETS)
def test_incremental_verify_logits_match_transformers_past_window(name, mlx_targets, hf_targets):
    """Chunked prefill, then verify passes of 1..5 tokens with rollbacks, as speculation does."""
    target = mlx_targets[name]
    ids = prompt_of(4 * WINDOW, seed=1)
    reference = hf_logits(hf_targets[name], ids)
    cache = target.make_cache(4)
    prefill(target, mx.array(ids[:20]), cache, step_size=7)
    position = 20
    rng = np.random.default_rng(2)
    while position < len(ids) - 5:
        width = int(rng.integers(1, 6))
        logits, _ = target(mx.array([ids[position : position + width]]), cache)
        assert_close_logits(np.array(logits[0]), reference[position : position + width])
        keep = int(rng.integers(1, width + 1))  # accept a prefix, roll back the rest
        for c in cache:
            c.trim(width - keep)
        position += keep
