"""Converting HF pairs to MLX: float round trips, quantized pairs that stay lossless, and
failures that leave the sources untouched and nothing behind."""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load_model

from conftest import WINDOW, prompt_of
from gemma_mtp_mlx import load, load_drafter, stream_generate
from gemma_mtp_mlx import convert as convert_module
from gemma_mtp_mlx.checkpoint import CheckpointError
from gemma_mtp_mlx.cli import HELP_FORMAT
from gemma_mtp_mlx.convert import add_arguments, convert_pair, run



@pytest.fixture(scope="module")
def converted(pairs, tmp_path_factory):
    """convert(pair, **options) -> (out directory, report), each conversion done once per module."""
    done = {}

    def convert(pair, **options):
        key = (pair, tuple(sorted(options.items())))
        if key not in done:
            target, assistant = pairs[pair]
            out = tmp_path_factory.mktemp("converted") / pair
            done[key] = out, convert_pair(str(target), str(assistant), out, **options)
        return done[key]

    return convert


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def target_states(target, ids):
    """Prefill `ids`: (greedy next token [1], hidden [1, 1, H] that produced it, drafter K/V)."""
    cache = target.make_cache(4)
    logits, hidden = target(mx.array([ids]), cache)
    return mx.argmax(logits[0, -1], keepdims=True), hidden[:, -1:], target.drafter_kv(cache)


def draft_inputs(target, drafter, count, steps=8):
    """`count` prompts' worth of (token, hidden, position, K/V) draft-step inputs: the
    float drafter's own greedy trajectory of `steps` steps after each prompt."""
    inputs = []
    for seed in range(count):
        ids = prompt_of(int(np.random.default_rng(seed).integers(4, 3 * WINDOW)), seed)
        token, hidden, kv = target_states(target, ids)
        for _ in range(steps):
            inputs.append((token, hidden, len(ids), kv))
            state, hidden = drafter.step(target.embed(token)[None], hidden, len(ids), kv)
            token = drafter.greedy_token(state).reshape(1)
    return inputs


def assert_close(ours, reference, what):
    ours, reference = np.array(ours, dtype=np.float32), np.array(reference, dtype=np.float32)
    finite = np.isfinite(reference)
    assert (np.isfinite(ours) == finite).all(), f"{what}: different candidate sets"
    span = reference[finite].max() - reference[finite].min()
    assert np.abs(ours[finite] - reference[finite]).max() <= 1e-3 * span, what


# ---------------------------------------------------------------------------
# Round trips


# centroid head, dense head, multimodal target layout
@pytest.mark.parametrize("pair", ["e2b", "dense", "multimodal"])
def test_float32_conversion_reproduces_source_logits(pair, converted, mlx_pairs):
    source_target, _, source_drafter = mlx_pairs[pair]
    out, report = converted(pair, dtype="float32")
    target, _, drafter = load(out)
    assert drafter is not None
    assert report.target.quantization is None and report.drafter.quantization is None

    ids = prompt_of(3 * WINDOW + 5)
    ours, ours_hidden = target(mx.array([ids]), target.make_cache(4))
    reference, reference_hidden = source_target(mx.array([ids]), source_target.make_cache(4))
    assert_close(ours, reference, "target logits")
    assert_close(ours_hidden, reference_hidden, "target hidden states")

    for token, hidden, position, kv in draft_inputs(source_target, source_drafter, count=3, steps=3):
        embedding = source_target.embed(token)[None]
        state, projected = drafter.step(embedding, hidden, position, kv)
        ref_state, ref_projected = source_drafter.step(embedding, hidden, position, kv)
        assert_close(drafter.logits(state), source_drafter.logits(ref_state), "drafter logits")
        assert_close(projected, ref_projected, "drafter projected hidden")


def test_converted_target_loads_with_an_explicit_drafter_and_in_plain_mlx_lm(converted):
    out, _ = converted("multimodal", dtype="float32")
    target, _, drafter = load(str(out), draft_model=str(out / "drafter"))
    assert drafter.args.use_ordered_embeddings
    config = json.loads((out / "config.json").read_text())
    assert "vision_config" not in config and "audio_config" not in config
    assert config["vocab_size"] == config["text_config"]["vocab_size"] == 256
    model, _ = load_model(out)  # mlx-lm alone, without our config fixes
    ids = mx.array([prompt_of(20)])
    assert np.allclose(np.array(model(ids)), np.array(target(ids, target.make_cache(4))[0]), atol=1e-5)


def test_transformers_per_layer_config_target_converts(pairs, tmp_path, mlx_pairs):
    """transformers 5 saves `per_layer_config` instead of global_head_dim: normalised on the way."""
    source_target, _, _ = mlx_pairs["e2b"]
    target_src, assistant = pairs["e2b"]
    src = tmp_path / "per_layer_target"
    shutil.copytree(target_src, src)
    config = json.loads((src / "config.json").read_text())
    global_head_dim = config.pop("global_head_dim")
    config.pop("num_global_key_value_heads")
    config["per_layer_config"] = {
        str(i): {"head_dim": global_head_dim}
        for i, layer_type in enumerate(config["layer_types"]) if layer_type == "full_attention"
    }
    (src / "config.json").write_text(json.dumps(config))

    out = tmp_path / "out"
    convert_pair(str(src), str(assistant), out, dtype="float32")
    saved = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in saved and saved["global_head_dim"] == global_head_dim
    target, _, _ = load(out)
    ids = mx.array([prompt_of(30)])
    ours, _ = target(ids, target.make_cache(4))
    reference, _ = source_target(ids, source_target.make_cache(4))
    assert_close(ours, reference, "target logits")


# ---------------------------------------------------------------------------
# Quantized drafters and pairs


@pytest.mark.parametrize("pair", ["e2b", "dense"])
def test_8bit_drafter_agrees_with_float_drafter_on_top1(pair, converted, mlx_pairs):
    source_target, _, source_drafter = mlx_pairs[pair]
    out, _ = converted(pair, quantize=True, q_bits=8, q_group_size=32)
    drafter = load_drafter(out / "drafter")
    assert isinstance(drafter.model.embed_tokens, nn.QuantizedEmbedding)

    inputs = draft_inputs(source_target, source_drafter, count=40)
    agree = 0
    for token, hidden, position, kv in inputs:
        embedding = source_target.embed(token)[None]
        state, _ = drafter.step(embedding, hidden, position, kv)
        ref_state, _ = source_drafter.step(embedding, hidden, position, kv)
        agree += drafter.greedy_token(state).item() == source_drafter.greedy_token(ref_state).item()
    assert len(inputs) >= 300
    assert agree / len(inputs) >= 0.98, f"top-1 agreement {agree}/{len(inputs)}"


@pytest.mark.parametrize("pair, q_bits", [
    ("e2b", 4), ("e2b", 8),  # centroid head
    ("dense", 4), ("dense", 8),  # dense head
    ("moe", 4), ("multimodal", 8),  # the other target layouts
    ("unified", 4), ("unified_text", 4),  # the 12B family: multimodal layout, transformers-saved text
])
def test_quantized_pair_speculative_output_equals_its_plain_output(pair, q_bits, converted):
    out, report = converted(pair, quantize=True, q_bits=q_bits, q_group_size=32)
    expected = dict(group_size=32, bits=q_bits, mode="affine")
    assert report.target.quantization == report.drafter.quantization == expected
    target, tokenizer, drafter = load(out)
    assert isinstance(target.backbone.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(drafter.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(drafter.pre_projection, nn.QuantizedLinear)
    assert not any(isinstance(m, nn.QuantizedLinear) for m in drafter.model.norm.modules())
    if drafter.args.use_ordered_embeddings:
        assert type(drafter.masked_embedding.centroids) is nn.Linear  # kept unquantized
        assert drafter.masked_embedding.token_ordering.dtype == mx.int32

    for seed in range(3):
        prompt = prompt_of(int(np.random.default_rng(seed).integers(2, 2 * WINDOW)), seed)
        plain = [r.token for r in stream_generate(target, tokenizer, prompt, draft_model=None,
                                                  max_tokens=40)]
        speculative = [r.token for r in stream_generate(target, tokenizer, prompt, draft_model=drafter,
                                                        num_draft_tokens=4, max_tokens=40)]
        assert speculative == plain, f"prompt {prompt}"


@pytest.mark.parametrize("pair", ["unified", "unified_text"])
def test_converted_12b_family_target_is_plain_mlx_lm(pair, converted):
    """The converted config is mlx-lm's own gemma4 / gemma4_text form (no 12B model types,
    no per-layer inputs spelled out), so mlx-lm alone loads the same model."""
    out, _ = converted(pair, quantize=True, q_bits=4, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    text_config = config.get("text_config", config)
    assert config["model_type"] in ("gemma4", "gemma4_text") and text_config["model_type"] == "gemma4_text"
    assert text_config["hidden_size_per_layer_input"] == 0 and "per_layer_config" not in text_config
    assert json.loads((out / "drafter" / "config.json").read_text())["model_type"] == "gemma4_unified_assistant"
    target, _, _ = load(out)
    model, _ = load_model(out)
    ids = mx.array([prompt_of(20)])
    ours, theirs = (np.array(logits.astype(mx.float32)) for logits in (target(ids, target.make_cache(4))[0], model(ids)))
    assert np.array_equal(ours, theirs)


def test_drafter_quantization_can_differ_from_the_target(converted):
    out, report = converted("dense", quantize=True, q_bits=4, q_group_size=32, draft_q_bits="none")
    assert report.drafter.quantization is None
    assert "quantization" not in json.loads((out / "drafter" / "config.json").read_text())
    out, report = converted("dense", q_group_size=32, draft_q_bits=8)
    assert report.target.quantization is None and report.drafter.quantization["bits"] == 8
    target, _, drafter = load(out)
    assert isinstance(drafter.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(target.backbone.embed_tokens, nn.Embedding)


def test_token_ordering_survives_and_candidate_sets_are_unchanged(pairs, converted, mlx_pairs):
    _, _, source_drafter = mlx_pairs["e2b"]
    out, _ = converted("e2b", dtype="float32", quantize=True, q_bits=4, q_group_size=32)
    saved = mx.load(str(out / "drafter" / "model.safetensors"))["masked_embedding.token_ordering"]
    original = mx.load(str(pairs["e2b"][1] / "model.safetensors"))["masked_embedding.token_ordering"]
    assert saved.dtype == mx.int32
    assert np.array_equal(np.array(saved), np.array(original).astype(np.int32))
    assert sorted(np.array(saved).tolist()) == list(range(256))  # a permutation, not zeros

    drafter = load_drafter(out / "drafter")
    head, source_head = drafter.masked_embedding, source_drafter.masked_embedding
    assert np.array_equal(np.array(head.token_ordering), np.array(source_head.token_ordering))
    for seed in range(50):
        x = mx.random.normal((1, 1, drafter.args.text.hidden_size), key=mx.random.key(seed))
        ids, scores = head.candidates(x, drafter.model.embed_tokens)
        source_ids, _ = source_head.candidates(x, source_drafter.model.embed_tokens)
        assert np.array_equal(np.sort(np.array(ids).reshape(-1)), np.sort(np.array(source_ids).reshape(-1)))
        assert np.isfinite(np.array(scores)).all()


# ---------------------------------------------------------------------------
# Report


def test_report_gives_size_and_peak_memory_within_bounds(pairs, converted):
    out, report = converted("e2b", quantize=True, q_bits=4, q_group_size=32)
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert report.size == written
    assert report.drafter.size == sum(f.stat().st_size for f in (out / "drafter").rglob("*") if f.is_file())
    largest_shard = max(f.stat().st_size for f in pairs["e2b"][1].glob("*.safetensors"))
    assert 0 < report.drafter.peak_memory < 2 * largest_shard
    assert report.peak_memory >= report.target.peak_memory > 0
    assert report.drafter.source == str(pairs["e2b"][1])
    readme = (out / "README.md").read_text()
    assert str(pairs["e2b"][0]) in readme and "4-bit (group size 32)" in readme and "bfloat16" in readme


def test_cli_run_prints_size_and_peak_memory(pairs, tmp_path, capsys):
    parser = argparse.ArgumentParser(formatter_class=HELP_FORMAT)  # as `gemma-mtp convert` builds it
    add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for shown in ("default: bfloat16", "default: 4", "default: 64", "default: same"):
        assert shown in help_text
    target, assistant = pairs["dense"]
    args = parser.parse_args(["--model", str(target), "--draft-model", str(assistant),
                              "-o", str(tmp_path / "out"), "-q", "--q-group-size", "32",
                              "--draft-q-bits", "none"])
    run(args)
    printed = capsys.readouterr().out
    assert "converted size:" in printed and "peak conversion memory:" in printed
    assert (tmp_path / "out" / "drafter" / "config.json").is_file()


def test_hub_sources_resolve_and_are_recorded_in_the_model_card(pairs, tmp_path, monkeypatch):
    import huggingface_hub

    snapshots = {"google/tiny-it": pairs["dense"][0], "google/tiny-it-assistant": pairs["dense"][1]}
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: str(snapshots[repo_id]))
    report = convert_pair("google/tiny-it", "google/tiny-it-assistant", tmp_path / "out")
    assert (report.target.source, report.drafter.source) == ("google/tiny-it", "google/tiny-it-assistant")
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "base_model:\n- google/tiny-it\n- google/tiny-it-assistant\n" in readme


# ---------------------------------------------------------------------------
# Failures: a clear error, the source untouched, no output and no temporary directory


def copy_pair(pairs, tmp_path, pair="e2b"):
    target, assistant = pairs[pair]
    sources = tmp_path / "sources"
    shutil.copytree(target, sources / "target")
    shutil.copytree(assistant, sources / "assistant")
    return sources / "target", sources / "assistant"


def break_config(key, value):
    def apply(target, assistant):
        config = json.loads((target / "config.json").read_text())
        config[key] = value
        (target / "config.json").write_text(json.dumps(config))
    return apply


def truncate(part):
    def apply(target, assistant):
        shard = {"target": target, "assistant": assistant}[part] / "model.safetensors"
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    return apply


BAD_SOURCES = {
    "missing config.json": (lambda target, assistant: (target / "config.json").unlink(), "no config.json"),
    "unknown model_type": (break_config("model_type", "llama"), "'llama'"),
    "assistant as target": (lambda target, assistant: shutil.copy(assistant / "config.json", target),
                            "that is a drafter: pass it as draft_model / --draft-model"),
    "truncated target shard": (truncate("target"), "download"),
    "truncated drafter shard": (truncate("assistant"), "truncated"),
    "quantized source": (break_config("quantization", {"group_size": 64, "bits": 4}), "already quantized"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_is_a_clear_error_leaving_nothing_behind(case, pairs, tmp_path):
    target, assistant = copy_pair(pairs, tmp_path)
    damage, message = BAD_SOURCES[case]
    damage(target, assistant)
    before = tree_hash(tmp_path / "sources")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    with pytest.raises(CheckpointError, match=message):
        convert_pair(str(target), str(assistant), out)
    assert tree_hash(tmp_path / "sources") == before
    assert list(out.parent.iterdir()) == []


def test_drafter_for_another_target_is_refused(pairs, narrow_assistant, tmp_path):
    before = {p: tree_hash(p) for p in (pairs["e2b"][0], narrow_assistant)}
    with pytest.raises(CheckpointError, match="drafter expects backbone_hidden_size 32, the target has 64"):
        convert_pair(str(pairs["e2b"][0]), str(narrow_assistant), tmp_path / "out")
    assert {p: tree_hash(p) for p in before} == before
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(pairs, tmp_path):
    target, assistant = pairs["dense"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_pair(str(target), str(assistant), out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "notes.txt").read_text() == "mine"

    convert_pair(str(target), str(assistant), out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "drafter" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    empty = tmp_path / "empty"
    empty.mkdir()
    convert_pair(str(target), str(assistant), empty)  # an empty directory is fine
    assert (empty / "config.json").is_file()


def test_failed_overwrite_keeps_the_old_output(pairs, narrow_assistant, tmp_path):
    target, _ = pairs["e2b"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError):
        convert_pair(str(target), str(narrow_assistant), out, overwrite=True)  # mismatched drafter
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "notes.txt").read_text() == "mine"


def test_unwritable_output_is_a_clear_error(pairs, tmp_path):
    target, assistant = pairs["dense"]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="is a file, not a directory"):
        convert_pair(str(target), str(assistant), blocker / "out")
    with pytest.raises(FileExistsError, match="not a directory"):
        convert_pair(str(target), str(assistant), blocker)
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"] and blocker.read_text() == "not a directory"


def test_output_inside_a_source_is_refused(pairs, tmp_path):
    target, assistant = copy_pair(pairs, tmp_path)
    before = tree_hash(tmp_path / "sources")
    with pytest.raises(ValueError, match="overlaps the source"):
        convert_pair(str(target), str(assistant), target / "mlx")
    with pytest.raises(ValueError, match="overlaps the source"):
        convert_pair(str(target), str(assistant), tmp_path / "sources", overwrite=True)
    assert tree_hash(tmp_path / "sources") == before


def test_interrupted_conversion_leaves_nothing_behind(pairs, tmp_path, monkeypatch):
    target, assistant = pairs["e2b"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "save_config", interrupted)  # after the drafter is written
    with pytest.raises(KeyboardInterrupt):
        convert_pair(str(target), str(assistant), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_weight_file_is_an_error_not_a_converted_pair(pairs, tmp_path, monkeypatch):
    """MLX does not report a failed write (full disk): the read-back of each shard must."""
    save = mx.save_safetensors

    def disk_full(path, arrays, metadata=None):
        save(path, arrays, metadata=metadata)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) - 100])

    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="free disk space"):
        convert_pair(str(pairs["dense"][0]), str(pairs["dense"][1]), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_hub_repo_names_it_and_suggests_a_local_directory(pairs, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="'google/gemma-4-E2B-it-assistant'.*local directory"):
        convert_pair(str(pairs["e2b"][0]), "google/gemma-4-E2B-it-assistant", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, message", [
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(quantize=True, q_bits=3), "q_bits must be 4 or 8"),
    (dict(quantize=True, q_group_size=48), "q_group_size must be one of"),
    (dict(draft_q_bits=6), "draft_q_bits must be"),
])
def test_bad_options_are_value_errors(options, message, pairs, tmp_path):
    with pytest.raises(ValueError, match=message):
        convert_pair(str(pairs["e2b"][0]), str(pairs["e2b"][1]), tmp_path / "out", **options)
    assert list(tmp_path.iterdir()) == []


def test_checkout_script_reports_errors_in_one_line(pairs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    script = Path(__file__).resolve().parents[1] / "convert" / "convert_pair.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(pairs["dense"][0]),
                           "--draft-model", str(pairs["dense"][1]), "-o", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "--overwrite" in done.stderr
