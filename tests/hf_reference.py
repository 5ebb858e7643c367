"""The tiny fixture checkpoints (built by scripts/make_fixtures.py, cached) and reference
outputs from transformers (PyTorch, float32) for them."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

MAKE_FIXTURES_PATH = Path(__file__).resolve().parents[1] / "scripts" / "make_fixtures.py"
FIXTURE_CACHE = Path(__file__).resolve().parent / ".fixtures"

# The fixtures are tiny: one thread runs their small operations several times faster than
# two that wait on each other (measured 8x on a busy 2-core host; the weights built are the same).
torch.set_num_threads(1)


def load_make_fixtures() -> ModuleType:
    """Import scripts/make_fixtures.py (not a package module) once per process."""
    name = "make_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MAKE_FIXTURES_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def fixture_hash() -> str:
    """The checkpoints live in tests/.fixtures/<hash>/, keyed by the content of
    scripts/make_fixtures.py and the transformers version, so editing the script or
    upgrading transformers rebuilds them."""
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


def load_hf_target(path) -> torch.nn.Module:
    """A gemma4_text / gemma4_unified_text (Gemma4ForCausalLM, Gemma4UnifiedForCausalLM) or
    gemma4 / gemma4_unified (Gemma4ForConditionalGeneration, Gemma4UnifiedForConditionalGeneration)
    checkpoint."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_hf_assistant(path) -> torch.nn.Module:
    """A Gemma4AssistantForCausalLM or Gemma4UnifiedAssistantForCausalLM, built under the
    patch that lets transformers 5.23 construct it."""
    with load_make_fixtures().all_shared_kv_sharing_patch():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits of one forward pass over `ids`, without a cache."""
    # output_hidden_states sidesteps transformers 5.23 slicing per-layer inputs that a
    # KV-sharing target without per-layer embeddings (the default pair) does not have.
    output = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=True)
    return output.logits[0].float().numpy()


@torch.no_grad()
def greedy_step_logits(
    model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None, **prompt_inputs
) -> list[torch.Tensor]:
    """The next-token logits of each greedy step, decoding with transformers' KV cache.

    A manual loop rather than `generate`, which falls back to the checkpoint's eos id when
    `eos_token_id` is None. Stops right after emitting `eos_token_id` when one is given.
    `prompt_inputs` go with the prompt's forward only (images).
    """
    output = model(input_ids=torch.tensor([prompt_ids]), use_cache=True, **prompt_inputs)
    step_logits: list[torch.Tensor] = []
    while len(step_logits) < max_new_tokens:
        logits = output.logits[0, -1]
        step_logits.append(logits)
        token = int(logits.argmax())
        if token == eos_token_id:
            break
        output = model(
            input_ids=torch.tensor([[token]]), past_key_values=output.past_key_values, use_cache=True
        )
    return step_logits


def hf_greedy_with_margin(
    model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None, **prompt_inputs
) -> tuple[list[int], float]:
    """Greedy decoding with transformers' KV cache: the new tokens, and the smallest top-1
    minus top-2 logit gap along their path.

    Float32 implementations differ by ~1e-4 in these logits, so where the margin is below
    ~1e-3 another correct implementation may pick the other token of a near-tie.
    """
    step_logits = greedy_step_logits(model, prompt_ids, max_new_tokens, eos_token_id, **prompt_inputs)
    margin = min(float(top[0] - top[1]) for top in (logits.topk(2).values for logits in step_logits))
    return [int(logits.argmax()) for logits in step_logits], margin


def hf_image_inputs(processed_images, ids: list[int], image_token_id: int) -> dict:
    """What transformers' Gemma4Processor gives a Gemma4ForConditionalGeneration beside the
    ids of an expanded prompt: pixels and patch positions of each image (our
    media.inputs.ProcessedImage, made by its image processor), and the soft-token marks."""
    return dict(
        pixel_values=torch.tensor(np.stack([p.pixel_values for p in processed_images])),
        image_position_ids=torch.tensor(np.stack([p.position_ids for p in processed_images])),
        mm_token_type_ids=torch.tensor([[int(t == image_token_id) for t in ids]]),
    )


@torch.no_grad()
def hf_image_features(model, processed_image) -> np.ndarray:
    """One image's soft tokens in the text width, [n, hidden]: `get_image_features`."""
    output = model.model.get_image_features(
        torch.tensor(processed_image.pixel_values[None]), torch.tensor(processed_image.position_ids[None])
    )
    return output.pooler_output[0].numpy()


@torch.no_grad()
def hf_draft_step(
    assistant, token_embedding, hidden, position: int, shared_kv: dict
) -> tuple[np.ndarray, np.ndarray]:
    """One Gemma4AssistantForCausalLM (or Gemma4UnifiedAssistantForCausalLM) step at `position`.

    token_embedding: the target's scaled embedding of the newest token, [backbone_hidden].
    hidden: the target's final-norm hidden state that produced it, [backbone_hidden].
    shared_kv: {"full_attention": (k, v), "sliding_attention": (k, v)}, each [1, kv_heads, S, head_dim].
    Returns (logits [vocab], projected hidden [backbone_hidden]).
    """
    inputs_embeds = torch.cat([torch.as_tensor(token_embedding), torch.as_tensor(hidden)]).float()
    shared_kv_states = {
        layer_type: (torch.as_tensor(keys).float(), torch.as_tensor(values).float())
        for layer_type, (keys, values) in shared_kv.items()
    }
    output = assistant(
        inputs_embeds=inputs_embeds[None, None],
        position_ids=torch.tensor([[position]]),
        shared_kv_states=shared_kv_states,
    )
    return output.logits[0, 0].numpy(), output.last_hidden_state[0, 0].numpy()
