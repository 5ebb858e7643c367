"""The per-round log: consistent with the output, the per-token flags and merged statistics, and the
drafts are transformers' drafts."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import PAIRS, WINDOW, OracleDrafter, eos_tokens, full_length_state, prompt_of
from hf_reference import hf_draft_step
from gemma_mtp_mlx import SpeculativeStats, stream_generate
from gemma_mtp_mlx.speculative import Round


def run(pair, prompt, k, max_tokens=60, **kwargs):
    target, tokenizer, drafter = pair
    responses = list(stream_generate(target, tokenizer, prompt, draft_model=drafter, num_draft_tokens=k,
                                     max_tokens=max_tokens, **kwargs))
    return [r.token for r in responses], responses[-1].stats


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_round_log_is_consistent_with_output_and_rates(name, k, mlx_pairs):
    prompt = prompt_of(12, seed=k)
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
    prompt = prompt_of(WINDOW // 2, seed=11)
    tokens, stats = run(mlx_pairs[name], prompt, 3, max_tokens=4 * WINDOW, record_rounds=True)
    sequence = prompt + tokens
    rounds = [r for r in stats.rounds_log if not r["prefill"]]
    checked = rounds[:4] + [r for r in rounds if r["position"] > 3 * WINDOW][:4]
    assert any(r["position"] < WINDOW for r in checked) and any(r["position"] > 3 * WINDOW for r in checked)
    for r in checked:
        assert r["drafted"] == transformers_drafts(target, hf_assistants[name], sequence, r["position"], 3)


@pytest.mark.parametrize("drafter, options", [("fixture", dict()), ("fixture", dict(temp=1.0, seed=3)), ("oracle", dict())],
                         ids=["fixture-greedy", "fixture-sampled", "oracle-greedy"])
def test_from_draft_flags_match_the_round_log(drafter, options, mlx_pairs):
    """The oracle's rounds keep all k drafts, and max_tokens cuts the last one inside them."""
    target, tokenizer, fixture_drafter = mlx_pairs["e2b"]
    prompt = prompt_of(12, seed=5)
    with eos_tokens(tokenizer, []):
        plain = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=50)]  # past the last draft
        draft = fixture_drafter if drafter == "fixture" else OracleDrafter(prompt + plain)
        responses = list(stream_generate(target, tokenizer, prompt, draft_model=draft, num_draft_tokens=3,
                                         max_tokens=39, record_rounds=True, **options))
    log = responses[-1].stats.rounds_log
    assert [r.from_draft for r in responses] == [i < r["accepted"] for r in log for i in range(len(r["emitted"]))]
    if drafter == "oracle":
        assert sum(r.from_draft for r in responses) == 38 - 38 // 4  # 1 + 9 rounds of 4 + a cut round of 2


def test_merged_stats_count_every_round_of_both_runs(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["dense"]
    runs = [list(stream_generate(target, tokenizer, prompt_of(10, seed=s), draft_model=drafter, num_draft_tokens=3,
                                 max_tokens=30, temp=1.0, seed=s, record_rounds=True))[-1].stats for s in (1, 2)]
    merged = runs[0].merge(runs[1])
    log = runs[0].rounds_log + runs[1].rounds_log
    assert merged.rounds_log == log
    rounds = [r for r in log if not r["prefill"]]
    assert merged.rounds == len(rounds) and merged.generation_tokens == 60
    assert merged.mean_accepted_length == pytest.approx(sum(r["accepted"] for r in rounds) / len(rounds) + 1)
    assert merged.fallback_rate == pytest.approx(sum(r["accepted"] == 0 for r in rounds) / len(rounds))
    assert merged.acceptance_by_position == pytest.approx(
        [sum(r["accepted"] > i for r in rounds) / sum(len(r["drafted"]) > i for r in rounds) for i in range(3)])
    seconds = sum(s.generation_tokens / s.generation_tps for s in runs)
    assert merged.generation_tps == pytest.approx(60 / seconds)
    assert merged.peak_memory == max(s.peak_memory for s in runs)
    wider = SpeculativeStats.empty(5)  # runs of different k: per-position counts line up from the first
    wider.record(Round(0, [1, 2, 3, 4, 5], 4, [1, 2, 3, 4, 6], [0.0] * 5))
    mixed = merged.merge(wider)
    assert mixed.num_draft_tokens == 5 and mixed.rounds == merged.rounds + 1
    assert mixed.drafted_by_position == [n + 1 for n in merged.drafted_by_position] + [1, 1]
    assert mixed.accepted_by_position == [n + 1 for n in merged.accepted_by_position] + [1, 0]
