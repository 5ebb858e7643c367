"""`batch_generate`: many prompts at once through a `BatchEngine`, shaped like mlx-lm's."""

import functools
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..generate import encode_prompt
from ..stats import SpeculativeStats
from .engine import BatchEngine


@dataclass
class BatchResponse:
    """What `batch_generate` returns, shaped like mlx-lm's."""

    texts: List[str]
    stats: List[SpeculativeStats]  # per prompt
    pooled_stats: SpeculativeStats  # over every prompt; tokens/s of the whole batch
    finish_reasons: List[str]
    token_ids: Optional[List[List[int]]] = None  # with return_token_ids=True


def batch_generate(model, tokenizer, prompts: Sequence[Union[str, Sequence[int]]], *, draft_model=None,
                   max_tokens: Union[int, Sequence[int]] = 128, num_draft_tokens: Union[int, str, None] = None,
                   return_token_ids: bool = False, max_batch_size: Optional[int] = None,
                   prefill_step_size: int = 512, temp: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   min_p: float = 0.0, min_tokens_to_keep: int = 1,
                   logits_processors: Optional[List[Callable]] = None, draft_mode: str = "sampled",
                   seed: Optional[int] = None,
                   response_format: Union[dict, Sequence[Optional[dict]], None] = None) -> BatchResponse:
    """Generate for every prompt (text or token ids, any lengths) in one batch.

    Every row is exactly what `stream_generate` gives its prompt alone (greedy: token for
    token; sampling: the same distribution). `max_tokens` is one limit or one per prompt.
    `seed` makes the whole call reproducible. `response_format` (as `stream_generate`'s) is
    one for every prompt or a list with one per prompt (None: unconstrained).
    """
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of prompts (texts or token-id lists)")
    limits = _per_prompt("max_tokens", max_tokens, int, len(prompts))
    formats = _per_prompt("response_format", response_format, (dict, type(None)), len(prompts))
    tokenizer = tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
    encoded = []
    for i, prompt in enumerate(prompts):
        try:
            encoded.append(encode_prompt(tokenizer, prompt).tolist())
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
    if seed is not None:
        mx.random.seed(seed)
    engine = BatchEngine(model, tokenizer, draft_model, num_draft_tokens=num_draft_tokens,
                         max_batch_size=max_batch_size or len(prompts), prefill_step_size=prefill_step_size)
    options = dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, min_tokens_to_keep=min_tokens_to_keep,
                   logits_processors=logits_processors, draft_mode=draft_mode)
    uids = [engine.insert(p, max_tokens=n, response_format=f, **options) for p, n, f in zip(encoded, limits, formats)]
    tokens = {uid: [] for uid in uids}
    finished = {}
    tic = time.perf_counter()
    while engine.has_work:
        for event in engine.step():
            tokens[event.uid] += event.tokens
            if event.finish_reason:
                finished[event.uid] = event
    elapsed = time.perf_counter() - tic
    eos = set(tokenizer.eos_token_ids)
    token_ids = [tokens[uid] for uid in uids]
    texts = [tokenizer.decode([t for t in ids if t not in eos]) for ids in token_ids]
    stats = [finished[uid].stats for uid in uids]
    return BatchResponse(texts, stats, pooled(stats, elapsed), [finished[uid].finish_reason for uid in uids],
                         token_ids if return_token_ids else None)


def _per_prompt(name: str, value, single, count: int) -> list:
    """`value` for each of `count` prompts: one `single` value for all, or a list of them."""
    values = [value] * count if isinstance(value, single) else list(value)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values for {count} prompts: give one per prompt, or a single one")
    return values


def pooled(stats: List[SpeculativeStats], elapsed: float) -> SpeculativeStats:
    """Counts summed over rows; tokens/s of all rows together over `elapsed` seconds."""
    total = functools.reduce(SpeculativeStats.merge, stats)
    total.generation_tps = total.generation_tokens / elapsed if elapsed > 0 else 0.0
    return total
