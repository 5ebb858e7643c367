"""The Python API: `load`, `stream_generate`, `generate`, shaped like mlx-lm's."""

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Generator, List, Optional, Union

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import SlidingKVCache, rollback_cache, rollback_needed
from .cache_lease import Lease
from .checkpoint import resolve_path
from .drafter import Drafter, check_pair, load_drafter
from .sampling import Sampling
from .speculative import Round, generate_rounds
from .target import Target, load_target
from .validate import (MAX_NUM_DRAFT_TOKENS, InvalidInput, check_int, check_max_tokens, check_num_draft_tokens,
                       check_prompt, check_token_ids, generation_budget)


@dataclass
class SpeculativeStats:
    """Counts over the rounds whose tokens were handed out."""

    num_draft_tokens: int = 0
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    fallback_rounds: int = 0  # rounds where no draft was accepted
    accepted_by_position: List[int] = field(default_factory=list)
    drafted_by_position: List[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    rounds_log: Optional[List[dict]] = None

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per round: accepted drafts per round + 1."""
        return self.accepted_tokens / self.rounds + 1 if self.rounds else 0.0

    @property
    def acceptance_by_position(self) -> List[float]:
        """Fraction of rounds drafting position i whose draft i was accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    @property
    def rejection_rate(self) -> float:
        drafted = self.drafted_tokens
        return (drafted - self.accepted_tokens) / drafted if drafted else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.fallback_rounds / self.rounds if self.rounds else 0.0

    def record(self, round_: Round) -> None:
        if self.rounds_log is not None:
            self.rounds_log.append(
                dict(position=round_.position, drafted=round_.drafted, accepted=round_.accepted,
                     emitted=round_.emitted, prefill=round_.from_prefill)
            )
        if round_.from_prefill:
            return
        self.rounds += 1
        self.drafted_tokens += len(round_.drafted)
        self.accepted_tokens += round_.accepted
        self.fallback_rounds += bool(round_.drafted) and round_.accepted == 0
        for i in range(len(round_.drafted)):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += i < round_.accepted

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["rounds_log"] is None:
            del d["rounds_log"]
        for name in ("mean_accepted_length", "acceptance_by_position", "rejection_rate", "fallback_rate"):
            d[name] = getattr(self, name)
        return d


@dataclass
class GenerationResponse:
    text: str  # the new text segment
    token: int
    logprob: float  # the token's log-probability under the target's processed distribution
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length" on the last response
    stats: Optional[SpeculativeStats] = None  # on the last response


PAIR_DRAFTER_DIR = "drafter"  # a converted pair keeps its drafter here, beside the target

# The default pair ships inside the package (Hugging Face layout); see
# scripts/train_default_pair.py and models/training.json.
MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "gemma-4-tiny-python"
DEFAULT_DRAFT_MODEL = MODELS_DIR / "gemma-4-tiny-python-assistant"
DEFAULT_PROMPTS_FILE = MODELS_DIR / "prompts.jsonl"  # held-out code, for benchmarks


def load(path_or_repo: Optional[str] = None, draft_model: Optional[str] = None):
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
    target, tokenizer = load_target(path)
    if draft_model is None and (path / PAIR_DRAFTER_DIR / "config.json").is_file():
        draft_model = path / PAIR_DRAFTER_DIR
    drafter = None
    if draft_model is not None:
        drafter = load_drafter(draft_model)
        check_pair(target, drafter)
    return target, tokenizer, drafter


def make_prompt_cache(model, num_draft_tokens: int = MAX_NUM_DRAFT_TOKENS) -> List:
    """A cache to carry across calls (chat turns); rolls back up to `num_draft_tokens`."""
    return _as_target(model).make_cache(num_draft_tokens)


def _as_target(model) -> Target:
    return model if isinstance(model, Target) else Target(model)


def chat_prompt(tokenizer, text: str, system: Optional[str] = None) -> Union[str, List[int]]:
    """`text` as a user turn (after an optional system turn) of the tokenizer's chat
    template, as token ids; the text itself when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return text
    system_turn = [{"role": "system", "content": system}] if system else []
    return tokenizer.apply_chat_template(
        system_turn + [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
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


def _draft_length(target: Target, draft_model, num_draft_tokens: Optional[int]) -> int:
    if draft_model is None:
        return 0
    if isinstance(draft_model, Drafter):  # test doubles only need a `draft` method
        check_pair(target, draft_model)
    if num_draft_tokens is None:
        return check_num_draft_tokens(draft_model.default_num_draft_tokens,
                                      "num_draft_tokens (the drafter's num_assistant_tokens)")
    return check_num_draft_tokens(num_draft_tokens)


def _check_rollback_room(target: Target, cache: List, k: int) -> None:
    if not isinstance(cache, list) or not all(isinstance(c, (KVCache, SlidingKVCache)) for c in cache):
        raise InvalidInput(
            "prompt_cache must come from gemma_mtp_mlx.make_prompt_cache "
            "(mlx-lm's rotating cache cannot roll back rejected drafts)"
        )
    if [type(c) for c in cache] != [type(c) for c in target.make_cache(0)]:
        raise InvalidInput("prompt_cache was made for another model: make it with make_prompt_cache(model)")
    reserved = min((c.rollback for c in cache if isinstance(c, SlidingKVCache)), default=None)
    if reserved is not None and reserved < rollback_needed(k):
        raise ValueError(
            f"prompt_cache was made for fewer draft tokens than {k}: "
            f"make it with make_prompt_cache(model, num_draft_tokens={k})"
        )


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int], mx.array],
    *,
    draft_model: Optional[Drafter] = None,
    max_tokens: int = 256,
    num_draft_tokens: Optional[int] = None,
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
) -> Generator[GenerationResponse, None, None]:
    """Generate from `prompt`, one response per token.

    With `draft_model` the target verifies the drafter's proposals (output identical to
    the target alone); without it this is plain target decoding through the same loop.
    `prompt_cache` (from `make_prompt_cache`) keeps K/V across calls: pass only the new
    tokens then (if a call stops before its first token, the cache may hold part of its
    prompt: make a new one). A cache serves one generation at a time (see cache_lease.py).
    Sampling options are mlx-lm's (`temp=0` is greedy); speculative sampling
    keeps the target's distribution exactly. `draft_mode` is "sampled" (drafts drawn from
    the drafter's distribution) or "greedy" (its argmax). `seed` makes a run reproducible,
    whatever runs beside it. Generation stops with finish_reason "length" at the model's
    context length. Bad arguments raise `validate.InvalidInput` (a ValueError).
    """
    target = _as_target(model)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    max_tokens = check_max_tokens(max_tokens)
    k = _draft_length(target, draft_model, num_draft_tokens)
    check_int("prefill_step_size", prefill_step_size, 1)
    sampling = Sampling(temp, top_p, top_k, min_p, min_tokens_to_keep, sampler,
                        list(logits_processors or []), draft_mode, seed)
    prompt = encode_prompt(tokenizer, prompt, target.vocab_size)
    if seed is not None and sampler is not None:
        mx.random.seed(seed)  # a custom sampler draws from MLX's global random state
    cache = prompt_cache if prompt_cache is not None else target.make_cache(k)
    _check_rollback_room(target, cache, k)
    lease = Lease.claim(cache)  # settles what a paused generation on this cache left
    start_offset = cache[0].offset
    n, rounds = 0, None
    try:
        max_tokens = generation_budget(prompt.size, start_offset, max_tokens,
                                       target.args.max_position_embeddings)
        stats = SpeculativeStats(
            num_draft_tokens=k,
            accepted_by_position=[0] * k,
            drafted_by_position=[0] * k,
            prompt_tokens=prompt.size,
            rounds_log=[] if record_rounds else None,
        )
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        eos = set(tokenizer.eos_token_ids)
        rounds = lease.rounds = generate_rounds(prompt, target, cache, sampling, draft_model, k,
                                                prefill_step_size)
        tic = time.perf_counter()
        for round_ in rounds:
            if n == 0:
                stats.prompt_tps = prompt.size / (time.perf_counter() - tic)
                tic = time.perf_counter()
            round_ = _until_stop(round_, eos, max_tokens - n)
            stats.record(round_)
            for i, (token, logprob) in enumerate(zip(round_.emitted, round_.logprobs)):
                n += 1
                finish = "stop" if token in eos else "length" if n == max_tokens else None
                if token not in eos:
                    detokenizer.add_token(token)
                if finish:
                    detokenizer.finalize()
                    stats.generation_tokens = n
                    stats.generation_tps = n / (time.perf_counter() - tic)
                    stats.peak_memory_gb = mx.get_peak_memory() / 1e9
                lease.pause(start_offset + prompt.size + n - 1)
                yield GenerationResponse(
                    text=detokenizer.last_segment,
                    token=token,
                    logprob=logprob,
                    from_draft=i < round_.accepted,
                    prompt_tokens=prompt.size,
                    prompt_tps=stats.prompt_tps,
                    generation_tokens=n,
                    generation_tps=n / (time.perf_counter() - tic),
                    peak_memory=mx.get_peak_memory() / 1e9,
                    finish_reason=finish,
                    stats=stats if finish else None,
                )
                lease.resume()
                if finish:
                    return
    finally:
        if lease.owned:  # else a later generation took the cache and settled it
            if rounds is not None:
                rounds.close()
            # Keep K/V for every token handed out except the newest, as mlx-lm does.
            rollback_cache(cache, start_offset + prompt.size + max(n - 1, 0))
            lease.release()


def _until_stop(round_: Round, eos, budget: int) -> Round:
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
