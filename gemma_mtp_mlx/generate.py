"""The Python API: `stream_generate` and `generate`, shaped like mlx-lm's (`load` is in loading.py)."""

import time
from dataclasses import dataclass, replace
from typing import Callable, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .adaptive import AUTO, AUTO_MAX_DRAFT_TOKENS, DraftLengthController
from .cache import SlidingKVCache, rollback_cache
from .cache_lease import Lease
from .quantized_cache import QuantizedFullKVCache
from .drafter import Drafter, check_pair
from .loading import as_target
from .media.merge import MediaPrompt
from .sampling import Sampling
from .speculative import Round, generate_rounds
from .stats import SpeculativeStats
from .structured.grammar import with_grammar
from .validate import (MAX_NUM_DRAFT_TOKENS, InvalidInput, check_int, check_max_tokens, check_num_draft_tokens,
                       check_prompt, check_token_ids, generation_budget)


@dataclass
class GenerationResponse:
    """One generated token, shaped like mlx-lm's `GenerationResponse`, with two differences:
    `logprob` is this token's log-probability (a float), where mlx-lm's `logprobs` is the
    whole distribution (an array [vocab]); and the last response carries `stats`.
    `from_draft` is True for a draft the target accepted."""

    text: str  # the new text segment
    token: int
    logprob: float  # the token's log-probability under the target's processed distribution
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length" on the last response
    stats: Optional[SpeculativeStats] = None  # on the last response


def make_prompt_cache(model, num_draft_tokens: Union[int, str] = MAX_NUM_DRAFT_TOKENS, kv_bits: Optional[int] = None,
                      kv_group_size: int = 64, quantized_kv_start: int = 0) -> List:
    """A cache to carry across calls (chat turns); rolls back up to `num_draft_tokens`
    ("auto": the most that `num_draft_tokens="auto"` drafts). `kv_bits` (4 or 8): the
    full-attention layers' K/V quantized after the first `quantized_kv_start` positions."""
    return as_target(model).make_cache(AUTO_MAX_DRAFT_TOKENS if num_draft_tokens == AUTO else num_draft_tokens,
                                       kv_bits=kv_bits, kv_group_size=kv_group_size,
                                       quantized_kv_start=quantized_kv_start)


def chat_prompt(tokenizer, text: str, system: Optional[str] = None, thinking: bool = False) -> Union[str, List[int]]:
    """`text` as a user turn (after an optional system turn) of the tokenizer's chat
    template, as token ids; the text itself when the tokenizer has no template. `thinking`:
    ask the template for the thought channel (off unless asked, whatever mlx-lm's default)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return text
    system_turn = [{"role": "system", "content": system}] if system else []
    return tokenizer.apply_chat_template(
        system_turn + [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
        enable_thinking=thinking,
    )


def encode_prompt(tokenizer: TokenizerWrapper, prompt: Union[str, List[int], mx.array],
                  vocab_size: Optional[int] = None) -> mx.array:
    """Token ids of a prompt; text gets the BOS token unless it starts with one. With
    `vocab_size`, every id must be inside the vocabulary."""
    prompt = check_prompt(prompt)
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        prompt = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
        if not prompt:
            raise InvalidInput("the prompt is empty: give some text or at least one token")
    if vocab_size is not None:
        check_token_ids(prompt, vocab_size)
    return mx.array(prompt)


def with_images(target, prompt: mx.array, images: Optional[Sequence]) -> Tuple[mx.array, Optional[MediaPrompt]]:
    """The prompt with its image placeholders expanded, and its images' soft tokens (None
    without images). Image placeholders without images are an error, as are images for a
    text-only target."""
    if target.vision is None:
        if not images:
            return prompt, None
        raise InvalidInput(f"this model reads {' and '.join(target.modalities)} only (its checkpoint has no vision "
                           "tower): load a multimodal Gemma 4 checkpoint to give it images")
    if not images and not (prompt == target.vision.image_token_id).any().item():
        return prompt, None
    try:
        ids, media = target.vision.prepare(prompt.tolist(), images or [])
    except ValueError as e:
        raise InvalidInput(str(e)) from e
    return mx.array(ids, dtype=prompt.dtype), media


def draft_length(model, draft_model, num_draft_tokens) -> Union[int, str, DraftLengthController]:
    """The draft length k of every round (`num_draft_tokens`, else the drafter's default),
    or "auto" / a controller that picks each round's k; 0 without a drafter."""
    if draft_model is None:
        return 0
    if isinstance(draft_model, Drafter):  # test doubles only need a `draft` method
        check_pair(as_target(model), draft_model)
    if num_draft_tokens == AUTO or isinstance(num_draft_tokens, DraftLengthController):
        return num_draft_tokens
    if num_draft_tokens is None:
        return check_num_draft_tokens(draft_model.default_num_draft_tokens,
                                      "num_draft_tokens (the drafter's num_assistant_tokens)")
    return check_num_draft_tokens(num_draft_tokens)


def _widest(k: Union[int, str, DraftLengthController]) -> int:
    """The most drafts a round may use."""
    if isinstance(k, DraftLengthController):
        return k.max_k
    return AUTO_MAX_DRAFT_TOKENS if k == AUTO else k


def _room(cache: List) -> Optional[int]:
    """The most draft tokens a round may use with `cache` (None: no limit)."""
    reserved = min((c.rollback for c in cache if isinstance(c, SlidingKVCache)), default=None)
    return None if reserved is None else reserved // 2 - 1  # inverse of rollback_needed


def _controller(target, drafter, sampling: Sampling, cache: List) -> DraftLengthController:
    """The `auto` controller of this pair and kind of sampling, kept on the drafter so that
    what it measured carries over to the next call; its widest round fits `cache`."""
    room = _room(cache)
    max_k = AUTO_MAX_DRAFT_TOKENS if room is None else max(0, min(AUTO_MAX_DRAFT_TOKENS, room))
    controllers = vars(drafter).setdefault("_auto_draft_length", {})
    key = (id(target.model), sampling.exact_distribution, sampling.draft_mode, max_k)
    if key not in controllers:
        controllers[key] = DraftLengthController(max_k)
    return controllers[key]


def _check_rollback_room(target, cache: List, k: int) -> None:
    if not isinstance(cache, list) or not all(isinstance(c, (KVCache, SlidingKVCache, QuantizedFullKVCache)) for c in cache):
        raise InvalidInput(
            "prompt_cache must come from gemma_mtp_mlx.make_prompt_cache "
            "(mlx-lm's rotating cache cannot roll back rejected drafts)"
        )
    if [_kind(c) for c in cache] != [_kind(c) for c in target.make_cache(0)]:
        raise InvalidInput("prompt_cache was made for another model: make it with make_prompt_cache(model)")
    room = _room(cache)
    if room is not None and room < k:
        raise ValueError(
            f"prompt_cache was made for fewer draft tokens than {k}: "
            f"make it with make_prompt_cache(model, num_draft_tokens={k})"
        )


def _kind(c) -> type:
    """A cache's kind for matching it to a model: quantized full attention counts as full."""
    return KVCache if isinstance(c, QuantizedFullKVCache) else type(c)


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int], mx.array],
    *,
    draft_model: Optional[Drafter] = None,
    max_tokens: int = 256,
    num_draft_tokens: Union[int, str, DraftLengthController, None] = None,
    prompt_cache: Optional[List] = None,
    prefill_step_size: int = 512,
    record_rounds: bool = False,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable]] = None,
    draft_mode: str = "sampled",
    seed: Optional[int] = None,
    response_format: Optional[dict] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    images: Optional[Sequence] = None,
) -> Generator[GenerationResponse, None, None]:
    """Generate from `prompt`, one response per token.

    With `draft_model` the target verifies the drafter's proposals (output identical to
    the target alone); without it this is plain target decoding through the same loop.
    `num_draft_tokens`: drafts per round (default: the drafter's own), or "auto" (each
    round's k, 0 = plain, chosen by a controller kept with the drafter; adaptive.py), or a
    `DraftLengthController`. `prompt_cache` (from `make_prompt_cache`) keeps K/V across
    calls: pass only the new tokens then (a call that stops before its first token may
    leave part of its prompt there); one generation at a time (cache_lease.py). Sampling
    options are mlx-lm's (`temp=0` is greedy), kept exact under speculation; `draft_mode`
    "sampled" draws drafts from the drafter, "greedy" takes its argmax; `seed` makes a run
    reproducible whatever runs beside it. `response_format`: a JSON schema, regex or Lark
    grammar (structured/grammar.py). `kv_bits` (4 or 8): the full-attention K/V quantized
    after `quantized_kv_start` positions, for a cache made here (quantized_cache.py).
    `images` (paths, bytes, PIL images or arrays) fill the prompt's image placeholders in
    order (media/images.py). finish_reason "length": max_tokens (also inside a structure)
    or the context length. Bad arguments raise `validate.InvalidInput` (a ValueError).
    """
    target = as_target(model)
    tokenizer = tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
    max_tokens = check_max_tokens(max_tokens)
    k = draft_length(target, draft_model, num_draft_tokens)
    check_int("prefill_step_size", prefill_step_size, 1)
    processors = with_grammar(logits_processors, tokenizer, response_format, target.vocab_size)
    sampling = Sampling(temp, top_p, top_k, min_p, min_tokens_to_keep, sampler, processors, draft_mode, seed)
    prompt = encode_prompt(tokenizer, prompt, target.vocab_size)
    prompt, media = with_images(target, prompt, images)
    if seed is not None and sampler is not None:
        mx.random.seed(seed)  # a custom sampler draws from MLX's global random state
    kv = dict(kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)
    cache = prompt_cache if prompt_cache is not None else target.make_cache(_widest(k), **kv)
    if k == AUTO:
        k = _controller(target, draft_model, sampling, cache)
    max_k = _widest(k)
    _check_rollback_room(target, cache, max_k)
    lease = Lease.claim(cache)  # settles what a paused generation on this cache left
    start = cache[0].offset
    rounds = None
    try:
        max_tokens = generation_budget(prompt.size, start, max_tokens, target.args.max_position_embeddings)
        stats = SpeculativeStats.empty(max_k, prompt.size, record_rounds, auto=isinstance(k, DraftLengthController))
        if media is not None:
            stats.media_tokens, stats.encoder_seconds = media.num_tokens, media.encoder_seconds
        rounds = lease.rounds = generate_rounds(prompt, target, cache, sampling, draft_model, k, prefill_step_size,
                                                max_tokens, media)
        yield from _responses(rounds, tokenizer, prompt.size, stats, max_tokens, lease, start)
    finally:
        if lease.owned:  # else a later generation took the cache and settled it
            if rounds is not None:
                rounds.close()
            # The one rollback when generation stops (the rounds only drop rejected drafts):
            # keep K/V for every token handed out except the newest, as mlx-lm does.
            rollback_cache(cache, start + prompt.size if lease.handed_out is None else lease.handed_out)
            lease.release()


def _responses(rounds, tokenizer: TokenizerWrapper, prompt_tokens: int, stats: SpeculativeStats, max_tokens: int,
               lease: Lease, start: int) -> Generator[GenerationResponse, None, None]:
    """One response per token of `rounds`, until EOS or `max_tokens`; before each is handed
    out, `lease` records the cache length that matches it (the prompt started at `start`)."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    eos = set(tokenizer.eos_token_ids)
    n = 0
    tic = time.perf_counter()
    for round_ in rounds:
        if n == 0:
            stats.prompt_tps = prompt_tokens / (time.perf_counter() - tic)
            tic = time.perf_counter()
        round_ = until_stop(round_, eos, max_tokens - n)
        stats.record(round_)
        for i, (token, logprob) in enumerate(zip(round_.emitted, round_.logprobs)):
            n += 1
            finish = "stop" if token in eos else "length" if n == max_tokens else None
            if token not in eos:
                detokenizer.add_token(token)
            if finish:
                detokenizer.finalize()
                stats.finish(n, time.perf_counter() - tic, mx.get_peak_memory() / 1e9)
            lease.pause(start + prompt_tokens + n - 1)
            yield GenerationResponse(
                detokenizer.last_segment, token, logprob, from_draft=i < round_.accepted,
                prompt_tokens=prompt_tokens, prompt_tps=stats.prompt_tps, generation_tokens=n,
                generation_tps=n / (time.perf_counter() - tic), peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish, stats=stats if finish else None,
            )
            lease.resume()
            if finish:
                return


def until_stop(round_: Round, eos, budget: int) -> Round:
    """The round cut after its first EOS or after `budget` tokens: what is handed out.

    A cut round ends inside its accepted drafts, so it counts as drafting only those.
    """
    used = min(len(round_.emitted), budget)
    for i, token in enumerate(round_.emitted[:used]):
        if token in eos:
            used = i + 1
            break
    if used == len(round_.emitted):
        return round_
    return replace(round_, drafted=round_.drafted[:used], accepted=used,
                   emitted=round_.emitted[:used], logprobs=round_.logprobs[:used])


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """`stream_generate` collected into one string."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
