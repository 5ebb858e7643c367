"""The default pair that ships with the package: its layout, loading, exactness, the CLI and bench on it."""

import argparse
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from gemma_mtp_mlx import load, stream_generate
from gemma_mtp_mlx.bench import benchmark as bench
from gemma_mtp_mlx.adaptive import DraftLengthController
from gemma_mtp_mlx.loading import DEFAULT_DRAFT_MODEL, DEFAULT_MODEL, DEFAULT_PROMPTS_FILE, MODELS_DIR
from hf_reference import hf_logits, load_hf_target
from test_bench import FIELDS

SHIPPED_LIMIT_BYTES = 30 * 2**20


@pytest.fixture(scope="module")
def default_pair():
    return load()


@pytest.fixture(scope="module")
def prompts():
    return bench.read_prompts(DEFAULT_PROMPTS_FILE)


def read_json(path):
    return json.loads(path.read_text())


def test_shipped_checkpoints_use_the_hugging_face_layout_of_google_s_pair():
    target, drafter = read_json(DEFAULT_MODEL / "config.json"), read_json(DEFAULT_DRAFT_MODEL / "config.json")
    assert target["model_type"] == "gemma4_text" and drafter["model_type"] == "gemma4_assistant"
    for name in ("model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "generation_config.json"):
        assert (DEFAULT_MODEL / name).is_file(), name
    types = target["layer_types"]
    assert {"sliding_attention", "full_attention"} == set(types) and types[-1] == "full_attention"
    assert 0 < target["num_kv_shared_layers"] < target["num_hidden_layers"]
    assert target["final_logit_softcapping"] and "global_head_dim" in target
    assert drafter["use_ordered_embeddings"] and drafter["backbone_hidden_size"] == target["hidden_size"]
    assert read_json(DEFAULT_DRAFT_MODEL / "generation_config.json")["num_assistant_tokens"] >= 1
    with safe_open(DEFAULT_DRAFT_MODEL / "model.safetensors", "np") as f:
        ordering = f.get_tensor("masked_embedding.token_ordering")
    assert sorted(ordering.tolist()) == list(range(target["vocab_size"]))
    shipped = sum(p.stat().st_size for p in MODELS_DIR.rglob("*") if p.is_file())
    assert shipped < SHIPPED_LIMIT_BYTES
    assert read_json(MODELS_DIR / "training.json")["evaluate"]["held_out_greedy_mean_accepted_length_k4"] >= 2.5


def test_load_without_a_model_gives_the_shipped_pair(default_pair):
    target, tokenizer, drafter = default_pair
    assert drafter is not None and drafter.args.use_ordered_embeddings
    assert target.args.num_hidden_layers == read_json(DEFAULT_MODEL / "config.json")["num_hidden_layers"]
    text = "def add(a, b):\n    return a + b\n"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.encode(text)[0] == tokenizer.bos_token_id


def test_target_logits_match_transformers(default_pair, prompts):
    target, tokenizer, _ = default_pair
    ids = tokenizer.encode(prompts[0])
    ours, _ = target(mx.array([ids]), target.make_cache(4))
    reference = hf_logits(load_hf_target(DEFAULT_MODEL), ids)
    assert np.abs(np.array(ours[0]) - reference).max() < 1e-3


def test_greedy_speculative_output_equals_plain_output_and_drafts_are_accepted(default_pair, prompts):
    target, tokenizer, drafter = default_pair
    rounds = accepted = 0
    for prompt in prompts[:4]:
        plain = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=48)]
        for k in (2, 4):
            responses = list(stream_generate(target, tokenizer, prompt, draft_model=drafter, max_tokens=48,
                                             num_draft_tokens=k))
            assert [r.token for r in responses] == plain, (prompt, k)
            if k == 4:
                rounds += responses[-1].stats.rounds
                accepted += responses[-1].stats.accepted_tokens
    # A trained drafter, not a random one (those accept ~0 drafts): the full held-out
    # measurement (>= 2.5) is in models/training.json.
    assert accepted / rounds + 1 >= 2.0


def test_generate_without_a_model_runs_offline_and_prints_acceptance():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "gemma_mtp_mlx", "generate", "--prompt", "def add(a, b):\n",
                          "--max-tokens", "24"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert "mean accepted length" in run.stderr and "acceptance by position" in run.stderr


def test_chat_with_the_default_model_is_a_clear_error():
    run = subprocess.run([sys.executable, "-m", "gemma_mtp_mlx", "chat"], capture_output=True, text=True,
                         timeout=300, input="")
    assert run.returncode == 1
    assert "no chat template" in run.stderr and "Traceback" not in run.stderr


def test_bench_without_a_model_measures_the_shipped_pair(prompts, tmp_path):
    assert len(prompts) >= 8
    few = tmp_path / "prompts.jsonl"
    few.write_text("".join(json.dumps(p) + "\n" for p in prompts[:2]))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--prompts", str(few), "--ks", "1,2", "--temps", "0", "--max-tokens", "8",
                              "--repeats", "1", "--out", str(tmp_path / "out")])
    bench.run(args)
    result = read_json(tmp_path / "out" / "bench.json")
    assert result["model"]["layers"] == read_json(DEFAULT_MODEL / "config.json")["num_hidden_layers"]
    assert result["settings"]["prompts"] == 2
    for config in result["configs"]:
        assert set(FIELDS) <= set(config), config["name"]
    assert {"c", "v", "decode_ms", "draft_step_ms", "isolated_draft_step_ms", "verify_ms", "round_ms"} <= set(result["costs"])



def test_rounds_queued_ahead_draft_what_rounds_built_after_the_outcome_draft(default_pair, prompts):
    """Rounds built before the host reads the previous outcome (position, cache slots and the
    drafter's visible K/V taken on the device) draft, keep and emit exactly what rounds built
    after it do (an identity logits processor makes the loop wait for each outcome first),
    past the sliding window and with widths that change every round (`auto`)."""
    target, tokenizer, drafter = default_pair
    window = target.args.sliding_window

    def rounds(prompt, k, waits):
        processors = [lambda tokens, logits: logits] if waits else None
        responses = list(stream_generate(target, tokenizer, prompt, draft_model=drafter, num_draft_tokens=k,
                                         max_tokens=window + 40, logits_processors=processors, record_rounds=True))
        return [(r["position"], r["k"], r["drafted"], r["accepted"], r["emitted"]) for r in responses[-1].stats.rounds_log]

    for prompt in prompts[:2]:
        ahead = rounds(prompt, 4, waits=False)
        assert ahead == rounds(prompt, 4, waits=True)
        assert sum(accepted for _, _, _, accepted, _ in ahead) > len(ahead)  # drafts are being kept
    # `auto`'s widths, replayed the same way with the loop waiting
    ahead = rounds(prompts[2], "auto", waits=False)
    widths = [k for _, k, _, _, _ in ahead[1:]]
    assert len(set(widths)) > 1
    assert rounds(prompts[2], Replay(widths), waits=True) == ahead


class Replay(DraftLengthController):
    """Chooses the given widths in turn."""

    def __init__(self, widths):
        super().__init__(max(widths))
        self.widths = iter(widths)

    def choose(self) -> int:
        return next(self.widths, 0)


@pytest.mark.parametrize("k", [0, 4])
def test_no_round_is_queued_behind_the_last_one(default_pair, prompts, monkeypatch, k):
    """A round queued behind the one that reaches max_tokens would be computed and dropped:
    generation queues exactly the rounds it hands out (plain decoding and drafting), and the
    tokens are those of a longer run."""
    from gemma_mtp_mlx import speculative

    target, tokenizer, drafter = default_pair
    queued = []
    queue_round = speculative.queue_round

    def counting(*args, **kwargs):
        queued.append(args[-1])
        return queue_round(*args, **kwargs)

    monkeypatch.setattr(speculative, "queue_round", counting)
    options = dict(draft_model=drafter if k else None, num_draft_tokens=k or None)
    for max_tokens in (1, 2, 37):
        queued.clear()
        responses = list(stream_generate(target, tokenizer, prompts[0], max_tokens=max_tokens, **options))
        assert responses[-1].finish_reason == "length"
        assert len(queued) == responses[-1].stats.rounds, max_tokens
    longer = [r.token for r in stream_generate(target, tokenizer, prompts[0], max_tokens=60, **options)]
    assert [r.token for r in responses] == longer[:37]
