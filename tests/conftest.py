"""Shared pytest fixtures and helpers: the tiny Hugging Face checkpoints (built on demand and
cached by hf_reference.cached_fixture_dir), loaded once per session, and what many tests use."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gemma_mtp_mlx import load
from gemma_mtp_mlx.convert import convert_pair

from batched_rounds import full_length_cache
from hf_reference import cached_fixture_dir, load_hf_assistant, load_hf_target

WINDOW = 16  # the fixture targets' sliding window (scripts/make_fixtures.py)

TARGETS = [
    "e2b_target",
    "dense_target",
    "moe_target",
    "multimodal_target",
    "unified_target",  # 12B-like, multimodal layout
    "unified_text_target",  # 12B-like text model, config as transformers saves it
]

# pair name -> (target directory, assistant directory), relative to the fixture directory
PAIRS = {
    "e2b": ("e2b_target", "assistant_centroid"),
    "dense": ("dense_target", "assistant_dense"),
    "moe": ("moe_target", "assistant_dense"),
    "multimodal": ("multimodal_target", "assistant_centroid"),
    "unified": ("unified_target", "unified_assistant"),
    "unified_text": ("unified_text_target", "unified_assistant"),
    # an assistant config as transformers saves it (no global K/V head count) beside a K=V target
    "saved_config": ("dense_target", "assistant_saved"),
}


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return cached_fixture_dir()


@pytest.fixture(scope="session")
def pairs(fixture_dir: Path) -> dict[str, tuple[Path, Path]]:
    return {
        name: (fixture_dir / target, fixture_dir / assistant) for name, (target, assistant) in PAIRS.items()
    }


@pytest.fixture(scope="session")
def narrow_assistant(fixture_dir, tmp_path_factory) -> Path:
    """assistant_dense cut down to a 32-wide backbone: a drafter that fits no fixture target
    (every fixture drafter fits every fixture target)."""
    out = tmp_path_factory.mktemp("narrow") / "assistant"
    shutil.copytree(fixture_dir / "assistant_dense", out)
    config = json.loads((out / "config.json").read_text())
    config["backbone_hidden_size"] = 32
    (out / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(out / "model.safetensors"))
    pre = weights["pre_projection.weight"]  # [hidden, 2 * backbone]: embedding, then hidden state
    weights["pre_projection.weight"] = mx.concatenate([pre[:, :32], pre[:, 64:96]], axis=1)
    weights["post_projection.weight"] = weights["post_projection.weight"][:32]  # [backbone, hidden]
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    return out


# The fixture checkpoints loaded once per session, in MLX and in transformers.
Pair = namedtuple("Pair", "target tokenizer drafter")


@pytest.fixture(scope="session")
def mlx_pairs(pairs):
    return {name: Pair(*load(target, draft_model=assistant)) for name, (target, assistant) in pairs.items()}


@pytest.fixture(scope="session")
def mlx_targets(fixture_dir):
    return {name: load(fixture_dir / name)[0] for name in TARGETS}


@pytest.fixture(scope="session")
def quantized_pairs(pairs, tmp_path_factory):
    """The centroid-head and dense-head pairs converted to 4 bits (target and drafter), loaded."""
    out = {}
    for name in ("e2b", "dense"):
        target, assistant = pairs[name]
        path = tmp_path_factory.mktemp("q4") / name
        convert_pair(str(target), str(assistant), path, quantize=True, q_bits=4, q_group_size=32)
        out[name] = load(path)
    return out


@pytest.fixture(scope="session")
def hf_targets(fixture_dir):
    return {name: load_hf_target(fixture_dir / name) for name in TARGETS}


@pytest.fixture(scope="session")
def hf_assistants(pairs):
    return {name: load_hf_assistant(assistant) for name, (_, assistant) in pairs.items()}


def prompt_of(length: int, seed: int = 0) -> list[int]:
    """`length` random token ids in [3, 256), the same for the same `seed`."""
    return np.random.default_rng(seed).integers(3, 256, size=length).tolist()


@contextmanager
def eos_tokens(tokenizer, ids):
    """Within the block, `ids` are the tokenizer's EOS tokens (random weights rarely emit
    the real EOS; an empty set never stops)."""
    saved = tokenizer.eos_token_ids
    tokenizer.eos_token_ids = set(ids)
    try:
        yield
    finally:
        tokenizer.eos_token_ids = saved


class OracleDrafter:
    """Proposes the target's own greedy continuation of `sequence` (prompt + output): every
    draft is accepted at temp 0."""

    default_num_draft_tokens = 4

    def __init__(self, sequence):
        self.sequence = sequence

    def draft(self, embed, token, hidden, position, shared_kv, num_tokens, sample=None, keys=None):
        assert token.item() == self.sequence[position]
        return mx.array(self.sequence[position + 1 : position + 1 + num_tokens]), None


def full_length_state(target, ids):
    """The target's producer K/V for every position of `ids` (plain caches that never drop),
    as numpy {layer_type: (keys, values)}, and its final-norm hidden state at the last one:
    the verified state the transformers assistant is fed."""
    cache = full_length_cache(target)
    _, hidden = target(mx.array([ids]), cache)
    kv = {t: tuple(np.array(a) for a in cache[i].keys_and_values()) for t, i in target.producers.items()}
    return kv, np.array(hidden[0, -1])
