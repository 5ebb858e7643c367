"""The per-round log: consistent with the output, and the drafts are transformers' drafts."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import PAIRS, full_length_state
from hf_reference import hf_draft_step
from gemma_mtp_mlx import stream_generate

WINDOW = 16


def run(pair, prompt, k, max_tokens=60, **kwargs):
    target, tokenizer, drafter = pair
    responses = list(stream_generate(target, tokenizer, prompt, draft_model=drafter, num_draft_tokens=k,
                                     max_tokens=max_tokens, **kwargs))
    return [r.token for r in responses], responses[-1].stats


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_round_log_is_consistent_with_output_and_rates(name, k, mlx_pairs):
    prompt = np.random.default_rng(k).integers(3, 256, size=12).tolist()
    for sampling in (dict(), dict(temp=1.0, seed=k)):
        tokens, stats = run(mlx_pairs[name], prompt, k, record_rounds=True, **sampling)
        log = stats.rounds_log
        assert [t for r in log for t in r["emitted"]] == tokens
        assert log[0]["prefill"] and log[0]["position"] == len(prompt) - 1
        for previous, r in zip(log, log[1:]):
            assert r["position"] == previous["position"] + len(previous["emitted"])
        rounds = [r for r in log if not r["prefill"]]
        for r in rounds:
            assert r["accepted"] <= len(r["drafted"]) <= k
            assert r["emitted"][: r["accepted"]] == r["drafted"][: r["accepted"]]
        drafted = sum(len(r["drafted"]) for r in rounds)
        accepted = sum(r["accepted"] for r in rounds)
        assert stats.rounds == len(rounds)
        assert stats.rejection_rate == pytest.approx((drafted - accepted) / drafted)
        assert stats.fallback_rate == pytest.approx(sum(r["accepted"] == 0 for r in rounds) / len(rounds))
        assert stats.mean_accepted_length == pytest.approx(accepted / len(rounds) + 1)

        unrecorded, plain_stats = run(mlx_pairs[name], prompt, k, **sampling)
        assert unrecorded == tokens and plain_stats.rounds_log is None
        assert "rounds_log" not in plain_stats.to_dict()


def transformers_drafts(target, assistant, sequence, position, k):
    kv, hidden = full_length_state(target, sequence[:position])
    token, drafts = sequence[position], []
    for _ in range(k):
        embedding = np.array(target.embed(mx.array([token]))).reshape(-1)
        logits, hidden = hf_draft_step(assistant, embedding, hidden, position, kv)
        token = int(logits.argmax())
        drafts.append(token)
    return drafts


@pytest.mark.parametrize("name", list(PAIRS))
def test_logged_drafts_equal_transformers_assistant_drafts(name, mlx_pairs, hf_assistants):
    """Rounds below and past the sliding window, for both drafter heads."""
    target = mlx_pairs[name].target
    prompt = np.random.default_rng(11).integers(3, 256, size=WINDOW // 2).tolist()
    tokens, stats = run(mlx_pairs[name], prompt, 3, max_tokens=4 * WINDOW, record_rounds=True)
    sequence = prompt + tokens
    rounds = [r for r in stats.rounds_log if not r["prefill"]]
    checked = rounds[:4] + [r for r in rounds if r["position"] > 3 * WINDOW][:4]
    assert any(r["position"] < WINDOW for r in checked) and any(r["position"] > 3 * WINDOW for r in checked)
    for r in checked:
        assert r["drafted"] == transformers_drafts(target, hf_assistants[name], sequence, r["position"], 3)
