"""Finding checkpoints and reading their configs and weights.

Google publishes Gemma 4 text configs with `global_head_dim` / `num_global_key_value_heads`;
transformers 5.x saves a `per_layer_config` map instead. Both are read here and turned into
the published form, which is what mlx-lm's `gemma4_text` understands.
"""

import glob
import json
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with what to do about it."""


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
