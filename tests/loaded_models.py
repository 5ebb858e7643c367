"""Session fixtures holding the fixture checkpoints loaded once, in MLX and in transformers."""

from collections import namedtuple

import pytest

from conftest import PAIRS, TARGETS
from hf_reference import load_hf_assistant, load_hf_target
from gemma_mtp_mlx import load

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
