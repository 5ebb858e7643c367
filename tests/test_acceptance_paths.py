"""Exactness does not depend on the drafter: all-accepted and mostly-rejected rounds."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import PAIRS, OracleDrafter
from gemma_mtp_mlx import stream_generate

MAX_TOKENS = 70


class RandomDrafter:
    default_num_draft_tokens = 4

    def __init__(self, vocab_size, seed=0):
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size

    def draft(self, embed, token, hidden, position, shared_kv, num_tokens, sample=None, keys=None):
        return mx.array(self.rng.integers(0, self.vocab_size, size=num_tokens)), None


def generate_tokens(target, tokenizer, prompt, **kwargs):
    responses = list(stream_generate(target, tokenizer, prompt, max_tokens=MAX_TOKENS, **kwargs))
    return [r.token for r in responses], responses[-1].stats


def prompt_without_early_eos(target, tokenizer):
    """A prompt whose greedy continuation runs MAX_TOKENS tokens, and that continuation."""
    for start in range(10, 200, 10):
        prompt = list(range(start, start + 20))
        out, _ = generate_tokens(target, tokenizer, prompt)
        if len(out) == MAX_TOKENS:
            return prompt, out
    raise AssertionError("every candidate prompt reached EOS early")


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("k", [1, 3, 8])
def test_oracle_drafter_gets_full_acceptance_and_matches(pair, k, mlx_pairs):
    target, tokenizer, _ = mlx_pairs[pair]
    prompt, plain = prompt_without_early_eos(target, tokenizer)
    extended, _ = generate_tokens(target, tokenizer, prompt + plain)  # drafts past the end
    oracle = OracleDrafter(prompt + plain + extended)
    out, stats = generate_tokens(target, tokenizer, prompt, draft_model=oracle, num_draft_tokens=k)
    assert out == plain
    assert stats.accepted_tokens == stats.drafted_tokens
    assert stats.acceptance_by_position == [1.0] * k
    assert stats.rounds == -(-(MAX_TOKENS - 1) // (k + 1))  # the last round may be cut short
    assert stats.rejection_rate == 0.0 and stats.fallback_rate == 0.0


@pytest.mark.parametrize("pair", list(PAIRS))
def test_random_drafter_gets_low_acceptance_and_matches(pair, mlx_pairs):
    target, tokenizer, _ = mlx_pairs[pair]
    prompt, plain = prompt_without_early_eos(target, tokenizer)
    random = RandomDrafter(target.vocab_size)
    out, stats = generate_tokens(target, tokenizer, prompt, draft_model=random, num_draft_tokens=4)
    assert out == plain
    assert stats.mean_accepted_length < 1.2
    assert stats.fallback_rate > 0.8
