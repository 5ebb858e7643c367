"""The Python API: `load`, `stream_generate`, `generate`, shaped like mlx-lm's."""

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Generator, List, Optional, Union

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .adaptive import AUTO, AUTO_MAX_DRAFT_TOKENS, DraftLengthController
from .cache import SlidingKVCache, rollback_cache, rollback_needed
from .checkpoint import resolve_path
from .drafter import Drafter, check_pair, load_drafter
from .sampling import Sampling
from .speculative import Round, generate_rounds
from .target import Target, load_target


@dataclass
class SpeculativeStats:
    """Counts over the rounds whose tokens were handed out."""

    num_draft_tokens: int = 0  # k; with `auto`, the most a round may draft
    auto: bool = False  # k chosen per round (num_draft_tokens="auto")
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
    rounds_by_k: List[int] = field(default_factory=list)  # rounds that drafted k tokens, k = 0..

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
                dict(position=round_.position, k=round_.k, drafted=round_.drafted, accepted=round_.accepted,
                     emitted=round_.emitted, prefill=round_.from_prefill)
            )
        if round_.from_prefill:
            return
        self.rounds += 1
        self.rounds_by_k[round_.k] += 1
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


def make_prompt_cache(model, num_draft_tokens: Union[int, str] = 16) -> List:
    """A cache to carry across calls (chat turns); rolls back up to `num_draft_tokens`
    ("auto": the most that `num_draft_tokens="auto"` drafts)."""
    return _as_target(model).make_cache(AUTO_MAX_DRAFT_TOKENS if num_draft_tokens == AUTO else num_draft_tokens)


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


def encode_prompt(tokenizer: TokenizerWrapper, prompt: Union[str, List[int], mx.array]) -> mx.array:
    """Token ids of a prompt; text gets the BOS token unless it starts with one."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty: give some text or at least one token")
        bos = tokenizer.bos_token
        prompt = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    prompt = mx.array(prompt).reshape(-1)
    if prompt.size == 0:
        raise ValueError("the prompt is empty: give some text or at least one token")
    return prompt


def _draft_length(target: Target, draft_model, num_draft_tokens) -> Union[int, str, DraftLengthController]:
    if draft_model is None:
        return 0
    if isinstance(draft_model, Drafter):  # test doubles only need a `draft` method
        check_pair(target, draft_model)
    k = draft_model.default_num_draft_tokens if num_draft_tokens is None else num_draft_tokens
    if k == AUTO or isinstance(k, DraftLengthController):
        return k
    if isinstance(k, str) or k < 1:
        raise ValueError(f"num_draft_tokens must be at least 1 (or {AUTO!r}), got {k!r}")
    return k


def _widest(k: Union[int, str, DraftLengthController]) -> int:
    """The most drafts a round may use."""
    if isinstance(k, DraftLengthController):
        return k.max_k
    return AUTO_MAX_DRAFT_TOKENS if k == AUTO else k


def _room(cache: List) -> Optional[int]:
    """The most draft tokens a round may use with `cache` (None: no limit)."""
    reserved = min((c.rollback for c in cache if isinstance(c, SlidingKVCache)), default=None)
    return None if reserved is None else reserved // 2 - 1  # inverse of rollback_needed


def _controller(target: Target, drafter, sampling: Sampling, cache: List) -> DraftLengthController:
    """The `auto` controller of this pair and kind of sampling, kept on the drafter so that
    what it measured carries over to the next call; its widest round fits `cache`."""
    room = _room(cache)
    max_k = AUTO_MAX_DRAFT_TOKENS if room is None else max(0, min(AUTO_MAX_DRAFT_TOKENS, room))
    controllers = vars(drafter).setdefault("_auto_draft_length", {})
    key = (id(target.model), sampling.exact_distribution, sampling.draft_mode, max_k)
    if key not in controllers:
        controllers[key] = DraftLengthController(max_k)
    return controllers[key]


def _check_rollback_room(cache: List, k: int) -> None:
    if not all(isinstance(c, (KVCache, SlidingKVCache)) for c in cache):
        raise ValueError(
            "prompt_cache must come from gemma_mtp_mlx.make_prompt_cache "
            "(mlx-lm's rotating cache cannot roll back rejected drafts)"
        )
    room = _room(cache)
    if room is not None and room < k:
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
) -> Generator[GenerationResponse, None, None]:
    """Generate from `prompt`, one response per token.

    With `draft_model` the target verifies the drafter's proposals (output identical to
    the target alone); without it this is plain target decoding through the same loop.
    `num_draft_tokens`: drafts per round (default: the drafter's own number), or "auto":
    each round's k (0 = plain decoding) chosen from the acceptance and round times
    measured so far by a controller kept with the drafter (adaptive.py), or such a
    `DraftLengthController` of your own.
    `prompt_cache` (from `make_prompt_cache`) keeps K/V across calls: pass only the new
    tokens then (if a call stops before its first token, the cache may hold part of its
    prompt: make a new one). Sampling options are mlx-lm's (`temp=0` is greedy); speculative sampling
    keeps the target's distribution exactly. `draft_mode` is "sampled" (drafts drawn from
    the drafter's distribution) or "greedy" (its argmax). `seed` makes a run reproducible.
    """
    target = _as_target(model)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    k = _draft_length(target, draft_model, num_draft_tokens)
    sampling = Sampling(temp, top_p, top_k, min_p, min_tokens_to_keep, sampler,
                        list(logits_processors or []), draft_mode)
    prompt = encode_prompt(tokenizer, prompt)
    if seed is not None:
        mx.random.seed(seed)
    cache = prompt_cache if prompt_cache is not None else target.make_cache(_widest(k))
    if k == AUTO:
        k = _controller(target, draft_model, sampling, cache)
    max_k = _widest(k)
    _check_rollback_room(cache, max_k)
    start_offset = cache[0].offset if cache else 0

    stats = SpeculativeStats(
        num_draft_tokens=max_k,
        auto=isinstance(k, DraftLengthController),
        rounds_by_k=[0] * (max_k + 1),
        accepted_by_position=[0] * max_k,
        drafted_by_position=[0] * max_k,
        prompt_tokens=prompt.size,
        rounds_log=[] if record_rounds else None,
    )
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    eos = set(tokenizer.eos_token_ids)
    rounds = generate_rounds(prompt, target, cache, sampling, draft_model, k, prefill_step_size)
    tic = time.perf_counter()
    n = 0
    try:
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
                if finish:
                    return
    finally:
        rounds.close()
        # Keep K/V for every token handed out except the newest, as mlx-lm does.
        rollback_cache(cache, start_offset + prompt.size + max(n - 1, 0))


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
