"""The target: mlx-lm's Gemma 4 model, seen the way speculation needs it.

mlx-lm's `gemma4_text` (or multimodal `gemma4`) model does the work, for every size (the
12B's `gemma4_unified` / `gemma4_unified_text` configs are mapped onto those). This wrapper
adds one verify forward that returns logits *and* final-norm hidden states for every input
position, and zero-copy views of the K/V that the drafter reads: those of the last
K/V-computing layer of each attention type.
"""

from pathlib import Path
from typing import Dict, List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gemma4_text import logit_softcap
from mlx_lm.utils import load_model, load_tokenizer

from .cache import SharedKV, SlidingKVCache, make_target_cache, num_kv_layers
from .checkpoint import CheckpointError, check_model_type, mlx_lm_text_config, read_config, weights_load_error


class Target:
    def __init__(self, model: nn.Module):
        self.model = model
        self.lm = getattr(model, "language_model", model)  # gemma4_text.Model
        self.args = self.lm.args
        self.backbone = self.lm.model  # gemma4_text.Gemma4TextModel
        # The producer of each attention type: the last layer of that type computing K/V.
        self.producers = {self.args.layer_types[i]: i for i in range(num_kv_layers(self.args))}

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
        return self.logits(hidden), hidden

    def logits(self, hidden: mx.array) -> mx.array:
        """Logits [..., vocab] of final-norm hidden states [..., hidden]."""
        if self.lm.tie_word_embeddings:
            logits = self.backbone.embed_tokens.as_linear(hidden)
        else:
            logits = self.lm.lm_head(hidden)
        if self.lm.final_logit_softcapping is not None:
            logits = logit_softcap(self.lm.final_logit_softcapping, logits)
        return logits

    def drafter_kv(self, cache: List) -> Dict[str, SharedKV]:
        """The producers' K/V buffers and the verified slots the drafter sees, per layer type.

        Full attention: every cached position. Sliding: the last `window + 1` positions,
        the span the drafter's inclusive sliding window covers.
        """
        kv = {}
        for layer_type, i in self.producers.items():
            c = cache[i]
            if isinstance(c, SlidingKVCache):
                start, end = max(0, c.used - self.args.sliding_window - 1), c.used
            else:
                start, end = 0, c.offset
            kv[layer_type] = SharedKV(c.keys, c.values, start, end)
        return kv


def load_target(path: Path, lazy: bool = False):
    """Load a Gemma 4 target and its tokenizer from a local checkpoint directory."""
    config = read_config(path)
    check_model_type(path, config, "target")
    try:
        model, config = load_model(path, lazy=lazy, model_config=mlx_lm_config(config))
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


def mlx_lm_config(config: Dict) -> Dict:
    """A target config.json as mlx-lm 0.32 reads it (it updates the file's config).

    A text-only target (`gemma4_text`, `gemma4_unified_text`) becomes a `gemma4_text`
    config in the published form. The multimodal layout (`gemma4`, `gemma4_unified`)
    becomes `gemma4` with such a text config and the text vocabulary size at the top
    level, where mlx-lm reads it.
    """
    if config["model_type"] in ("gemma4_text", "gemma4_unified_text"):
        return mlx_lm_text_config(config)
    text_config = mlx_lm_text_config(config.get("text_config") or {})
    return {
        "model_type": "gemma4",
        "text_config": text_config,
        "vocab_size": config.get("vocab_size", text_config.get("vocab_size", 262144)),
    }


def _eos_ids(config: Dict):
    eos = config.get("eos_token_id")
    if eos is None:
        eos = (config.get("text_config") or {}).get("eos_token_id")
    return eos
