"""`bench --shapes` (small configuration): every field of the cost table, consistent
ratios, the reports, and the option's parsing."""

import argparse
import json

import pytest

from gemma_mtp_mlx.bench import benchmark as bench, shapes

KS = (1, 2)
ROW_FIELDS = ("pair", "dtype", "error", "drafter", "target", "c", "v", "mean_accepted_length",
              "predicted_speedup", "best_k")


@pytest.fixture(scope="module")
def table():
    return shapes.run_shapes("small", dtypes=("float32", "4-bit"), context=32, ks=KS, iters=1)


def test_every_pair_and_dtype_reports_every_field(table):
    assert [(r["pair"], r["dtype"]) for r in table["rows"]] == [
        (s.name, d) for d in ("float32", "4-bit") for s in shapes.SMALL]
    for r in table["rows"]:
        assert r["error"] is None, r
        assert set(ROW_FIELDS) <= set(r)
        assert r["drafter"]["step_ms"] > 0 and r["drafter"]["stored_parameters"] > 0
        target = r["target"]
        assert target["decode_ms"] > 0 and target["head_decode_ms"] > 0
        assert sum(layer["count"] for layer in target["layers"]) == next(
            s.layers for s in shapes.SMALL if s.name == r["pair"])
        for layer in target["layers"]:
            assert {"kind", "shares_kv", "count", "decode_ms", "verify_ms"} <= set(layer)
            assert set(layer["verify_ms"]) == {"1", "2"}
        assert set(r["v"]) == set(r["predicted_speedup"]) == set(r["mean_accepted_length"]) == {"1", "2"}
        assert r["best_k"] in KS
    assert table["settings"]["assumed_acceptance"] == shapes.ASSUMED_ACCEPTANCE
    assert [p["name"] for p in table["pairs"]] == [s.name for s in shapes.SMALL]


def test_ratios_follow_from_the_timings(table):
    for r in table["rows"]:
        decode = r["target"]["decode_ms"]
        layers = sum(layer["count"] * layer["decode_ms"] for layer in r["target"]["layers"])
        assert decode == pytest.approx(layers + r["target"]["head_decode_ms"])
        assert r["c"] == pytest.approx(r["drafter"]["step_ms"] / decode)
        for k in KS:
            key = str(k)
            assert r["v"][key] == pytest.approx(r["target"]["verify_ms"][key] / decode)
            assert r["mean_accepted_length"][key] == pytest.approx(sum(0.7 ** i for i in range(k + 1)))
            assert r["predicted_speedup"][key] == pytest.approx(
                r["mean_accepted_length"][key] / (r["v"][key] + k * r["c"]))


def test_reports_hold_the_table(table, tmp_path):
    json_path, md_path = shapes.write_reports(table, tmp_path)
    assert json.loads(json_path.read_text()) == table
    rows = [line for line in md_path.read_text().splitlines() if line.startswith("| ") and "pair" not in line]
    assert len(rows) == len(table["rows"])


def test_published_shapes_match_the_design_table():
    by_name = {s.name: s for s in shapes.PUBLISHED}
    assert {name: (s.hidden, s.layers) for name, s in by_name.items() if name != "12B"} == {
        "E2B": (1536, 35), "E4B": (2560, 42), "26B-A4B": (2816, 30), "31B": (5376, 60)}
    assert all(s.vocab == 262144 and s.head_dim == 256 and s.global_head_dim == 512 for s in by_name.values())
    assert [s.drafter_hidden for s in by_name.values()] == [256, 256, 1024, 1024, 1024]
    assert [s.centroid_head for s in by_name.values()] == [True, True, False, False, False]
    args = shapes.drafter_args(by_name["E2B"], 262144)
    assert (args.num_centroids, args.centroid_intermediate_top_k) == (2048, 32)
    assert args.text.layer_types == ["sliding_attention"] * 3 + ["full_attention"]


def test_shapes_option_parses():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args([]).shapes is None
    assert parser.parse_args(["--shapes"]).shapes == "published"
    assert parser.parse_args(["--shapes", "small"]).shapes == "small"
    with pytest.raises(SystemExit):
        parser.parse_args(["--shapes", "huge"])
    with pytest.raises(ValueError, match="give one of them"):
        bench.run(parser.parse_args(["--shapes", "--profile"]))


def test_shapes_with_the_default_draft_lengths_times_every_fixed_k(tmp_path, capsys):
    """`bench --shapes small` without --ks: `auto` (a choice among widths) gets no column,
    every fixed default k does; only auto is a clear error."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    bench.run(parser.parse_args(["--shapes", "small", "--out", str(tmp_path)]))
    table = json.loads((tmp_path / "shapes.json").read_text())
    fixed = [k for k in bench.DEFAULT_KS if k != "auto"]
    assert table["settings"]["ks"] == fixed
    assert all(set(r["v"]) == {str(k) for k in fixed} for r in table["rows"] if r["error"] is None)
    with pytest.raises(ValueError, match="at least one number"):
        bench.run(parser.parse_args(["--shapes", "small", "--ks", "auto", "--out", str(tmp_path)]))
