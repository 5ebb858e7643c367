"""Write tiny, deterministic Gemma 4 checkpoints for tests.

Every checkpoint is built with transformers' own Gemma 4 classes (``Gemma4*`` and, for
the 12B family, ``Gemma4Unified*``), re-initialised from a fixed seed so that its logits
are peaky (greedy decoding has clear winners), saved as float32 safetensors, and its
config.json rewritten into the form Google publishes (``global_head_dim`` /
``num_global_key_value_heads`` instead of transformers' ``per_layer_config``), except
the checkpoints in TRANSFORMERS_SAVED, which keep what ``save_pretrained`` wrote.

Usage: ``python scripts/make_fixtures.py OUT_DIR`` or ``build_fixtures(Path(...))``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessorPil,
    Gemma4TextConfig,
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAssistantForCausalLM,
    Gemma4UnifiedAudioConfig,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForCausalLM,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedTextConfig,
    Gemma4UnifiedVisionConfig,
    Gemma4VisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SLIDING = "sliding_attention"
FULL = "full_attention"

VOCAB_SIZE = 256
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
GLOBAL_HEAD_DIM = 32
NUM_ASSISTANT_TOKENS = 6

# transformers' Gemma 4 defaults, spelled out so the fixtures do not depend on them.
ROPE_PARAMETERS = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

COMMON_TEXT_SETTINGS = dict(
    vocab_size=VOCAB_SIZE,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=GLOBAL_HEAD_DIM,
    sliding_window=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    pad_token_id=PAD_ID,
    eos_token_id=EOS_ID,
    bos_token_id=BOS_ID,
    rope_parameters=ROPE_PARAMETERS,
)

TARGET_TEXT_SETTINGS = dict(
    COMMON_TEXT_SETTINGS,
    hidden_size=64,
    intermediate_size=128,
    final_logit_softcapping=30.0,
)

# Re-initialisation (see `initial_value`). With tied embeddings, a token's own embedding
# dominates the residual stream unless it is small next to the layers' outputs, and then
# greedy decoding just repeats the input token. So embeddings are small (the input is
# scaled by sqrt(hidden) and every layer normalises it anyway) and the final norm weight
# is large, which spreads the logits over several units: near-ties become rare, output
# is diverse. The eos row is shrunk so that greedy runs rarely stop early.
EMBEDDING_STD = 0.03
PER_LAYER_EMBEDDING_STD = 0.35  # about 1/sqrt(hidden_size_per_layer_input): unit rms after scaling
EOS_EMBEDDING_SCALE = 0.25
FINAL_NORM_SCALE = 25.0
NORM_WEIGHT_SPREAD = 0.1
ROUTER_PROJECTION_STD = 1.0
BIAS_STD = 0.02
SCALAR_RANGE = (0.5, 1.5)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# The vision targets' tokenizer also knows Gemma 4's image tokens (begin, soft token, end),
# right after the other special tokens.
IMAGE_TOKENS = ["<|image>", "<|image|>", "<image|>"]
BOI_ID, IMAGE_ID, EOI_ID = (len(SPECIAL_TOKENS) + i for i in range(len(IMAGE_TOKENS)))
# The image processor's smallest soft-token budget; 2-pixel patches keep the images small.
IMAGE_PROCESSOR_SETTINGS = dict(patch_size=2, pooling_kernel_size=3, max_soft_tokens=70)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

TOKENIZER_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still write a
sentence or two, and the tests only need it to be the same every time they run.
Speculative decoding lets a small drafter propose a few tokens; the large target
model then checks all of them in one forward pass and keeps the longest prefix it
agrees with, so the output is exactly what the target alone would have written.

Hello world! This is a tiny tokenizer for tests. It knows the letters, the digits
0 1 2 3 4 5 6 7 8 9 and common punctuation, and it learns to merge the pairs that
appear most often in this text: the, and, ing, tion, token, model, draft, verify.

def generate(model, prompt, max_tokens=60):
    tokens = tokenize(prompt)
    for step in range(max_tokens):
        logits = model(tokens)
        next_token = argmax(logits[-1])
        if next_token == eos:
            break
        tokens.append(next_token)
    return detokenize(tokens)

class Cache:
    def __init__(self, window: int) -> None:
        self.keys = []
        self.values = []
        self.window = window

    def trim(self, count: int) -> None:
        del self.keys[-count:]
        del self.values[-count:]

Weather report: today will be sunny in the morning with a light breeze from the
west; clouds gather in the afternoon and there is a chance of rain in the evening.
Temperatures reach 21 degrees, falling to 12 at night. Tomorrow looks warmer.
"""


@contextlib.contextmanager
def all_shared_kv_sharing_patch() -> Iterator[None]:
    """Let transformers build Gemma 4 assistants, whose layers all reuse the target's K/V.

    transformers 5.23's ``kv_sharing_modes`` (of ``Gemma4TextConfig`` and
    ``Gemma4UnifiedTextConfig``) raises when every layer is KV-shared (no layer of the
    assistant produces K/V), so neither assistant class can be constructed. While this
    context is active such configs report "reuse" for every layer; other configs behave
    as before.
    """
    originals = {cls: cls.kv_sharing_modes for cls in (Gemma4TextConfig, Gemma4UnifiedTextConfig)}

    def patched(original: property) -> property:
        def kv_sharing_modes(config) -> list[str | None]:
            if config.num_kv_shared_layers == config.num_hidden_layers:
                return ["reuse"] * config.num_hidden_layers
            return original.fget(config)

        return property(kv_sharing_modes)

    for cls, original in originals.items():
        cls.kv_sharing_modes = patched(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.kv_sharing_modes = original


# ---------------------------------------------------------------------------
# Configs


def e2b_text_config() -> Gemma4TextConfig:
    """E2B-like: per-layer inputs, KV-shared tail layers, double-wide MLP."""
    return Gemma4TextConfig(
        **TARGET_TEXT_SETTINGS,
        num_hidden_layers=7,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, SLIDING, FULL],
        num_kv_shared_layers=3,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB_SIZE,
        use_double_wide_mlp=True,
        num_key_value_heads=1,
        attention_k_eq_v=False,
    )


def dense_text_config(**moe_settings) -> Gemma4TextConfig:
    """31B-like: no per-layer inputs, no KV sharing, K=V on full layers."""
    return Gemma4TextConfig(
        **TARGET_TEXT_SETTINGS,
        num_hidden_layers=6,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        attention_k_eq_v=True,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        **moe_settings,
    )


def moe_text_config() -> Gemma4TextConfig:
    """26B-like: the dense layout plus a mixture-of-experts block in every layer."""
    return dense_text_config(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)


def multimodal_config() -> Gemma4Config:
    """A text-only Gemma4Config, so weights are saved as ``model.language_model.*``."""
    return Gemma4Config(text_config=e2b_text_config().to_dict(), vision_config=None, audio_config=None)


def vision_config(**settings) -> Gemma4VisionConfig:
    """A 2-layer vision encoder (2-pixel patches, 3 x 3 pooling, axial RoPE), 32 wide."""
    return Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=IMAGE_PROCESSOR_SETTINGS["patch_size"],
        pooling_kernel_size=IMAGE_PROCESSOR_SETTINGS["pooling_kernel_size"],
        position_embedding_size=256,  # covers the longest side: 70 soft tokens x 3 patches
        rms_norm_eps=1e-6,
        **settings,
    )


def vision_target_config(text_config: Gemma4TextConfig, **vision_settings) -> Gemma4Config:
    """A multimodal Gemma4Config with a vision tower and the tokenizer's image token ids."""
    return Gemma4Config(
        text_config=text_config.to_dict(),
        vision_config=vision_config(**vision_settings).to_dict(),
        audio_config=None,
        boi_token_id=BOI_ID,
        image_token_id=IMAGE_ID,
        eoi_token_id=EOI_ID,
    )


def vision_dense_text_config() -> Gemma4TextConfig:
    """31B-like with bidirectional attention inside each image block (sliding layers)."""
    config = dense_text_config()
    config.use_bidirectional_attention = "vision"
    return config


ASSISTANT_TEXT_SETTINGS = dict(
    COMMON_TEXT_SETTINGS,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    layer_types=[SLIDING, SLIDING, SLIDING, FULL],
    num_kv_shared_layers=4,
    use_double_wide_mlp=False,
    final_logit_softcapping=None,
)


def assistant_text_config(**attention_settings) -> Gemma4TextConfig:
    return Gemma4TextConfig(
        **ASSISTANT_TEXT_SETTINGS,
        **attention_settings,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        enable_moe_block=False,
    )


def assistant_config(centroid_head: bool) -> Gemma4AssistantConfig:
    """A 4-layer drafter for a 64-wide target; centroid head for E-like targets, K=V layout otherwise."""
    attention_settings = (
        dict(num_key_value_heads=1)
        if centroid_head
        else dict(num_key_value_heads=2, attention_k_eq_v=True, num_global_key_value_heads=1)
    )
    return Gemma4AssistantConfig(
        text_config=assistant_text_config(**attention_settings),
        backbone_hidden_size=TARGET_TEXT_SETTINGS["hidden_size"],
        use_ordered_embeddings=centroid_head,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )


def saved_assistant_config() -> Gemma4AssistantConfig:
    """A drafter for the K=V dense target whose config names no global K/V head count.

    Saved as transformers saves it: its full layer's `per_layer_config` carries only the
    head dim, so its own config says 2 K/V heads there while the target's full layers
    have 1. The drafter computes no K/V, so the target's count is the one that counts.
    """
    return Gemma4AssistantConfig(
        text_config=assistant_text_config(num_key_value_heads=2, attention_k_eq_v=True),
        backbone_hidden_size=TARGET_TEXT_SETTINGS["hidden_size"],
    )


def unified_text_config() -> Gemma4UnifiedTextConfig:
    """12B-like (`gemma4_unified_text`): K=V full layers, no per-layer inputs, no MoE, no KV
    sharing, the 12B's 5:1 sliding/full pattern."""
    return Gemma4UnifiedTextConfig(
        **TARGET_TEXT_SETTINGS,
        num_hidden_layers=8,
        layer_types=[SLIDING] * 5 + [FULL, SLIDING, FULL],
        num_kv_shared_layers=0,
        attention_k_eq_v=True,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
    )


def unified_config() -> Gemma4UnifiedConfig:
    """The 12B's multimodal layout (`gemma4_unified`): text weights under
    ``model.language_model.*`` beside tiny encoder-free vision and audio embedders."""
    vision = Gemma4UnifiedVisionConfig(
        patch_size=2, pooling_kernel_size=1, mm_embed_dim=16, mm_posemb_size=8, output_proj_dims=16
    )
    return Gemma4UnifiedConfig(
        text_config=unified_text_config().to_dict(),
        vision_config=vision.to_dict(),
        audio_config=Gemma4UnifiedAudioConfig(audio_embed_dim=8).to_dict(),
    )


def unified_assistant_config() -> Gemma4UnifiedAssistantConfig:
    """A `gemma4_unified_assistant` drafter with a centroid head for the 12B-like targets."""
    text_config = Gemma4UnifiedTextConfig(
        **ASSISTANT_TEXT_SETTINGS,
        attention_k_eq_v=True,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
    )
    return Gemma4UnifiedAssistantConfig(
        text_config=text_config,
        backbone_hidden_size=TARGET_TEXT_SETTINGS["hidden_size"],
        use_ordered_embeddings=True,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )


# name -> (seed, constructor)
TARGETS: dict[str, tuple[int, Callable[[], PreTrainedModel]]] = {
    "e2b_target": (1, lambda: Gemma4ForCausalLM(e2b_text_config())),
    "dense_target": (2, lambda: Gemma4ForCausalLM(dense_text_config())),
    "moe_target": (3, lambda: Gemma4ForCausalLM(moe_text_config())),
    "multimodal_target": (4, lambda: Gemma4ForConditionalGeneration(multimodal_config())),
    "unified_target": (7, lambda: Gemma4UnifiedForConditionalGeneration(unified_config())),
    "unified_text_target": (8, lambda: Gemma4UnifiedForCausalLM(unified_text_config())),
    # E2B-like with a vision tower (standardised soft tokens)
    "vision_target": (11, lambda: Gemma4ForConditionalGeneration(
        vision_target_config(e2b_text_config(), standardize=True))),
    # 31B-like (K=V) with a vision tower (clipped linears), bidirectional image blocks
    "vision_dense_target": (12, lambda: Gemma4ForConditionalGeneration(
        vision_target_config(vision_dense_text_config(), use_clipped_linears=True))),
}
# Targets that read images: their tokenizer has IMAGE_TOKENS, their folder an image processor.
VISION_TARGETS = {"vision_target", "vision_dense_target"}
ASSISTANTS: dict[str, tuple[int, Callable[[], PreTrainedModel]]] = {
    "assistant_centroid": (5, lambda: Gemma4AssistantForCausalLM(assistant_config(centroid_head=True))),
    "assistant_dense": (6, lambda: Gemma4AssistantForCausalLM(assistant_config(centroid_head=False))),
    "unified_assistant": (9, lambda: Gemma4UnifiedAssistantForCausalLM(unified_assistant_config())),
    "assistant_saved": (10, lambda: Gemma4AssistantForCausalLM(saved_assistant_config())),
}
# Checkpoints whose config.json stays as transformers' save_pretrained wrote it.
TRANSFORMERS_SAVED = {"unified_text_target", "assistant_saved"}


# ---------------------------------------------------------------------------
# Weights


def initial_value(name: str, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A deterministic random value for one saved parameter or buffer, chosen by its name.

    Gemma4RMSNorm multiplies by its weight directly (``x * w``), so norm weights sit
    around 1 (the final norm around FINAL_NORM_SCALE). Matrices use std 1/sqrt(fan_in)
    (the last dimension, also for the stacked expert weights), except embeddings and
    the MoE router, whose input is scaled by 1/sqrt(hidden) and which needs a wide
    projection to route decisively.
    """
    shape = tensor.shape

    def normal(mean: float, std: float) -> torch.Tensor:
        return mean + std * torch.randn(shape, generator=generator)

    if name.endswith("token_ordering"):
        return torch.randperm(shape[0], generator=generator)
    if name.endswith(("input_min", "output_min")):  # clipped linears' bounds
        return -2.0 - torch.rand(shape, generator=generator)
    if name.endswith(("input_max", "output_max")):
        return 2.0 + torch.rand(shape, generator=generator)
    if name.endswith("std_scale"):
        return normal(1.0, NORM_WEIGHT_SPREAD)
    if name.endswith(("layer_scalar", "per_expert_scale")):
        low, high = SCALAR_RANGE
        return low + (high - low) * torch.rand(shape, generator=generator)
    if name.endswith("model.norm.weight"):
        return normal(FINAL_NORM_SCALE, FINAL_NORM_SCALE * NORM_WEIGHT_SPREAD)
    if "norm" in name or "_ln" in name or name.endswith("router.scale"):
        return normal(1.0, NORM_WEIGHT_SPREAD)
    if name.endswith("embed_tokens_per_layer.weight"):
        return normal(0.0, PER_LAYER_EMBEDDING_STD)
    if name.endswith("embed_tokens.weight"):
        embedding = normal(0.0, EMBEDDING_STD)
        embedding[EOS_ID] *= EOS_EMBEDDING_SCALE
        return embedding
    if name.endswith("router.proj.weight"):
        return normal(0.0, ROUTER_PROJECTION_STD)
    if name.endswith("bias"):
        return normal(0.0, BIAS_STD)
    if tensor.dim() >= 2:
        return normal(0.0, shape[-1] ** -0.5)
    raise ValueError(f"no initialisation rule for {name} {tuple(shape)}")


@torch.no_grad()
def reinitialise(model: PreTrainedModel, seed: int) -> None:
    """Overwrite every saved tensor in state-dict order; tied weights are set once."""
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensor.copy_(initial_value(name, tensor, generator))


def build_model(name: str) -> PreTrainedModel:
    """Construct and deterministically initialise the fixture model called `name`, in eval mode."""
    seed, construct = {**TARGETS, **ASSISTANTS}[name]
    torch.manual_seed(seed)
    with all_shared_kv_sharing_patch():
        model = construct()
    reinitialise(model, seed)
    return model.eval()


# ---------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(special_tokens: list[str] = SPECIAL_TOKENS) -> Tokenizer:
    """A BPE tokenizer with exactly VOCAB_SIZE ids, specials first, covering printable ASCII."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # Like Gemma's tokenizer: spaces become "▁", and no dummy prefix before the text.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=sorted(set(string.printable) - set(" \r\x0b\x0c")),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TOKENIZER_TRAINING_TEXT], trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} ids, expected {VOCAB_SIZE}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return tokenizer


def build_tokenizer(image_tokens: bool = False) -> PreTrainedTokenizerFast:
    """The fixtures' tokenizer; with `image_tokens`, also Gemma 4's image tokens (IMAGE_TOKENS)."""
    extra = IMAGE_TOKENS if image_tokens else []
    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(SPECIAL_TOKENS + extra),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"] + extra,
        chat_template=CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------------------
# Saving


def published_text_config(text_config: dict) -> dict:
    """Replace `per_layer_config` with the global_* keys Google's checkpoints carry."""
    per_layer = text_config.pop("per_layer_config")
    overrides = {json.dumps(layer, sort_keys=True) for layer in per_layer.values()}
    if len(overrides) != 1:
        raise ValueError(f"full-attention layers differ: {per_layer}")
    full_layer = json.loads(overrides.pop())
    text_config["global_head_dim"] = full_layer["head_dim"]
    text_config["num_global_key_value_heads"] = full_layer.get("num_key_value_heads")
    return text_config


def rewrite_config_as_published(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    if "text_config" not in config:
        config = published_text_config(config)
    else:
        config["text_config"] = published_text_config(config["text_config"])
    if config["model_type"] == "gemma4":
        config["vocab_size"] = config["text_config"]["vocab_size"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_model(
    model: PreTrainedModel, out_dir: Path, generation_config: GenerationConfig, published: bool = True
) -> None:
    """save_pretrained, then (if `published`) config.json in Google's published form."""
    model.save_pretrained(out_dir)
    if published:
        rewrite_config_as_published(out_dir / "config.json")
    generation_config.save_pretrained(out_dir)


def build_fixtures(out_dir: Path) -> None:
    """Write every target (with tokenizer) and assistant checkpoint under `out_dir`."""
    out_dir = Path(out_dir)
    tokenizers = {False: build_tokenizer(), True: build_tokenizer(image_tokens=True)}
    special_ids = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    target_generation = GenerationConfig(**special_ids)
    assistant_generation = GenerationConfig(**special_ids, num_assistant_tokens=NUM_ASSISTANT_TOKENS)
    for name in TARGETS:
        save_model(build_model(name), out_dir / name, target_generation, name not in TRANSFORMERS_SAVED)
        tokenizers[name in VISION_TARGETS].save_pretrained(out_dir / name)
        if name in VISION_TARGETS:
            Gemma4ImageProcessorPil(**IMAGE_PROCESSOR_SETTINGS).save_pretrained(out_dir / name)
    for name in ASSISTANTS:
        save_model(build_model(name), out_dir / name, assistant_generation, name not in TRANSFORMERS_SAVED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the checkpoints into")
    args = parser.parse_args()
    torch.set_num_threads(2)
    build_fixtures(args.out_dir)


if __name__ == "__main__":
    main()
