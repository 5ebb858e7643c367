"""`auto` in the command line and the benchmark: per-round k in the verbose view and the
statistics, the benchmark's auto column with its predicted speedup, clear errors."""

import json

import pytest

from gemma_mtp_mlx.bench import benchmark as bench
from gemma_mtp_mlx.adaptive import round_cost
from gemma_mtp_mlx.cli import build_parser
from test_cli import cli, pair_args


def test_generate_with_auto_shows_each_rounds_k(pairs, tmp_path):
    stats_file = tmp_path / "stats.json"
    run = cli("generate", *pair_args(pairs), "--prompt", "hello", "--max-tokens", 40, "--num-draft-tokens", "auto",
              "--verbose", "--stats-json", stats_file)
    assert run.returncode == 0, run.stderr
    stats = json.loads(stats_file.read_text())
    assert stats["auto"] and sum(stats["rounds_by_k"]) == stats["rounds"]
    rounds = stats["rounds_log"][1:]
    assert all(len(r["drafted"]) <= r["k"] for r in rounds)
    lines = [line for line in run.stderr.splitlines() if line.startswith("@")][1:]
    assert [int(line.split(" k=")[1].split()[0]) for line in lines] == [r["k"] for r in rounds]
    assert "k=auto (up to 8; rounds by k" in run.stderr


def test_draft_length_option_takes_auto_and_a_bad_value_is_a_clear_error(capsys):
    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "x", "--num-draft-tokens", "auto"]).num_draft_tokens == "auto"
    assert parser.parse_args(["generate", "--prompt", "x", "--num-draft-tokens", "3"]).num_draft_tokens == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "x", "--num-draft-tokens", "fast"])
    assert "expected a whole number or auto, got 'fast'" in capsys.readouterr().err


def test_bench_auto_column_predicts_from_the_rounds_it_chose(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    result = bench.run_benchmark(target, tokenizer, drafter, ["hello world"], ks=(1, "auto"), temps=(0.0,),
                                 max_tokens=12, repeats=1, timing_iters=3)
    auto = next(r for r in result["configs"] if r["kind"] == "auto")
    assert auto["name"] == "auto t=0" and len(auto["rounds_by_k"]) == 9
    costs = result["costs"]
    assert set(costs["v"]) == {str(k) for k in range(1, 9)}  # every width auto may choose
    rounds = sum(auto["rounds_by_k"])
    cost = sum(n * round_cost(k, costs["c"], costs["v"][str(k)] if k else 1.0) for k, n in enumerate(auto["rounds_by_k"]))
    assert auto["predicted_speedup"] == pytest.approx(auto["mean_accepted_length"] * rounds / cost)
    assert auto["measured_over_predicted"] == pytest.approx(auto["ratio"] / auto["predicted_speedup"])
    assert "auto t=0: rounds by k:" in bench.markdown_report(result)
