"""API behaviour: stops, stats, prompt forms, prompt cache reuse, and clear errors."""

import json
import shutil

import numpy as np
import pytest

from conftest import WINDOW, OracleDrafter, eos_tokens, prompt_of
from gemma_mtp_mlx import generate, load, load_drafter, make_prompt_cache, stream_generate
from gemma_mtp_mlx.checkpoint import CheckpointError
from gemma_mtp_mlx.drafter import check_pair


def test_max_tokens_stops_exactly_and_last_response_carries_stats(mlx_pairs):
    """Plain, a drafter whose rounds keep one token, and one whose rounds keep k + 1 = 5
    (so max_tokens 7 and 8 cut a round short)."""
    target, tokenizer, drafter = mlx_pairs["e2b"]
    prompt = [5, 6, 7]
    with eos_tokens(tokenizer, []):
        plain = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=20)]
        for draft in (None, drafter, OracleDrafter(prompt + plain)):
            for max_tokens in (1, 2, 7, 8):
                responses = list(stream_generate(target, tokenizer, prompt, draft_model=draft,
                                                 num_draft_tokens=4, max_tokens=max_tokens))
                assert [r.token for r in responses] == plain[:max_tokens]
                assert [r.finish_reason for r in responses] == [None] * (max_tokens - 1) + ["length"]
                assert [r.stats for r in responses[:-1]] == [None] * (max_tokens - 1)
                stats = responses[-1].stats
                assert stats.generation_tokens == responses[-1].generation_tokens == max_tokens
                assert len(stats.acceptance_by_position) == (0 if draft is None else 4)
                if isinstance(draft, OracleDrafter):  # the first token, then rounds of 5 (the last cut)
                    assert stats.rounds == -(-(max_tokens - 1) // 5)
                    assert stats.accepted_tokens == stats.drafted_tokens


def test_eos_stops_generation_exactly_in_plain_and_speculative_mode(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    prompt = list(range(40, 60))
    plain = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=60)]
    stop_at = 30
    eos = plain[stop_at]
    stop_at = plain.index(eos)  # its first occurrence
    with eos_tokens(tokenizer, [eos]):
        for draft in (None, drafter):
            for k in (1, 3, 8):
                responses = list(stream_generate(target, tokenizer, prompt, draft_model=draft,
                                                 num_draft_tokens=k, max_tokens=60))
                assert [r.token for r in responses] == plain[: stop_at + 1]
                assert responses[-1].finish_reason == "stop"
                assert responses[-1].text == ""  # EOS is not detokenized


def test_string_prompt_and_generate_text(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    text = generate(target, tokenizer, "hello world", draft_model=drafter, max_tokens=20)
    plain = generate(target, tokenizer, "hello world", max_tokens=20)
    assert isinstance(text, str) and text == plain


def test_prompt_cache_reuse_prefills_only_new_tokens_and_stays_exact(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["dense"]
    first, second = list(range(3, 40)), list(range(50, 70))
    cache = make_prompt_cache(target)
    out1 = [r.token for r in stream_generate(target, tokenizer, first, draft_model=drafter,
                                             max_tokens=30, prompt_cache=cache)]
    assert cache[0].offset == len(first) + len(out1) - 1
    out2 = [r.token for r in stream_generate(target, tokenizer, [out1[-1]] + second, draft_model=drafter,
                                             max_tokens=30, prompt_cache=cache)]
    whole = first + out1 + second
    assert out2 == [r.token for r in stream_generate(target, tokenizer, whole, max_tokens=30)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=[]), "prompt is empty"),
        (dict(prompt=""), "prompt is empty"),
        (dict(max_tokens=0), "max_tokens must be at least 1"),
        (dict(max_tokens=-3), "max_tokens must be at least 1"),
        (dict(num_draft_tokens=0), "num_draft_tokens must be at least 1"),
    ],
)
def test_bad_generation_arguments_are_clear_errors(kwargs, message, mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    args = dict(prompt=[5, 6], draft_model=drafter) | kwargs
    with pytest.raises(ValueError, match=message):
        list(stream_generate(target, tokenizer, **args))


def test_wrong_backbone_size_suggests_the_published_pair(pairs):
    target_path, assistant_path = pairs["e2b"]
    target, _, _ = load(target_path)  # fresh copies: their args are edited below
    drafter = load_drafter(assistant_path)
    target.args.hidden_size = 2560  # an E4B-sized target
    drafter.args.backbone_hidden_size = 1536  # an E2B drafter
    with pytest.raises(
        CheckpointError,
        match="drafter expects backbone_hidden_size 1536, the target has 2560: "
        "pair google/gemma-4-E4B-it with google/gemma-4-E4B-it-assistant",
    ):
        check_pair(target, drafter)


def test_weights_that_do_not_fit_the_config_are_a_clear_error(pairs, tmp_path):
    _, assistant_path = pairs["e2b"]
    bad = tmp_path / "assistant"
    shutil.copytree(assistant_path, bad)
    config = json.loads((bad / "config.json").read_text())
    config["backbone_hidden_size"] = 1536
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="drafter weights do not match its config.json"):
        load_drafter(bad)


def test_missing_config_and_weights_are_clear_errors(pairs, tmp_path):
    target_path, assistant_path = pairs["e2b"]
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)
    no_weights = tmp_path / "assistant"
    no_weights.mkdir()
    shutil.copy(assistant_path / "config.json", no_weights)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_drafter(no_weights)
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "does-not-exist")


def test_truncated_weights_and_wrong_model_type_are_clear_errors(pairs, tmp_path):
    target_path, assistant_path = pairs["e2b"]
    truncated = tmp_path / "truncated"
    shutil.copytree(assistant_path, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_drafter(truncated)
    with pytest.raises(CheckpointError, match="not a Gemma 4 drafter"):
        load_drafter(target_path)
    with pytest.raises(CheckpointError, match="pass it as draft_model"):
        load(assistant_path)


def test_prompt_cache_too_small_for_the_draft_length_is_a_clear_error(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    cache = make_prompt_cache(target, num_draft_tokens=2)
    with pytest.raises(ValueError, match="make_prompt_cache\\(model, num_draft_tokens=6\\)"):
        list(stream_generate(target, tokenizer, [5, 6], draft_model=drafter, num_draft_tokens=6, prompt_cache=cache))


def test_a_prompt_cache_from_mlx_lm_is_refused(mlx_pairs):
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_prompt_cache

    target, tokenizer, drafter = mlx_pairs["e2b"]
    with pytest.raises(ValueError, match="must come from gemma_mtp_mlx.make_prompt_cache"):
        list(stream_generate(target, tokenizer, [5, 6], draft_model=drafter,
                             prompt_cache=mlx_lm_prompt_cache(target.model)))


@pytest.mark.parametrize("name", ["e2b", "dense"])
def test_prefill_step_size_does_not_change_the_output(name, mlx_pairs):
    """Chunks of one token, smaller than and straddling the sliding window, and one chunk."""
    target, tokenizer, drafter = mlx_pairs[name]
    prompt = prompt_of(3 * WINDOW + 5, seed=4)

    def run(step, draft):
        out = stream_generate(target, tokenizer, prompt, draft_model=draft, num_draft_tokens=3,
                              max_tokens=8, prefill_step_size=step)
        return [(r.token, r.logprob) for r in out]

    for draft in (None, drafter):
        whole = run(512, draft)
        for step in (1, 7, WINDOW + 1):
            chunked = run(step, draft)
            assert [t for t, _ in chunked] == [t for t, _ in whole], f"prefill_step_size={step}"
            assert np.allclose([lp for _, lp in chunked], [lp for _, lp in whole], atol=1e-4)
