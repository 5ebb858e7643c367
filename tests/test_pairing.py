"""Which checkpoints are targets and which drafters, and which pairs can work.

A drafter computes no K/V: it attends to the target's, so the K/V head counts and head dims
are the target's. A pair is refused only when that cannot work, naming both values and the
published pairing.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.gemma4_text import ModelArgs

from gemma_mtp_mlx import load, load_drafter
from gemma_mtp_mlx.checkpoint import CheckpointError, kv_heads
from gemma_mtp_mlx.drafter import check_pair
from gemma_mtp_mlx.target import mlx_lm_config

TWELVE_B_PAIRING = (
    "pair google/gemma-4-12B-it with google/gemma-4-12B-it-assistant "
    "(a QAT target google/gemma-4-12B-it-qat-q4_0-unquantized "
    "with google/gemma-4-12B-it-qat-q4_0-unquantized-assistant)"
)


def test_transformers_saved_assistant_config_pairs_with_its_kv_target(pairs):
    """Its config says 2 K/V heads on the full layer (transformers saves no global count);
    the target's full layers have 1, and those are the K/V it reads."""
    target_path, assistant_path = pairs["saved_config"]
    target, _, drafter = load(target_path, draft_model=assistant_path)
    assert kv_heads(drafter.args.text, "full_attention") == 2
    assert kv_heads(target.args, "full_attention") == 1


def test_assistant_config_without_per_layer_config_drafts_the_same(pairs, mlx_pairs, tmp_path):
    """The published form without a global K/V head count pairs too, and is the same drafter."""
    target, _, saved = mlx_pairs["saved_config"]
    published = tmp_path / "assistant"
    shutil.copytree(pairs["saved_config"][1], published)
    config = json.loads((published / "config.json").read_text())
    config["text_config"].pop("per_layer_config")
    config["text_config"]["global_head_dim"] = 32
    (published / "config.json").write_text(json.dumps(config))
    drafter = load_drafter(published)
    check_pair(target, drafter)

    cache = target.make_cache(4)
    _, hidden = target(mx.array([list(range(3, 40))]), cache)
    step = (target.embed(mx.array([[7]])), hidden[:, -1:], 37, target.drafter_kv(cache))
    for ours, theirs in zip(saved.step(*step), drafter.step(*step)):
        np.testing.assert_array_equal(np.array(ours), np.array(theirs))


def edit_head_dim(target, drafter):
    drafter.args.text.head_dim = 8


def edit_global_head_dim(target, drafter):
    drafter.args.text.global_head_dim = 64


def edit_target_kv_heads(target, drafter):
    target.args.num_key_value_heads = 3


def edit_target_global_kv_heads(target, drafter):
    target.args.num_global_key_value_heads = 3


def edit_vocab(target, drafter):
    drafter.args.text.vocab_size = 512


def drop_full_producer(target, drafter):
    del target.producers["full_attention"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (edit_head_dim, "drafter expects sliding head_dim 8, the target has 16"),
        (edit_global_head_dim, "drafter expects full head_dim 64, the target has 32"),
        (edit_target_kv_heads, "the drafter's 4 query heads are not a multiple of the target's 3 sliding key/value heads"),
        (edit_target_global_kv_heads, "the drafter's 4 query heads are not a multiple of the target's 3 full key/value heads"),
        (edit_vocab, "drafter expects vocab_size 512, the target has 256"),
        (drop_full_producer, "drafter expects a K/V-producing layer of type full_attention, the target has none"),
    ],
)
def test_pair_that_cannot_work_names_both_values_and_the_pairing(edit, message, pairs):
    target_path, assistant_path = pairs["unified_text"]
    target, _, _ = load(target_path)  # fresh copies: their args are edited below
    drafter = load_drafter(assistant_path)
    target.args.hidden_size = drafter.args.backbone_hidden_size = 3840  # as the 12B
    check_pair(target, drafter)
    edit(target, drafter)
    with pytest.raises(CheckpointError) as error:
        check_pair(target, drafter)
    assert str(error.value).endswith(f"{message}: {TWELVE_B_PAIRING}")


@pytest.mark.parametrize("target, drafter", [("e2b_target", "assistant_dense"), ("dense_target", "assistant_centroid")])
def test_drafter_configured_for_other_kv_heads_pairs_when_heads_divide(target, drafter, fixture_dir):
    load(fixture_dir / target, draft_model=fixture_dir / drafter)


@pytest.mark.parametrize("name", ["unified_assistant", "assistant_saved"])
def test_drafter_passed_as_target_says_so(name, fixture_dir):
    with pytest.raises(CheckpointError, match="that is a drafter: pass it as draft_model / --draft-model"):
        load(fixture_dir / name)


@pytest.mark.parametrize("name", ["unified_target", "unified_text_target", "dense_target"])
def test_target_passed_as_drafter_says_so(name, fixture_dir):
    with pytest.raises(CheckpointError, match="that is a target: pass it as model / --model"):
        load_drafter(fixture_dir / name)


def test_other_model_types_are_refused_naming_the_supported_ones(pairs, tmp_path):
    other = tmp_path / "llama"
    shutil.copytree(pairs["unified"][0], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="the target must be one of gemma4, gemma4_text, gemma4_unified, "
                                              "gemma4_unified_text"):
        load(other)
    with pytest.raises(CheckpointError, match="not a Gemma 4 drafter \\(gemma4_assistant or gemma4_unified_assistant\\)"):
        load_drafter(other)


def test_12b_configs_map_onto_mlx_lm_gemma4_text_with_the_12b_defaults():
    """Keys a gemma4_unified_text config leaves out take transformers' Gemma4UnifiedTextConfig
    defaults (not mlx-lm's gemma4_text ones), and it has no per-layer inputs, MoE or
    double-wide MLP."""
    text = {"model_type": "gemma4_unified_text", "hidden_size": 3840, "num_hidden_layers": 12,
            "hidden_size_per_layer_input": 256}
    for config in (text, {"model_type": "gemma4_unified", "text_config": text}):
        mapped = mlx_lm_config(config)
        args = ModelArgs.from_dict(mapped.get("text_config", mapped))
        assert mapped["model_type"] == ("gemma4" if "text_config" in config else "gemma4_text")
        assert (args.hidden_size, args.num_hidden_layers) == (3840, 12)
        assert args.hidden_size_per_layer_input == 0 and not args.enable_moe_block
        assert not args.use_double_wide_mlp and args.num_kv_shared_layers == 0
        assert args.final_logit_softcapping is None and args.sliding_window == 1024
        assert args.num_key_value_heads == 4 and args.max_position_embeddings == 262144
        assert args.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 2
    assert mlx_lm_config({"model_type": "gemma4_unified", "text_config": text})["vocab_size"] == 262144
