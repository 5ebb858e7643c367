"""The target: mlx-lm's Gemma 4 model, seen the way speculation needs it.

mlx-lm's `gemma4_text` (or multimodal `gemma4`) model does the work. This wrapper adds one
verify forward that returns logits *and* final-norm hidden states for every input
position, and zero-copy views of the K/V that the drafter reads: those of the last
K/V-computing layer of each attention type.
"""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gemma4_text import logit_softcap
from mlx_lm.utils import load_model, load_tokenizer

from .cache import SlidingKVCache, make_target_cache
from .checkpoint import CheckpointError, published_text_config, read_config, weights_load_error

TARGET_TYPES = ("gemma4_text", "gemma4")


class Target:
    def __init__(self, model: nn.Module):
        self.model = model
        self.lm = getattr(model, "language_model", model)  # gemma4_text.Model
        self.args = self.lm.args
        self.backbone = self.lm.model  # gemma4_text.Gemma4TextModel
        num_kv_layers = self.args.num_hidden_layers - self.args.num_kv_shared_layers
        # The producer of each attention type: the last layer of that type computing K/V.
        self.producers = {self.args.layer_types[i]: i for i in range(num_kv_layers)}

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    def make_cache(self, max_draft: int) -> List:
        return make_target_cache(self.args, max_draft)

    def embed(self, tokens: mx.array) -> mx.array:
        """The scaled token embedding the target feeds its first layer: [..., hidden]."""
        return self.backbone.embed_tokens(tokens) * self.backbone.embed_scale

    def __call__(self, tokens: mx.array, cache: List) -> Tuple[mx.array, mx.array]:
        """tokens [1, L] -> (logits [1, L, vocab], final-norm hidden [1, L, hidden])."""
        hidden = self.backbone(tokens, cache=cache)
        if self.lm.tie_word_embeddings:
            logits = self.backbone.embed_tokens.as_linear(hidden)
        else:
            logits = self.lm.lm_head(hidden)
        if self.lm.final_logit_softcapping is not None:
            logits = logit_softcap(self.lm.final_logit_softcapping, logits)
        return logits, hidden

    def drafter_kv(self, cache: List) -> Dict[str, Tuple[mx.array, mx.array]]:
        """Views of the producers' verified K/V, [1, kv_heads, S, head_dim] per layer type.

        Full attention: every cached position. Sliding: the last `window + 1` positions,
        the span the drafter's inclusive sliding window covers.
        """
        kv = {}
        for layer_type, i in self.producers.items():
            c = cache[i]
            if isinstance(c, SlidingKVCache):
                kv[layer_type] = c.last(self.args.sliding_window + 1)
            else:
                kv[layer_type] = (c.keys[..., : c.offset, :], c.values[..., : c.offset, :])
        return kv


def load_target(path: Path, lazy: bool = False):
    """Load a Gemma 4 target and its tokenizer from a local checkpoint directory."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in TARGET_TYPES:
        hint = (
            " (that is a drafter: pass it as draft_model / --draft-model)"
            if model_type == "gemma4_assistant"
            else ""
        )
        raise CheckpointError(
            f"{path} holds a {model_type!r} model{hint}; the target must be one of {TARGET_TYPES}"
        )
    try:
        model, config = load_model(path, lazy=lazy, model_config=_mlx_lm_overrides(config))
    except Exception as e:  # unreadable, truncated or mismatched weight files
        raise weights_load_error(path, "model*.safetensors", e) from e
    return Target(model), _load_tokenizer(path, config)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _load_tokenizer(path: Path, config: Dict):
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}): "
            "copy them from the original checkpoint"
        )
    try:
        return load_tokenizer(path, eos_token_ids=_eos_ids(config))
    except Exception as e:
        raise CheckpointError(
            f"the tokenizer files in {path} could not be read ({type(e).__name__}: {e}); "
            "copy them again from the original checkpoint"
        ) from e


def _mlx_lm_overrides(config: Dict) -> Optional[Dict]:
    """Config fixes mlx-lm 0.32 needs: the published text-config form and, for the
    multimodal layout, the text vocabulary size (mlx-lm reads it from the top level)."""
    if config["model_type"] == "gemma4_text":
        return published_text_config(config)
    text_config = published_text_config(config.get("text_config") or {})
    return {
        "text_config": text_config,
        "vocab_size": config.get("vocab_size", text_config.get("vocab_size", 262144)),
    }


def _eos_ids(config: Dict):
    eos = config.get("eos_token_id")
    if eos is None:
        eos = (config.get("text_config") or {}).get("eos_token_id")
    return eos
