"""Planted acceptance (`gemma-mtp bench --planted-acceptance`): the output stays plain greedy
decoding's, each judged draft is accepted at the planted rate, the benchmark reports the rows,
and a temperature above 0 is refused."""

import argparse
import math

import mlx.core as mx
import pytest

from gemma_mtp_mlx import stream_generate
from gemma_mtp_mlx.bench import benchmark as bench
from gemma_mtp_mlx.bench.planted import PlantedDrafter, greedy_continuation

from conftest import prompt_of

K = 3
MAX_TOKENS = 40


def planted_run(pair, acceptance, seed=0):
    """(the planted drafter, the tokens it generated, the round log) for one prompt."""
    target, tokenizer, drafter = pair
    prompt = prompt_of(12, seed)
    sequence = prompt + greedy_continuation(target, tokenizer, prompt, MAX_TOKENS)
    planted = PlantedDrafter(drafter, sequence, acceptance, target.vocab_size, seed)
    responses = list(stream_generate(target, tokenizer, prompt, draft_model=planted, num_draft_tokens=K,
                                     max_tokens=MAX_TOKENS, record_rounds=True))
    return planted, [r.token for r in responses], responses[-1].stats.rounds_log[1:]


def judged(planted, rounds):
    """(drafts judged inside the reference, of which accepted): a round judges its drafts up
    to and including the first rejected one."""
    seen = kept = 0
    for r in rounds:
        for j, token in enumerate(r["drafted"][: r["accepted"] + 1]):
            position = r["position"] + 1 + j
            if position < len(planted.sequence):
                assert token == planted.tokens[position].item()  # planted at the round's own position
                seen, kept = seen + 1, kept + (j < r["accepted"])
    return seen, kept


@pytest.mark.parametrize("name", ["e2b", "dense"])
@pytest.mark.parametrize("acceptance", [0.0, 0.5, 1.0])
def test_planted_output_equals_plain_greedy_output_and_acceptance_follows_the_rate(mlx_pairs, name, acceptance):
    planted, tokens, rounds = planted_run(mlx_pairs[name], acceptance)
    prompt_length = len(planted.sequence) - MAX_TOKENS
    assert tokens == planted.sequence[prompt_length:]
    seen, kept = judged(planted, rounds)
    assert seen >= MAX_TOKENS / (K + 1) - 1
    if acceptance == 1.0:  # every draft accepted, except drafts past the reference
        assert kept == seen
        assert all(r["accepted"] == K for r in rounds if r["position"] + K < len(planted.sequence))
    elif acceptance == 0.0:
        assert kept == 0
    else:  # binomial: within 4 standard deviations
        assert abs(kept / seen - acceptance) <= 4 * math.sqrt(acceptance * (1 - acceptance) / seen)


class FixedDrafter:
    """Drafts 7, 7, ... and counts its calls."""

    default_num_draft_tokens = 2

    def __init__(self):
        self.calls = 0

    def draft(self, embed, token, hidden, position, shared_kv, num_tokens, sample=None, keys=None):
        self.calls += 1
        return mx.full((num_tokens,), 7, dtype=mx.uint32), None


def test_planted_drafter_calls_the_drafter_and_plants_by_the_device_position():
    inner = FixedDrafter()
    sequence = [1, 2, 3, 4, 5, 6]
    planted = PlantedDrafter(inner, sequence, 1.0, vocab_size=16)
    # A round queued ahead knows its position only on the device: an MLX array.
    drafts, logq = planted.draft(None, mx.array([4]), None, mx.array(3, dtype=mx.int32), {}, 4)
    assert inner.calls == 1 and logq is None and drafts.dtype == mx.uint32
    assert drafts.tolist() == [5, 6, 7, 7]  # positions 4, 5 planted; 6, 7 past the reference keep the drafter's
    wrong = PlantedDrafter(inner, sequence, 0.0, vocab_size=16).draft(None, None, None, 0, {}, 5)[0]
    assert all(d != s for d, s in zip(wrong.tolist(), sequence[1:]))
    with pytest.raises(ValueError, match="between 0 and 1"):
        PlantedDrafter(inner, sequence, 1.5, vocab_size=16)


@pytest.fixture(scope="module")
def result(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    return bench.run_benchmark(target, tokenizer, drafter, ["hello world", [5, 6, 7]], ks=(2, "auto"),
                               temps=(0.0,), max_tokens=8, repeats=1, timing_iters=3,
                               planted_acceptance=(0.0, 1.0))


def test_bench_reports_every_planted_field(result):
    rows = {r["name"]: r for r in result["configs"]}
    assert {"k=2 t=0 A=0", "k=2 t=0 A=1"} <= set(rows)  # fixed k only: no planted auto row
    assert not any(name.startswith("auto") and "A=" in name for name in rows)
    costs = result["costs"]
    for a in (0.0, 1.0):
        r = rows[f"k=2 t=0 A={a:g}"]
        assert r["kind"] == "planted" and r["planted_acceptance"] == a and r["k"] == 2
        assert r["ratio"] == pytest.approx(r["tokens_per_s"] / rows["plain t=0"]["tokens_per_s"])
        assert r["efficiency"] == pytest.approx(r["ratio"] / r["mean_accepted_length"])
        assert r["predicted_speedup"] == pytest.approx(
            r["mean_accepted_length"] / (costs["v"]["2"] + 2 * costs["c"]))
    assert rows["k=2 t=0 A=0"]["mean_accepted_length"] == 1.0
    assert rows["k=2 t=0 A=1"]["mean_accepted_length"] > 2.0
    assert result["settings"]["planted_acceptance"] == [0.0, 1.0]
    planted = result["exactness"]["planted"]
    assert planted["ok"] and planted["identical"] == planted["runs"] == 4 and result["exactness"]["ok"]
    table = bench.markdown_table(result)
    assert "| efficiency |" in table and "| k=2 t=0 A=1 |" in table
    assert "with planted drafts on 4/4 runs" in bench.markdown_report(result)


def parse(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_planted_acceptance_with_a_temperature_above_0_is_a_clear_error(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    with pytest.raises(ValueError, match="needs greedy decoding .* distribution q"):
        bench.run_benchmark(target, tokenizer, drafter, ["hi"], ks=(2,), temps=(0.0, 0.7), planted_acceptance=(0.5,))
    with pytest.raises(ValueError, match="needs greedy decoding"):  # before any model is loaded
        bench.run(parse("--model", "no-such-model", "--planted-acceptance", "0.5", "--temps", "0.7"))
    with pytest.raises(ValueError, match="from 0 to 1"):
        bench.run_benchmark(target, tokenizer, drafter, ["hi"], ks=(2,), temps=(0.0,), planted_acceptance=(1.2,))
    with pytest.raises(ValueError, match="fixed draft lengths"):
        bench.run_benchmark(target, tokenizer, drafter, ["hi"], ks=("auto",), temps=(0.0,), planted_acceptance=(0.5,))
