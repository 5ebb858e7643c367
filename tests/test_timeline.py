"""`bench --profile`: the per-round timeline of the real round, its fields and sums, and
the CLI path."""

import json

import mlx.core as mx

from gemma_mtp_mlx.bench import benchmark as bench, timeline

PROMPTS = [[5, 17, 42], [9, 8, 7, 6]]


def test_rounds_split_into_phases_that_add_up(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    real_async_eval = mx.async_eval
    profiles = [timeline.profile_rounds(target, tokenizer, drafter, PROMPTS, k=k, max_tokens=10) for k in (0, 2)]
    assert mx.async_eval is real_async_eval  # the timer is removed again
    plain, speculative = profiles
    for p in profiles:
        m = p["median_ms"]
        assert set(m) == {"round", "draft", "verify", "accept", "queue", "wait_and_bookkeeping", "tokens"}
        assert m["round"] > 0 and m["verify"] > 0 and m["queue"] > 0 and m["accept"] > 0
        assert 0 < p["host_build_share"] < 1 and p["tokens_per_s"] > 0
    assert plain["median_ms"]["draft"] == 0 and plain["tokens_per_round"] == 1
    assert speculative["median_ms"]["draft"] > 0 and 1 <= speculative["tokens_per_round"] <= 3
    # each prompt gives rounds until 10 tokens were produced; the first round is not timed
    assert plain["rounds"] == len(PROMPTS) * 9


def test_profile_option_writes_the_timeline(pairs, tmp_path, capsys):
    target, assistant = pairs["e2b"]
    parser = bench.argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", str(target), "--draft-model", str(assistant), "--profile", "--ks", "2",
                              "--temps", "0", "--max-tokens", "6", "--out", str(tmp_path)])
    bench.run(args)
    result = json.loads((tmp_path / "profile.json").read_text())
    assert [p["k"] for p in result["profiles"]] == [0, 2] and result["machine"]["mlx"]
    table = capsys.readouterr().out
    assert "| k | rounds |" in table and "host build share" in table


def test_profile_with_the_default_draft_lengths_profiles_each_and_auto(pairs, tmp_path):
    """`bench --profile` without --ks: plain decoding, every default k and auto."""
    target, assistant = pairs["e2b"]
    parser = bench.argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", str(target), "--draft-model", str(assistant), "--profile",
                              "--temps", "0", "--max-tokens", "6", "--out", str(tmp_path)])
    bench.run(args)
    profiles = json.loads((tmp_path / "profile.json").read_text())["profiles"]
    assert [p["k"] for p in profiles] == [0, *bench.DEFAULT_KS]
    auto = profiles[-1]
    assert auto["k"] == "auto" and auto["rounds"] > 0 and auto["tokens_per_round"] >= 1
