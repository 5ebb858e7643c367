"""Shared pytest fixtures: the tiny Hugging Face checkpoints, built on demand and cached.

The cache lives in tests/.fixtures/<hash>/, keyed by the content of
scripts/make_fixtures.py and the transformers version, so editing the script or
upgrading transformers rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import namedtuple
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import transformers
from mlx_lm.models.cache import KVCache

from gemma_mtp_mlx import load

from hf_reference import MAKE_FIXTURES_PATH, load_hf_assistant, load_hf_target, load_make_fixtures

FIXTURE_CACHE = Path(__file__).resolve().parent / ".fixtures"

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


def fixture_hash() -> str:
    digest = hashlib.sha256(MAKE_FIXTURES_PATH.read_bytes())
    digest.update(transformers.__version__.encode())
    return digest.hexdigest()


def cached_fixture_dir() -> Path:
    """The cached checkpoints, building them first if needed.

    The build goes to a temporary directory that is renamed into place only when
    complete, so an interrupted build never leaves a half-written cache.
    """
    fixture_dir = FIXTURE_CACHE / fixture_hash()
    if fixture_dir.is_dir():
        return fixture_dir
    FIXTURE_CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="building-", dir=FIXTURE_CACHE))
    try:
        load_make_fixtures().build_fixtures(staging)
        try:
            staging.rename(fixture_dir)
        except OSError:
            if not fixture_dir.is_dir():  # otherwise a concurrent build got there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return fixture_dir


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
def hf_targets(fixture_dir):
    return {name: load_hf_target(fixture_dir / name) for name in TARGETS}


@pytest.fixture(scope="session")
def hf_assistants(pairs):
    return {name: load_hf_assistant(assistant) for name, (_, assistant) in pairs.items()}


def full_length_cache(target):
    """Plain mlx-lm caches, one per K/V-computing layer, that keep every position."""
    return [KVCache() for _ in range(target.args.num_hidden_layers - target.args.num_kv_shared_layers)]


def full_length_state(target, ids):
    """The target's producer K/V for every position of `ids` (plain caches that never drop),
    as numpy {layer_type: (keys, values)}, and its final-norm hidden state at the last one:
    the verified state the transformers assistant is fed."""
    cache = full_length_cache(target)
    _, hidden = target(mx.array([ids]), cache)
    kv = {t: tuple(np.array(a) for a in cache[i].keys_and_values()) for t, i in target.producers.items()}
    return kv, np.array(hidden[0, -1])
