"""Loading a pair: `load`, the default pair that ships with the package, and what turns a
loaded model into the `Target` the generation loop drives."""

from pathlib import Path
from typing import Optional

from .checkpoint import resolve_path
from .drafter import check_pair, load_drafter
from .target import Target, load_target

PAIR_DRAFTER_DIR = "drafter"  # a converted pair keeps its drafter here, beside the target

# The default pair ships inside the package (Hugging Face layout); see
# scripts/train_default_pair.py and models/training.json.
MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "gemma-4-tiny-python"
DEFAULT_DRAFT_MODEL = MODELS_DIR / "gemma-4-tiny-python-assistant"
DEFAULT_PROMPTS_FILE = MODELS_DIR / "prompts.jsonl"  # held-out code, for benchmarks


def load(path_or_repo: Optional[str] = None, draft_model: Optional[str] = None, lazy: bool = False):
    """Load a target and its drafter: (model, tokenizer, draft_model or None).

    Without `path_or_repo`, the default pair that ships with the package (a tiny Gemma 4
    Python-code model and its MTP drafter). Without `draft_model`, a converted pair
    directory (one with a `drafter/` folder) brings its own drafter; any other target
    loads alone.
    """
    if path_or_repo is None:
        path_or_repo = DEFAULT_MODEL
        draft_model = DEFAULT_DRAFT_MODEL if draft_model is None else draft_model
    path = resolve_path(str(path_or_repo))
    target, tokenizer = load_target(path, lazy=lazy)
    if draft_model is None and (path / PAIR_DRAFTER_DIR / "config.json").is_file():
        draft_model = path / PAIR_DRAFTER_DIR
    drafter = None
    if draft_model is not None:
        drafter = load_drafter(draft_model)
        check_pair(target, drafter)
    return target, tokenizer, drafter


def as_target(model) -> Target:
    """The model from `load`, or a bare mlx-lm Gemma 4 model, as a `Target`."""
    return model if isinstance(model, Target) else Target(model)
