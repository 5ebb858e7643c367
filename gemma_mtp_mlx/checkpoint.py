"""Finding checkpoints and reading their configs and weights.

Which model types are targets and which are drafters is decided here. Google publishes
Gemma 4 text configs with `global_head_dim` / `num_global_key_value_heads`; transformers
5.x saves a `per_layer_config` map instead. Both are read here and turned into the
published form, which is what mlx-lm's `gemma4_text` understands. The 12B's text stack
(`gemma4_unified_text`) is mlx-lm's `gemma4_text` without per-layer inputs, so its config
is mapped onto that too.
"""

import glob
import json
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx


# The 12B is `gemma4_unified` (its text config `gemma4_unified_text`), every other size
# `gemma4` / `gemma4_text`; their drafters are `gemma4_unified_assistant` / `gemma4_assistant`.
TARGET_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
DRAFTER_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")

# gemma4_unified_text on mlx-lm's gemma4_text: what the 12B's text stack does not have...
UNIFIED_TEXT_ABSENT = {
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 0,
    "enable_moe_block": False,
}
# ...and transformers' Gemma4UnifiedTextConfig defaults where mlx-lm's gemma4_text differs.
UNIFIED_TEXT_DEFAULTS = {
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_key_value_heads": 4,
    "max_position_embeddings": 262144,
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "num_kv_shared_layers": 0,
    "use_double_wide_mlp": False,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with what to do about it."""


def check_model_type(path: Path, config: Dict, role: str) -> None:
    """Refuse a checkpoint that is not a Gemma 4 `role` ("target" or "drafter"); when it is
    the other role, say that target and drafter were swapped."""
    model_type = config.get("model_type")
    if role == "target" and model_type not in TARGET_TYPES:
        hint = " (that is a drafter: pass it as draft_model / --draft-model)" if model_type in DRAFTER_TYPES else ""
        raise CheckpointError(
            f"{path} holds a {model_type!r} model{hint}; the target must be one of {', '.join(TARGET_TYPES)}"
        )
    if role == "drafter" and model_type not in DRAFTER_TYPES:
        hint = " (that is a target: pass it as model / --model)" if model_type in TARGET_TYPES else ""
        raise CheckpointError(
            f"{path} holds a {model_type!r} model{hint}, not a Gemma 4 drafter ({' or '.join(DRAFTER_TYPES)}); "
            "pass the matching '-assistant' checkpoint as the draft model"
        )


def resolve_path(path_or_repo: str) -> Path:
    """A local directory as is; anything else is fetched from the Hugging Face Hub."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path_or_repo} is a file, not a model directory")
    if str(path_or_repo).startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_repo} does not exist: give a model directory or a Hub repo id")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(path_or_repo),
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"],
            )
        )
    except Exception as e:  # network, auth, missing repo: all answer the same way
        raise CheckpointError(
            f"could not fetch {path_or_repo!r} from the Hugging Face Hub ({type(e).__name__}); "
            "check the repo id and your network, or pass a local directory"
        ) from e


def read_config(path: Path) -> Dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: is this a Hugging Face model directory?")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from e


def published_text_config(text_config: Dict) -> Dict:
    """A Gemma 4 text config in Google's published form (no `per_layer_config`)."""
    config = dict(text_config)
    per_layer = config.pop("per_layer_config", None)
    if per_layer:
        layer_types = config.get("layer_types") or []
        full = [v for k, v in per_layer.items() if layer_types[int(k)] == "full_attention"]
        if full:
            config.setdefault("global_head_dim", full[0].get("head_dim", config.get("head_dim")))
            if "num_key_value_heads" in full[0]:
                config.setdefault("num_global_key_value_heads", full[0]["num_key_value_heads"])
    return config


def mlx_lm_text_config(text_config: Dict) -> Dict:
    """A Gemma 4 text config as mlx-lm's `gemma4_text` reads it: the published form, and a
    `gemma4_unified_text` (12B) config mapped onto `gemma4_text`."""
    config = published_text_config(text_config)
    if config.get("model_type") == "gemma4_unified_text":
        config = {**UNIFIED_TEXT_DEFAULTS, **config, **UNIFIED_TEXT_ABSENT, "model_type": "gemma4_text"}
    return config


def load_safetensors(path: Path) -> Dict[str, mx.array]:
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weight files")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(f))
        except Exception as e:
            raise unreadable_weights(f, e) from e
    return weights


def unreadable_weights(file, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{file} could not be read ({error}); the file may be truncated: download or convert it again"
    )


def weights_load_error(path: Path, pattern: str, error: Exception) -> CheckpointError:
    """The clear error for a failed load of the weights `path/pattern`: the first file that
    cannot be read in full, else what the loader said."""
    files = sorted(glob.glob(str(path / pattern)))
    if not files:
        return CheckpointError(f"{path} has no {pattern} weight files")
    for f in files:
        try:
            mx.eval(list(mx.load(f).values()))
        except Exception as e:
            return unreadable_weights(f, e)
    return CheckpointError(
        f"{path}: the weights could not be loaded ({type(error).__name__}: {error}); "
        "check that they match its config.json, or download or convert it again"
    )


def kv_heads(text_config, layer_type: str) -> int:
    """K/V heads of a layer type (full layers of K=V models use the global head count)."""
    if (
        layer_type == "full_attention"
        and text_config.attention_k_eq_v
        and text_config.num_global_key_value_heads is not None
    ):
        return text_config.num_global_key_value_heads
    return text_config.num_key_value_heads


def head_dim(text_config, layer_type: str) -> int:
    if layer_type == "full_attention" and text_config.global_head_dim:
        return text_config.global_head_dim
    return text_config.head_dim


def quantization(config: Dict) -> Optional[Dict]:
    return config.get("quantization") or config.get("quantization_config")
