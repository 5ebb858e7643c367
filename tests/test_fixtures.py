"""The fixture checkpoints load in transformers and have the form Google publishes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4UnifiedForCausalLM,
    Gemma4UnifiedForConditionalGeneration,
)

from conftest import TARGETS
from hf_reference import (
    hf_draft_step,
    hf_greedy_with_margin,
    hf_logits,
    load_hf_assistant,
    load_hf_target,
    load_make_fixtures,
)

ASSISTANTS = ["assistant_centroid", "assistant_dense", "unified_assistant", "assistant_saved"]
TARGET_CLASSES = {
    "multimodal_target": Gemma4ForConditionalGeneration,
    "unified_target": Gemma4UnifiedForConditionalGeneration,
    "unified_text_target": Gemma4UnifiedForCausalLM,
}
VOCAB = 256
BACKBONE_HIDDEN = 64
# Loaded tensors sit at other memory alignments than freshly built ones, so float32 kernels
# may sum in another order; a config that built a different model would differ by far more.
SAME_MODEL = dict(rtol=1e-5, atol=1e-4)
PROMPT = [2, 17, 200, 45, 99, 131, 64, 250, 11, 180, 77, 31, 142, 8, 222, 90, 6, 160, 55, 240]

# (global_head_dim, num_global_key_value_heads) each published-form config.json must carry
PUBLISHED_GLOBAL_ATTENTION = {
    "e2b_target": (32, None),
    "dense_target": (32, 1),
    "moe_target": (32, 1),
    "multimodal_target": (32, None),
    "unified_target": (32, 1),
    "assistant_centroid": (32, None),
    "assistant_dense": (32, 1),
    "unified_assistant": (32, 1),
}
# the per_layer_config of each config.json kept as transformers saves it
TRANSFORMERS_PER_LAYER_CONFIG = {
    "unified_text_target": {
        "5": {"head_dim": 32, "num_key_value_heads": 1},
        "7": {"head_dim": 32, "num_key_value_heads": 1},
    },
    "assistant_saved": {"3": {"head_dim": 32}},
}


def text_config_of(config: dict) -> dict:
    return config.get("text_config", config)


def random_shared_kv(assistant, length: int) -> dict:
    """Random target K/V shaped as the assistant's full and sliding layers expect."""
    generator = np.random.default_rng(0)
    shared_kv = {}
    for layer in assistant.model.layers:
        attention = layer.self_attn
        kv_heads = assistant.config.text_config.num_attention_heads // attention.num_key_value_groups
        shape = (1, kv_heads, length, attention.head_dim)
        shared_kv[attention.layer_type] = (
            generator.standard_normal(shape, dtype=np.float32),
            generator.standard_normal(shape, dtype=np.float32),
        )
    return shared_kv


@pytest.mark.parametrize("name", TARGETS)
def test_target_loads_and_gives_logits(fixture_dir, name):
    model = load_hf_target(fixture_dir / name)
    assert type(model) is TARGET_CLASSES.get(name, Gemma4ForCausalLM)
    logits = hf_logits(model, PROMPT)
    assert logits.shape == (len(PROMPT), VOCAB)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(PUBLISHED_GLOBAL_ATTENTION))
def test_config_has_published_form(fixture_dir, name):
    config = json.loads((fixture_dir / name / "config.json").read_text())
    text_config = text_config_of(config)
    assert "per_layer_config" not in text_config
    global_head_dim, num_global_kv_heads = PUBLISHED_GLOBAL_ATTENTION[name]
    assert text_config["global_head_dim"] == global_head_dim
    assert text_config["num_global_key_value_heads"] == num_global_kv_heads
    if config["model_type"] == "gemma4":
        assert config["vocab_size"] == text_config["vocab_size"] == VOCAB


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_PER_LAYER_CONFIG))
def test_config_has_transformers_saved_form(fixture_dir, name):
    text_config = text_config_of(json.loads((fixture_dir / name / "config.json").read_text()))
    assert "global_head_dim" not in text_config and "num_global_key_value_heads" not in text_config
    assert text_config["per_layer_config"] == TRANSFORMERS_PER_LAYER_CONFIG[name]


@pytest.mark.parametrize("name", TARGETS)
def test_reloaded_target_matches_built_model(fixture_dir, name):
    """Rewriting config.json into the published form does not change the model."""
    built = load_make_fixtures().build_model(name)
    reloaded = load_hf_target(fixture_dir / name)
    np.testing.assert_allclose(hf_logits(reloaded, PROMPT), hf_logits(built, PROMPT), **SAME_MODEL)


@pytest.mark.parametrize("name", ASSISTANTS)
def test_reloaded_assistant_matches_built_model(fixture_dir, name):
    built = load_make_fixtures().build_model(name)
    reloaded = load_hf_assistant(fixture_dir / name)
    generator = np.random.default_rng(1)
    embedding, hidden = generator.standard_normal((2, BACKBONE_HIDDEN), dtype=np.float32)
    shared_kv = random_shared_kv(reloaded, length=24)
    logits, projected = hf_draft_step(reloaded, embedding, hidden, 24, shared_kv)
    assert logits.shape == (VOCAB,) and projected.shape == (BACKBONE_HIDDEN,)
    expected_logits, expected_projected = hf_draft_step(built, embedding, hidden, 24, shared_kv)
    np.testing.assert_allclose(logits, expected_logits, **SAME_MODEL)
    np.testing.assert_allclose(projected, expected_projected, **SAME_MODEL)


def test_assistant_drafts_from_target_kv(fixture_dir):
    """The E2B-like pair works end to end: target K/V and hidden state feed one draft step."""
    target = load_hf_target(fixture_dir / "e2b_target")
    assistant = load_hf_assistant(fixture_dir / "assistant_centroid")
    with torch.no_grad():
        output = target(
            input_ids=torch.tensor([PROMPT]), return_shared_kv_states=True, output_hidden_states=True
        )
        token = int(output.logits[0, -1].argmax())
        embedding = target.model.embed_tokens(torch.tensor(token)).numpy()
    shared_kv = {kind: (k.numpy(), v.numpy()) for kind, (k, v) in output.shared_kv_states.items()}
    hidden = output.hidden_states[-1][0, -1].numpy()
    logits, projected = hf_draft_step(assistant, embedding, hidden, len(PROMPT), shared_kv)
    assert np.isfinite(logits).all() and np.isfinite(projected).all()


@pytest.mark.parametrize("name", ASSISTANTS)
def test_assistant_generation_config(fixture_dir, name):
    generation_config = json.loads((fixture_dir / name / "generation_config.json").read_text())
    assert generation_config["num_assistant_tokens"] == 6


@pytest.mark.parametrize("name", ["assistant_centroid", "unified_assistant"])
def test_token_ordering_is_a_permutation(fixture_dir, name):
    path = fixture_dir / name
    with safe_open(path / "model.safetensors", "pt") as weights:
        token_ordering = weights.get_tensor("masked_embedding.token_ordering")
    assert token_ordering.dtype == torch.int64
    assert sorted(token_ordering.tolist()) == list(range(VOCAB))
    assert token_ordering.tolist() != list(range(VOCAB))
    loaded = load_hf_assistant(path).masked_embedding.token_ordering
    assert torch.equal(loaded, token_ordering)


@pytest.mark.parametrize("name", TARGETS)
def test_tokenizer(fixture_dir, name):
    tokenizer = AutoTokenizer.from_pretrained(fixture_dir / name)
    assert len(tokenizer) == VOCAB
    assert sorted(tokenizer.get_vocab().values()) == list(range(VOCAB))
    special_tokens = [tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token]
    assert tokenizer.convert_tokens_to_ids(special_tokens) == [0, 1, 2, 3]
    assert special_tokens == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [4, 5]
    ids = tokenizer.encode("hello world")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("name", TARGETS)
def test_greedy_output_is_diverse_and_matches_uncached(fixture_dir, name):
    model = load_hf_target(fixture_dir / name)
    tokens, margin = hf_greedy_with_margin(model, PROMPT, max_new_tokens=40)
    uncached = []
    for _ in range(len(tokens)):
        uncached.append(int(hf_logits(model, PROMPT + uncached)[-1].argmax()))
    assert tokens == uncached
    assert len(set(tokens)) >= 15
    assert 1 not in tokens
    assert margin > 1e-3
