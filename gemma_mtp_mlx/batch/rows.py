"""The batch's rows: each row's own state, the active rows' state on the device, and the
events rows hand out.

`ActiveRows` owns everything per active row that a round reads and writes: the rows, their
ragged K/V caches, and (on the device, one row each) the newest token, the target state
that produced it, the random key and the drafts the queued round will reject. Rows join
it after their prefill and leave it when they finish or are removed; every array moves
with them. `emit` turns one row's judged round into the tokens it hands out and records
its statistics.
"""

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

from ..adaptive import AUTO, AUTO_MAX_DRAFT_TOKENS
from ..generate import until_stop
from ..sampling import Sampling
from ..speculative import Round
from ..stats import SpeculativeStats
from .cache import RaggedKVCache, make_batch_cache


@dataclass
class RowEvent:
    """The tokens one row produced in one step."""

    uid: int
    tokens: List[int]
    logprobs: List[float]  # each token's log-probability under the target's processed distribution
    top_logprobs: List[List[Tuple[int, float]]]  # per token, when asked for at insert
    from_draft: List[bool]
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length" (max_tokens)
    stats: Optional[SpeculativeStats] = None  # on the finishing event
    cached_tokens: Optional[int] = None  # on the first event: prompt tokens taken from the prompt cache
    drafted: int = 0  # drafts the target judged this round (with `auto`, each round its own k)
    round: Optional[Round] = None  # the round these tokens come from, as the row's stats recorded it


@dataclass
class Row:
    uid: int
    prompt: mx.array  # [P] token ids
    max_tokens: int
    sampling: Sampling
    k: int  # draft length (of the next round, with `auto`)
    key: mx.array  # its own random key until it joins; then the `ActiveRows.keys` row holds it
    top_logprobs: int
    stats: SpeculativeStats
    prefilled: int = 0  # prompt tokens in the cache
    prefill_time: float = 0.0
    first_token_time: float = 0.0
    token: int = -1  # the newest token (its device copy is the `ActiveRows.tokens` row)
    history: Optional[List[int]] = None  # the tokens before `token`, kept for logits processors
    output: List[int] = field(default_factory=list)  # the tokens handed out
    cached: int = 0  # prompt tokens that came from the prompt cache
    auto: bool = False  # k chosen each round by the engine's controller

    @classmethod
    def new(cls, uid: int, prompt: mx.array, max_tokens: int, sampling: Sampling, k, seed: Optional[int],
            top_logprobs: int) -> "Row":
        """A row drafting `k` (a number, or "auto"), drawing from `seed` (None: a random one)."""
        seed = int(mx.random.randint(0, 2**31 - 1).item()) if seed is None else seed
        auto = k == AUTO
        stats = SpeculativeStats.empty(AUTO_MAX_DRAFT_TOKENS if auto else k, prompt.size, auto=auto)
        return cls(uid, prompt, max_tokens, sampling, 0 if auto else k, mx.random.key(seed), top_logprobs, stats,
                   auto=auto)

    @property
    def generated(self) -> int:
        return len(self.output)

    @property
    def verified(self) -> List[int]:
        """The tokens the row's cache holds: all but the newest."""
        return self.prompt.tolist() + self.output[:-1]

    @property
    def position(self) -> int:
        """Position of `token`: the row's verified length."""
        return self.prompt.size + self.generated - 1

    @property
    def options(self) -> tuple:
        """Rows with equal options are judged in one vectorised computation; rows with
        logits processors (which read each row's own history) are judged alone."""
        s = self.sampling
        if s.logits_processors:
            return ("row", self.uid)
        return (s.temp, s.top_p, s.top_k, s.min_p, s.min_tokens_to_keep, s.draft_mode, self.k, self.top_logprobs)


class ActiveRows:
    """The rows generating now, their caches, and their per-row arrays on the device."""

    def __init__(self, args):
        self.args = args  # the target's
        self.clear()

    def clear(self) -> None:
        self.rows: List[Row] = []
        self.cache: List[RaggedKVCache] = make_batch_cache(self.args, rows=0)
        # Per row, on the device: its newest token [B], the target state that produced it
        # [B, 1, hidden], its random key [B, 2], and (int32 [B], None when every row is
        # settled) the drafts the queued round will reject, which its cache lengths count.
        self.tokens = self.hidden = self.keys = self.unsettled = None

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, keep: List[int]) -> None:
        """Keep only the rows at `keep` (in that order), with their caches and arrays."""
        self.rows = [self.rows[i] for i in keep]
        for c in self.cache:
            c.take(keep)
        if keep:
            index = mx.array(keep)
            self.tokens, self.hidden, self.keys = self.tokens[index], self.hidden[index], self.keys[index]
            if self.unsettled is not None:
                self.unsettled = self.unsettled[index]
        else:
            self.tokens = self.hidden = self.keys = self.unsettled = None

    def join(self, rows: List[Row], cache: List[RaggedKVCache], tokens: mx.array, hidden: mx.array,
             keys: mx.array) -> None:
        """Rows after their prefill: their cache rows `cache`, newest tokens [J], states
        [J, 1, hidden] and keys [J, 2]. They join settled."""
        self.rows += rows
        for c, row_cache in zip(self.cache, cache):
            c.extend(row_cache)
        old = (self.tokens, self.hidden, self.keys)
        self.tokens, self.hidden, self.keys = (n if o is None else mx.concatenate([o, n])
                                               for o, n in zip(old, (tokens, hidden, keys)))
        if self.unsettled is not None:
            self.unsettled = mx.concatenate([self.unsettled, mx.zeros((len(rows),), mx.int32)])

    def queues_ahead(self, compiled) -> bool:
        """Whether the next round may be queued before the last one's outcome is read: no
        row has logits processors and the compiled forward takes the widest round."""
        if any(r.sampling.logits_processors for r in self.rows):
            return False
        widest = AUTO_MAX_DRAFT_TOKENS if any(r.auto for r in self.rows) else max(r.k for r in self.rows)
        return compiled.handles_length(widest + 1, self.cache)

    def set_lengths(self, lengths: Sequence[int]) -> None:
        for c in self.cache:
            c.set_lengths(lengths)


def may_end_every_row(rows: List[Row], ks: List[int]) -> bool:
    """Whether a round drafting `ks` for `rows` may hand every row its last token (its
    max_tokens; an EOS cannot be foreseen)."""
    return all(row.max_tokens - row.generated <= k + 1 for row, k in zip(rows, ks))


def first_events(rows: List[Row], members: List[List[int]], judged: list, eos: set) -> List[Tuple[int, RowEvent]]:
    """Each row's first event, from its group's judged first token (`members`: the rows'
    indices per group), as (row index, event) in row order."""
    events = []
    for group, j in zip(members, judged):
        for i, values in zip(group, j.lists()):
            rows[i].first_token_time = time.perf_counter()
            event = emit(rows[i], rows[i].k, eos, *values, from_prefill=True)
            event.cached_tokens = rows[i].cached
            events.append((i, event))
    return sorted(events, key=lambda e: e[0])


def emit(row: Row, k: int, eos: set, drafted: List[int], n: int, choices: List[int], logprobs: List[float],
         top_ids: List, top_values: List, from_prefill: bool = False) -> RowEvent:
    """Hand out a round of `k` drafts' tokens, cut after EOS or at max_tokens; record its stats."""
    emitted = drafted[:n] + [choices[n]]
    round_ = until_stop(Round(row.position, drafted, n, emitted, logprobs[: n + 1], from_prefill, k),
                        eos, row.max_tokens - row.generated)
    row.stats.record(round_)
    if row.sampling.logits_processors:
        row.history = row.prompt.tolist() if from_prefill else row.history + [row.token] + drafted[:n]
    row.output += round_.emitted
    row.token = emitted[-1]
    finish = "stop" if round_.emitted[-1] in eos else "length" if row.generated >= row.max_tokens else None
    top = [sorted(zip(i, v), key=lambda t: -t[1]) for i, v in zip(top_ids, top_values)]
    event = RowEvent(row.uid, round_.emitted, round_.logprobs, top[: len(round_.emitted)],
                     [i < round_.accepted for i in range(len(round_.emitted))], finish,
                     drafted=0 if from_prefill else len(round_.drafted), round=round_)
    if finish:
        stats = row.stats
        stats.generation_tokens = row.generated
        stats.generation_tps = row.generated / max(time.perf_counter() - row.first_token_time, 1e-9)
        stats.peak_memory = mx.get_peak_memory() / 1e9
        event.stats = stats
    return event
