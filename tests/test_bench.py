"""The benchmark: every field for every configuration, consistent ratios, the reports, --auto."""

import argparse
import json

import pytest

from gemma_mtp_mlx.bench import benchmark as bench

FIELDS = ("name", "kind", "k", "temp", "tokens_per_s", "tokens_per_s_by_repeat", "ratio",
          "mean_accepted_length", "acceptance_by_position", "rejection_rate", "fallback_rate",
          "peak_memory_gb", "predicted_speedup", "measured_over_predicted", "efficiency", "planted_acceptance")
SMALL = dict(ks=(1, 2), temps=(0.0,), max_tokens=8, repeats=1, timing_iters=3)


@pytest.fixture(scope="module")
def result(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    return bench.run_benchmark(target, tokenizer, drafter, ["hello world"], **SMALL)


def parse(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_every_configuration_reports_every_field(result):
    configs = {r["name"]: r for r in result["configs"]}
    assert set(configs) == {"plain t=0", "mlx-lm t=0", "k=1 t=0", "k=2 t=0"}
    for r in configs.values():
        assert set(FIELDS) <= set(r), r["name"]
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0
    for k in (1, 2):
        r = configs[f"k={k} t=0"]
        assert len(r["acceptance_by_position"]) == k
        assert 1 <= r["mean_accepted_length"] <= k + 1
        assert 0 <= r["rejection_rate"] <= 1 and 0 <= r["fallback_rate"] <= 1
        assert r["predicted_speedup"] == pytest.approx(
            r["mean_accepted_length"] / (result["costs"]["v"][str(k)] + k * result["costs"]["c"]))
        assert r["measured_over_predicted"] == pytest.approx(r["ratio"] / r["predicted_speedup"])
        assert r["efficiency"] == pytest.approx(r["ratio"] / r["mean_accepted_length"])
    assert configs["mlx-lm t=0"]["mean_accepted_length"] is None


def test_ratios_are_tokens_per_s_over_plain_decoding(result):
    plain = next(r for r in result["configs"] if r["kind"] == "plain")
    assert plain["ratio"] == 1
    for r in result["configs"]:
        assert r["ratio"] == pytest.approx(r["tokens_per_s"] / plain["tokens_per_s"])


def test_step_costs_machine_and_command_are_recorded(result):
    costs = result["costs"]
    assert costs["decode_ms"] > 0 and costs["c"] > 0
    assert set(costs["v"]) == {"1", "2"} and all(v > 0 for v in costs["v"].values())
    for key in ("platform", "processor", "mlx", "device", "blas"):
        assert result["machine"][key]
    assert result["command"]


def test_exactness_self_check_is_reported(result):
    check = result["exactness"]
    assert check["ok"] and check["identical"] == check["prompts"] == 1 and check["k"] == 2
    assert 0 <= check["max_logit_gap"] < 1e-3


def test_reports_hold_everything_and_one_table_row_per_configuration(result, tmp_path):
    json_path, md_path = bench.write_reports(result, tmp_path / "out")
    assert json.loads(json_path.read_text()) == result
    markdown = md_path.read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert [row.split(" | ")[0][2:] for row in rows] == [r["name"] for r in result["configs"]]
    for label in ("machine:", "BLAS:", "model:", "command:", "exactness:"):
        assert label in markdown


def test_auto_picks_a_k_from_the_list(pairs, tmp_path, capsys):
    target, drafter = pairs["e2b"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nthe quick brown fox\n")
    bench.run(parse("--model", target, "--draft-model", drafter, "--prompts", prompts, "--ks", "1,2",
                    "--temps", "0", "--max-tokens", 8, "--repeats", 1, "--out", tmp_path / "out", "--auto"))
    best_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert best_line.startswith("best k at temp 0: ")
    assert int(best_line.split(": ")[1].split()[0]) in (1, 2)
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["settings"]["prompts"] == 2
    assert saved["best"]["k"] in (1, 2)


def test_tune_returns_the_fastest_k(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    options = {name: value for name, value in SMALL.items() if name != "temps"}
    k, result = bench.tune(target, tokenizer, drafter, [[5, 6, 7]], temp=0.0, **options)
    speculative = [r for r in result["configs"] if r["kind"] == "speculative"]
    assert k == max(speculative, key=lambda r: r["tokens_per_s"])["k"]


def test_options_parse_with_their_defaults_and_bad_input_is_a_clear_error(mlx_pairs):
    args = parse("--model", "m")
    assert (args.ks, args.temps, args.max_tokens, args.repeats, args.out) == (
        bench.DEFAULT_KS, bench.DEFAULT_TEMPS, 128, 3, bench.DEFAULT_OUT)
    target, tokenizer, drafter = mlx_pairs["e2b"]
    with pytest.raises(ValueError, match="needs a drafter"):
        bench.run_benchmark(target, tokenizer, None, ["hi"])
    with pytest.raises(ValueError, match="draft lengths"):
        bench.run_benchmark(target, tokenizer, drafter, ["hi"], ks=(0, 2))


def test_batch_benchmark_reports_every_batch_size_and_configuration(mlx_pairs):
    from gemma_mtp_mlx.bench.batch import batch_markdown_table, run_batch_benchmark

    target, tokenizer, drafter = mlx_pairs["e2b"]
    prompts = [tokenizer.encode(p) for p in ("hello world", "def f(x):", "import os")]
    result = run_batch_benchmark(target, tokenizer, drafter, prompts, batch_sizes=[1, 3], ks=[2, "auto"],
                                 max_tokens=5, repeats=1)
    configs = ["mlx-lm", "plain", "k=2", "k=auto", "one at a time k=2"]
    assert [(r["batch_size"], r["config"]) for r in result["rows"]] == [(B, c) for B in (1, 3) for c in configs]
    for r in result["rows"]:
        assert r["tokens_per_s"] > 0 and (r["config"] != "mlx-lm" or r["ratio"] == 1)
        assert (r["mean_accepted_length"] is not None) == r["config"].startswith("k=")
    assert result["settings"]["prompt_tokens"] == [len(p) for p in prompts]
    assert batch_markdown_table(result).count("\n") == 1 + len(result["rows"])
    with pytest.raises(ValueError, match="batch-sizes"):
        run_batch_benchmark(target, tokenizer, drafter, prompts, batch_sizes=[0], ks=[2])


def test_constrained_rows_report_acceptance_mask_time_and_their_own_ratio(mlx_pairs):
    """`bench --json-schema/--regex/--grammar`: plain and each k under the format, beside
    the unconstrained rows; ratios over constrained plain decoding."""
    target, tokenizer, drafter = mlx_pairs["e2b"]
    fmt = {"type": "regex", "regex": "([a-z]+ )+"}
    result = bench.run_benchmark(target, tokenizer, drafter, ["hello world"], ks=(2,), temps=(0.0,), max_tokens=12,
                                 repeats=1, timing_iters=2, response_format=fmt)
    rows = {r["name"]: r for r in result["configs"]}
    assert {"plain t=0 constrained", "k=2 t=0 constrained"} <= set(rows)
    assert rows["plain t=0 constrained"]["ratio"] == 1.0 and rows["plain t=0"]["ratio"] == 1.0
    constrained = rows["k=2 t=0 constrained"]
    assert constrained["mask_ms_per_token"] > 0 and constrained["mean_accepted_length"] >= 1
    assert rows["k=2 t=0"]["mask_ms_per_token"] is None
    assert result["settings"]["response_format"] == fmt
    assert "mask ms/token" in bench.markdown_table(result)
    with pytest.raises(ValueError, match="response_format.regex"):
        bench.run_benchmark(target, tokenizer, drafter, ["hi"], ks=(2,), response_format={"type": "regex", "regex": "("})
