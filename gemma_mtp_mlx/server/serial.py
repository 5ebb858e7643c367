"""One request at a time behind the batch engine's interface.

`SerialEngine` has the interface of the batched engine (`insert`, `remove`, `step`,
`has_work`, `num_active`, `num_waiting`; mlx-lm's BatchGenerator shape) but runs one row
at a time through `stream_generate`; the others wait their turn. `step()` runs one
speculative round of the active row. The server drives either engine the same way.

Prompt caching lives here: a row's cache comes from the `PromptCache` when one holds a
prefix of its prompt, and goes back into it when the row ends.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional, Tuple

import mlx.core as mx

from ..generate import GenerationResponse, make_prompt_cache, stream_generate
from ..sampling import Sampling
from .prompt_cache import PromptCache

# Per-request num_draft_tokens may go up to this; caches are made to roll back that far.
MAX_DRAFT_TOKENS = 16


@dataclass
class RowEvent:
    """What one row produced in one step (one round)."""

    uid: int
    tokens: List[int]
    logprobs: List[float]  # each token's log-probability under the target's processed distribution
    top_logprobs: List[List[Tuple[int, float]]]  # per token: the n most likely (token, logprob)
    from_draft: List[bool]
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length" on the row's last event
    # The first event: {"cached_tokens": n}; the last: SpeculativeStats.to_dict() as well.
    stats: Optional[dict] = None


class TopLogprobs:
    """A logits processor that changes nothing and remembers, by history length, the
    logits each position got, so the n most likely tokens of the target's processed
    distribution can be read once a token is emitted.

    Drafter positions pass through processors too, but the target's verify pass of the
    same position comes later and overwrites them.
    """

    def __init__(self, n: int, sampling: Sampling):
        self.n = n
        self.sampling = sampling  # the request's options, without processors
        self.rows: Dict[int, mx.array] = {}

    def __call__(self, seen: mx.array, logits: mx.array) -> mx.array:
        self.rows[seen.size] = logits
        return logits

    def take(self, length: int) -> List[Tuple[int, float]]:
        """The top n for the token that followed `length` tokens of history."""
        logprobs = self.sampling.process(None, None, self.rows.pop(length))[0]  # [V]
        for old in [k for k in self.rows if k < length]:
            del self.rows[old]
        top = mx.argpartition(-logprobs, self.n - 1)[: self.n]
        values = logprobs[top]
        order = mx.argsort(-values)
        return list(zip(top[order].tolist(), values[order].tolist()))


@dataclass
class _Row:
    uid: int
    prompt: List[int]
    options: dict
    top_logprobs: int
    cached: int = 0
    cache: Optional[List] = None
    stream: Optional[Iterator[GenerationResponse]] = None
    spy: Optional[TopLogprobs] = None
    tokens: List[int] = field(default_factory=list)


class SerialEngine:
    def __init__(self, model, tokenizer, draft_model=None, *, num_draft_tokens: Optional[int] = None,
                 max_batch_size: int = 1, prefill_step_size: int = 512,
                 prompt_cache: Optional[PromptCache] = None):
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.num_draft_tokens = num_draft_tokens
        self.max_batch_size = 1  # serial: one row at a time, whatever was asked
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache(0, 0)
        self.waiting: Deque[_Row] = deque()
        self.active: Optional[_Row] = None
        self._next_uid = 0

    @property
    def has_work(self) -> bool:
        return self.active is not None or bool(self.waiting)

    @property
    def num_active(self) -> int:
        return int(self.active is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def insert(self, prompt_ids: List[int], *, max_tokens: int, temp: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, min_p: float = 0.0, min_tokens_to_keep: int = 1,
               logits_processors: Optional[List[Callable]] = None, seed: Optional[int] = None,
               num_draft_tokens: Optional[int] = None, top_logprobs: int = 0) -> int:
        k = self.num_draft_tokens if num_draft_tokens is None else num_draft_tokens
        options = dict(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                       min_tokens_to_keep=min_tokens_to_keep, logits_processors=list(logits_processors or []),
                       seed=seed, num_draft_tokens=k if self.draft_model is not None else None)
        Sampling(temp, top_p, top_k, min_p, min_tokens_to_keep)  # raises on bad values now, not mid-step
        uid = self._next_uid
        self._next_uid += 1
        self.waiting.append(_Row(uid, list(prompt_ids), options, top_logprobs))
        return uid

    def remove(self, uid: int) -> None:
        if self.active is not None and self.active.uid == uid:
            self._finish()
        else:
            self.waiting = deque(r for r in self.waiting if r.uid != uid)

    def step(self) -> List[RowEvent]:
        if self.active is None:
            if not self.waiting:
                return []
            self._start(self.waiting.popleft())
        row = self.active
        event = RowEvent(row.uid, [], [], [], [],
                         stats={"cached_tokens": row.cached} if not row.tokens else None)
        try:
            self._round(row, event)
        except Exception:  # the row's cache is in an unknown state: drop it, keep nothing
            self.active = None
            raise
        return [event]

    def _round(self, row: _Row, event: RowEvent) -> None:
        for response in row.stream:  # one round: accepted drafts, then the target's own token
            row.tokens.append(response.token)
            event.tokens.append(response.token)
            event.logprobs.append(response.logprob)
            event.from_draft.append(response.from_draft)
            if row.spy is not None:
                history = len(row.prompt) - row.cached + len(row.tokens) - 1
                event.top_logprobs.append(row.spy.take(history))
            if response.finish_reason:
                event.finish_reason = response.finish_reason
                event.stats = dict(event.stats or {}, **response.stats.to_dict(), cached_tokens=row.cached)
                self._finish()
                break
            if not response.from_draft:
                break

    def _start(self, row: _Row) -> None:
        options = dict(row.options)
        if not options["logits_processors"]:  # penalties read the history, which a cache hides
            row.cache, row.cached = self.prompt_cache.fetch(row.prompt)
        if row.cache is None:
            row.cache = make_prompt_cache(self.model, MAX_DRAFT_TOKENS)
        if row.top_logprobs:
            sampling = Sampling(options["temp"], options["top_p"], options["top_k"], options["min_p"],
                                options["min_tokens_to_keep"])
            row.spy = TopLogprobs(row.top_logprobs, sampling)
            options["logits_processors"] = options["logits_processors"] + [row.spy]
        row.stream = stream_generate(self.model, self.tokenizer, row.prompt[row.cached:],
                                     draft_model=self.draft_model, prompt_cache=row.cache,
                                     prefill_step_size=self.prefill_step_size, **options)
        self.active = row

    def _finish(self) -> None:
        """End the active row; its cache (rolled back to what was handed out) is kept."""
        row, self.active = self.active, None
        if row.stream is None:
            return
        row.stream.close()
        if row.tokens:  # the cache holds the prompt and every token but the newest
            self.prompt_cache.store(row.prompt + row.tokens[:-1], row.cache)
