"""What a caller may pass to generation, checked where requests enter.

`stream_generate`, the CLI and anything that takes requests from outside (a batch engine, a
server) call these with plain values. Each raises `InvalidInput` (a ValueError) whose
message says what was wrong and what to do, so a server can answer it as a bad request
and the CLI can print it as one line.
"""

import math
from numbers import Integral, Real
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

# The most tokens one round may draft. Published drafters ship with 4-6
# (`num_assistant_tokens`); the chance that every draft of a round is accepted falls
# geometrically with k, while each drafted token costs a verify position, a drafter step and
# two rolled-back cache slots. Past 16 a longer round only adds cost.
MAX_NUM_DRAFT_TOKENS = 16

SEED_LIMIT = 2**64  # seeds are 0 <= seed < 2**64 (what an MLX random key holds)


class InvalidInput(ValueError):
    """A request that cannot be run as given; the message says what to change."""


class ContextLengthExceeded(InvalidInput):
    """The prompt (with what the prompt cache already holds) fills the model's context."""


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, maximum: Optional[int] = None, why: str = "") -> int:
    """`value` as an int in [minimum, maximum]."""
    bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
    if not _is_int(value):
        raise InvalidInput(f"{name} must be a whole number {bound}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise InvalidInput(f"{name} must be {bound}{why}, got {value}")
    return int(value)


def check_finite(name: str, value) -> float:
    """`value` as a finite float (not NaN, not infinite)."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise InvalidInput(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number, got {value}")
    return float(value)


def check_sampling(temp, top_p, top_k, min_p, min_tokens_to_keep, draft_mode, draft_modes) -> None:
    """mlx-lm's sampling options: finite, in range, of the right type."""
    if check_finite("temp", temp) < 0:
        raise InvalidInput(f"temp must be >= 0 (0 is greedy), got {temp}")
    if not 0 < check_finite("top_p", top_p) <= 1:
        raise InvalidInput(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if not _is_int(top_k) or top_k < 0:
        raise InvalidInput(f"top_k must be >= 0 (0 disables it), got {top_k!r}")
    if not 0 <= check_finite("min_p", min_p) <= 1:
        raise InvalidInput(f"min_p must be in [0, 1] (0 disables it), got {min_p}")
    if not _is_int(min_tokens_to_keep) or min_tokens_to_keep < 1:
        raise InvalidInput(f"min_tokens_to_keep must be >= 1, got {min_tokens_to_keep!r}")
    if draft_mode not in draft_modes:
        raise InvalidInput(f"draft_mode must be one of {tuple(draft_modes)}, got {draft_mode!r}")


def check_penalties(repetition_penalty=None, presence_penalty=None, frequency_penalty=None) -> None:
    """mlx-lm's logits-processor penalties: None (off) or finite; repetition's > 0."""
    if repetition_penalty is not None and check_finite("repetition_penalty", repetition_penalty) <= 0:
        raise InvalidInput(f"repetition_penalty must be > 0 (1 is no penalty), got {repetition_penalty}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None:
            check_finite(name, value)


def check_max_tokens(max_tokens) -> int:
    if _is_int(max_tokens) and max_tokens <= 0:
        raise InvalidInput(f"max_tokens must be at least 1, got {max_tokens}")
    return check_int("max_tokens", max_tokens, 1)


def check_num_draft_tokens(k, source: str = "num_draft_tokens") -> int:
    if _is_int(k) and k < 1:
        raise InvalidInput(f"{source} must be at least 1, got {k}")
    return check_int(
        source, k, 1, MAX_NUM_DRAFT_TOKENS,
        why=" (drafters are trained for 4-6; longer rounds cost more than their acceptance pays back)",
    )


def check_seed(seed) -> Optional[int]:
    if seed is None:
        return None
    return check_int("seed", seed, 0, SEED_LIMIT - 1)


def check_text(text: str, what: str = "the prompt") -> str:
    """Text that can be tokenized: non-empty, valid Unicode (no lone surrogates, which is
    how Python carries bytes that were not UTF-8)."""
    if not text:
        raise InvalidInput(f"{what} is empty: give some text or at least one token")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(
            f"{what} is not valid text: character {e.start} is an undecodable byte "
            f"({text[e.start]!r}); give UTF-8 text"
        ) from None
    return text


def decode_text(data: bytes, what: str = "the prompt") -> str:
    """Bytes read from a file or stdin as UTF-8 text, or a clear error naming the offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(
            f"{what} is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}): "
            "give text, not binary data"
        ) from None


Prompt = Union[str, Sequence[int], mx.array, np.ndarray]


def check_prompt(prompt) -> Union[str, List[int]]:
    """A prompt of the accepted kinds: text, or a flat sequence of token ids (list, tuple,
    mx.array or numpy array of integers). Returns the text, or the ids as a list."""
    if isinstance(prompt, str):
        return check_text(prompt)
    if isinstance(prompt, (bytes, bytearray)):
        raise InvalidInput("the prompt is bytes: decode it to text (str) or give token ids")
    if isinstance(prompt, (mx.array, np.ndarray)):
        if prompt.ndim > 1 and prompt.size != prompt.shape[-1]:
            raise InvalidInput(f"token ids must be one sequence, got an array of shape {tuple(prompt.shape)}")
        integer = (mx.issubdtype(prompt.dtype, mx.integer) if isinstance(prompt, mx.array)
                   else prompt.dtype.kind in "iu")
        if not integer:
            raise InvalidInput(f"token ids must be integers, got an array of {prompt.dtype}")
        prompt = prompt.reshape(-1).tolist()
    elif not isinstance(prompt, (list, tuple)):
        raise InvalidInput(
            f"the prompt must be text (str) or a list of token ids, got {type(prompt).__name__}"
        )
    if len(prompt) == 0:
        raise InvalidInput("the prompt is empty: give some text or at least one token")
    for i, token in enumerate(prompt):
        if not _is_int(token):
            raise InvalidInput(f"token ids must be whole numbers, got {token!r} at index {i}")
    return [int(t) for t in prompt]


def check_token_ids(ids: Sequence[int], vocab_size: int) -> List[int]:
    """Every id inside the model's vocabulary [0, vocab_size)."""
    for i, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise InvalidInput(
                f"token id {token} at index {i} is outside the vocabulary (0 to {vocab_size - 1}): "
                "use ids from this model's tokenizer"
            )
    return list(ids)


def generation_budget(prompt_tokens: int, cached_tokens: int, max_tokens: int, context_length: int) -> int:
    """How many tokens may be generated: `max_tokens`, or fewer where the context ends.

    Refuses a prompt that (with the `cached_tokens` already in a prompt cache) leaves no
    room; otherwise generation stops with finish_reason "length" at the context limit.
    """
    room = context_length - cached_tokens - prompt_tokens
    if room < 1:
        held = f" plus {cached_tokens} already in the prompt cache" if cached_tokens else ""
        raise ContextLengthExceeded(
            f"the prompt has {prompt_tokens} tokens{held}, which leaves no room in the model's "
            f"context of {context_length} tokens: shorten the prompt"
            + (" or start with a new prompt cache" if cached_tokens else "")
        )
    return min(max_tokens, room)
