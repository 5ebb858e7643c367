"""Batched exact speculative decoding: many sequences per round, each one exactly what
single-stream decoding gives it.

`BatchEngine` (shaped like mlx-lm's `BatchGenerator`) keeps a batch of rows that join at
any round boundary (their prompts prefilled in chunks between rounds) and leave at any
time. One `step()` runs one round for every active row:

    draft K tokens for all rows (the drafter at each row's own position P, reading each
        row's own verified K/V through masks)
    verify: one target forward over [token, d1..dK] for all rows (per-row RoPE and masks)
    accept per row, with that row's sampling options, logits processors, random key and
        draft length (rows drafting fewer than K ignore the rest)
    roll back per row: each row's cache keeps exactly its verified positions

Rows never share a length: `RaggedKVCache` writes each row's entries after its own end,
so a rejected tail is dropped by that row alone. `batch_generate` is a loop over the engine.

Rounds are queued one ahead, as in single-stream decoding (speculative.py): a step queues
the next round before it reads the outcome of the round the step before queued, so the
device runs one round while the host builds the next. Each row's new position and write
slot subtract, on the device, the drafts the round before rejected (`unsettled`); the
caches' row lengths count them until they are read. A step therefore hands out the tokens
of the round queued by the step before it; a row that finishes there was already drafted
for once more, and that work is dropped. Rows with logits processors (which read each
row's tokens so far) and caches the compiled forward does not take wait for each outcome.
"""

import functools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .batch_cache import RaggedKVCache, make_batch_cache, ragged_row, single_stream
from .adaptive import AUTO, AUTO_MAX_DRAFT_TOKENS, DraftLengthController
from .generate import draft_length, encode_prompt, until_stop
from .loading import as_target
from .sampling import Sampling
from .speculative import GENERATION_STREAM, Round
from .stats import SpeculativeStats
from .validate import check_int, check_max_tokens


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


@dataclass
class _Row:
    uid: int
    prompt: mx.array  # [P] token ids
    max_tokens: int
    sampling: Sampling
    k: int  # draft length (of the next round, with `auto`)
    key: mx.array  # its own random key until it joins; then the engine's `keys` row holds it
    top_logprobs: int
    stats: SpeculativeStats
    prefilled: int = 0  # prompt tokens in the cache
    prefill_time: float = 0.0
    first_token_time: float = 0.0
    token: int = -1  # the newest token (its device copy is the engine's `tokens` row)
    history: Optional[List[int]] = None  # the tokens before `token`, kept for logits processors
    output: List[int] = field(default_factory=list)  # the tokens handed out
    cached: int = 0  # prompt tokens that came from the prompt cache
    auto: bool = False  # k chosen each round by the engine's controller

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


@dataclass
class _Judged:
    """One group of rows' round, on the device until `lists`: one row per member."""

    drafts: mx.array  # [G, k]
    accepted: mx.array  # [G]: leading drafts kept
    choices: mx.array  # [G, k + 1]: the target's token at each index (emitted at `accepted`)
    logprobs: mx.array  # [G, k + 1]: of drafts[:n] then choices[n], at each index
    top: tuple = ()  # (ids, logprobs) [G, k + 1, top_logprobs] when asked for

    def arrays(self) -> list:
        return [self.drafts, self.accepted, self.choices, self.logprobs, *self.top]

    def lists(self) -> list:
        """Per member: (drafts, accepted, choices, logprobs, top ids, top logprobs)."""
        drafts, accepted, choices, logprobs, *top = (a.tolist() for a in self.arrays())
        top = top or [[[]] * len(accepted)] * 2
        return list(zip(drafts, accepted, choices, logprobs, *top))


@dataclass
class _Pending:
    """A round queued on the device for `rows` (the active rows when it was built)."""

    rows: List[_Row]
    ks: List[int]  # each row's k in this round
    groups: "_Groups"
    judged: List[_Judged]  # per group
    K: int  # drafts per row (rows drafting fewer ignore the rest)

    def arrays(self) -> list:
        return [j.arrays() for j in self.judged]


def _may_end_every_row(pending: _Pending) -> bool:
    """Whether the round `pending` may hand every row it serves its last token (its
    max_tokens; an EOS cannot be foreseen)."""
    return all(row.max_tokens - row.generated <= k + 1 for row, k in zip(pending.rows, pending.ks))


class _Groups:
    """Rows (by index into a batch) split by `_Row.options`."""

    def __init__(self, rows: List[_Row]):
        by_options = {}
        for i, r in enumerate(rows):
            by_options.setdefault(r.options, []).append(i)
        self.members = list(by_options.values())
        self.first = [rows[g[0]] for g in self.members]  # each group's options and k
        self.index = [mx.array(g) for g in self.members]
        self.inverse = mx.argsort(mx.array([i for g in self.members for i in g]))

    def gather(self, parts: List[mx.array]) -> mx.array:
        """Per-group arrays [G, ...] back into batch order [B, ...]."""
        return mx.concatenate(parts)[self.inverse]


class BatchEngine:
    """Continuous batching of exact speculative (or, without a drafter, plain) decoding."""

    def __init__(self, model, tokenizer, draft_model=None, *, num_draft_tokens: Union[int, str, None] = None,
                 max_batch_size: int = 8, prefill_step_size: int = 512, prompt_cache=None):
        """`prompt_cache` (a `server.prompt_cache.PromptCache`, optional): rows start from
        the longest cached prefix of their prompt, and leave their cache there when they end."""
        check_int("max_batch_size", max_batch_size, 1)
        check_int("prefill_step_size", prefill_step_size, 1)
        self.target = as_target(model)
        self.tokenizer = tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
        self.drafter = draft_model
        self.num_draft_tokens = draft_length(self.target, draft_model, num_draft_tokens)
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = prompt_cache
        # Rows with num_draft_tokens="auto" share one controller: every round's time is the
        # whole batch's, and each of their rows' acceptance counts.
        self.controller = DraftLengthController(AUTO_MAX_DRAFT_TOKENS)
        self.eos = set(self.tokenizer.eos_token_ids)
        self.waiting: Deque[_Row] = deque()
        self.prefilling: List[_Row] = []
        self.prefill_cache: List[RaggedKVCache] = []  # the prefilling rows'
        self.active: List[_Row] = []
        self.cache: List[RaggedKVCache] = []  # the active rows'
        # Per active row, on the device: its newest token [B], the target state that produced
        # it [B, 1, hidden], its random key [B, 2], and (int32 [B], None when every row is
        # settled) the drafts the queued round will reject, which its cache lengths count.
        self.tokens = self.hidden = self.keys = self.unsettled = None
        self.pending: Optional[_Pending] = None  # the round queued and not read yet
        self.held: List[RowEvent] = []  # events of a round read outside `step`, handed out by the next
        self.last_read: Optional[float] = None  # when the host last read a round's outcome
        self._drop_all()
        self._uids = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.active or self.held)

    @property
    def num_active(self) -> int:
        return len(self.active)

    @property
    def num_waiting(self) -> int:
        """Rows queued or still prefilling."""
        return len(self.waiting) + len(self.prefilling)

    def insert(self, prompt_ids: Sequence[int], *, max_tokens: int, temp: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, min_p: float = 0.0, min_tokens_to_keep: int = 1,
               logits_processors: Optional[List[Callable]] = None, seed: Optional[int] = None,
               num_draft_tokens: Union[int, str, None] = None, top_logprobs: int = 0,
               draft_mode: str = "sampled") -> int:
        """Queue a sequence; it joins the batch at a round boundary. Returns its uid."""
        prompt = self._checked_prompt(prompt_ids)
        max_tokens = check_max_tokens(max_tokens)
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
        k = self.num_draft_tokens
        if num_draft_tokens is not None:
            if self.drafter is None:
                raise ValueError("num_draft_tokens needs a draft model: load the engine with draft_model")
            k = draft_length(self.target, self.drafter, num_draft_tokens)
        sampling = Sampling(temp, top_p, top_k, min_p, min_tokens_to_keep, None,
                            list(logits_processors or []), draft_mode)
        seed = int(mx.random.randint(0, 2**31 - 1).item()) if seed is None else seed
        auto = k == AUTO
        stats = SpeculativeStats.empty(AUTO_MAX_DRAFT_TOKENS if auto else k, prompt.size, auto=auto)
        self._uids += 1
        self.waiting.append(_Row(self._uids, prompt, max_tokens, sampling, 0 if auto else k, mx.random.key(seed),
                                 top_logprobs, stats, auto=auto))
        return self._uids

    def _checked_prompt(self, prompt_ids) -> mx.array:
        if isinstance(prompt_ids, str):
            raise ValueError("insert takes token ids: encode the text with the tokenizer first")
        ids = list(prompt_ids)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.target.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}): got {bad[0]!r}")
        return mx.array(ids, dtype=mx.uint32)

    def remove(self, uid: int) -> None:
        """Drop a sequence, queued or running, and free its memory. Unknown uids are ignored.
        A round in flight is read first (its other rows' tokens come with the next step)."""
        if self.pending is not None and any(r.uid == uid for r in self.active):
            with mx.stream(GENERATION_STREAM):
                self.held += self._read(self.pending)
            self.pending = self.unsettled = None
        self.held = [e for e in self.held if e.uid != uid]
        self.waiting = deque(r for r in self.waiting if r.uid != uid)
        prefilling = [i for i, r in enumerate(self.prefilling) if r.uid != uid]
        if len(prefilling) < len(self.prefilling):
            self.prefilling = [self.prefilling[i] for i in prefilling]
            for c in self.prefill_cache:
                c.take(prefilling)
        for gone, row in enumerate(self.active):
            if row.uid == uid:
                self._store(row.verified, self.cache, gone)
                self._keep_rows([i for i in range(len(self.active)) if i != gone])
                break

    def _keep_rows(self, keep: List[int]) -> None:
        self.active = [self.active[i] for i in keep]
        for c in self.cache:
            c.take(keep)
        if keep:
            index = mx.array(keep)
            self.tokens, self.hidden, self.keys = self.tokens[index], self.hidden[index], self.keys[index]
            if self.unsettled is not None:
                self.unsettled = self.unsettled[index]
        else:
            self.tokens = self.hidden = self.keys = self.unsettled = None

    def step(self) -> List[RowEvent]:
        """Admit waiting rows and prefill up to `prefill_step_size` more of their prompt
        tokens, then run one round for every active row. Returns the rows' new tokens."""
        with mx.stream(GENERATION_STREAM):
            try:
                events, self.held = self.held, []
                events += self._admit()
                if self.active:
                    events += self._round()
            except BaseException:  # the rows' caches are in an unknown state: drop every row
                self._drop_all()
                raise
        return events

    def _drop_all(self) -> None:
        self.waiting.clear()
        self.prefilling, self.active = [], []
        self.prefill_cache = make_batch_cache(self.target.args, rows=0)
        self.cache = make_batch_cache(self.target.args, rows=0)
        self.tokens = self.hidden = self.keys = self.unsettled = None
        self.pending, self.held = None, []

    def _admit(self) -> List[RowEvent]:
        """Move waiting rows into the prefill group while the batch has room, and run one
        chunk of at most `prefill_step_size` prompt tokens per row for the whole group.
        Rows whose prompt is done choose their first token and join the batch."""
        room = self.max_batch_size - len(self.active) - len(self.prefilling)
        joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        for row in joining:
            self.prefilling.append(row)
            for c, new in zip(self.prefill_cache, self._fetch(row)):
                c.extend(new)
        if not self.prefilling:
            return []
        self.last_read = None  # the next outcome's wait holds this prefill: not a round's time
        tic = time.perf_counter()
        rows = self.prefilling
        remaining = [r.prompt.size - r.prefilled for r in rows]
        N = min(self.prefill_step_size, max(remaining))
        pad = mx.zeros((N,), dtype=mx.uint32)
        inputs = mx.stack([mx.concatenate([r.prompt[r.prefilled : r.prefilled + N], pad])[:N] for r in rows])
        hidden = self.target.backbone(inputs, cache=self.prefill_cache)  # [G, N, hidden]
        for r, left in zip(rows, remaining):
            r.prefilled += min(N, left)
        for c in self.prefill_cache:  # drop the padding each shorter prompt was given
            c.set_lengths([r.prefilled for r in rows])
        done = [i for i, left in enumerate(remaining) if left <= N]
        events = []
        if done:
            hidden = hidden[mx.array(done), mx.array([remaining[i] - 1 for i in done])][:, None]  # [D, 1, hidden]
            events = self._first_tokens([rows[i] for i in done], hidden, done)
        else:
            mx.eval([(c.keys, c.values) for c in self.prefill_cache])
        for r in rows:
            r.prefill_time += time.perf_counter() - tic
            r.stats.prompt_tps = (r.prefilled - r.cached) / r.prefill_time
        self.prefilling = [r for i, r in enumerate(rows) if i not in done]
        for c in self.prefill_cache:
            c.take([i for i in range(len(rows)) if i not in done])
        return events

    def _first_tokens(self, rows: List[_Row], hidden: mx.array, cache_rows: List[int]) -> List[RowEvent]:
        """Each row's token from its prompt's last hidden state [D, 1, hidden]; rows that
        go on join the batch with their prefill cache rows `cache_rows`."""
        groups = _Groups(rows)
        logits = self.target.logits(hidden[:, 0])  # [D, vocab]
        keys = mx.stack([r.key for r in rows])
        judged, next_keys = [], []
        for row, index in zip(groups.first, groups.index):
            key, draw = _split_keys(keys[index], 1)
            next_keys.append(key)
            history = mx.array(row.prompt.tolist()[:-1]) if row.sampling.logits_processors else None
            judged.append(_first_token(row, row.prompt[-1:], logits[index], draw[:, 0], history))
        tokens = groups.gather([j.choices[:, 0] for j in judged])
        keys = groups.gather(next_keys)
        mx.eval([j.arrays() for j in judged], tokens, keys, hidden,
                [(c.keys, c.values) for c in self.prefill_cache])
        events, joined = [], []
        for members, j in zip(groups.members, judged):
            for i, values in zip(members, j.lists()):
                rows[i].first_token_time = time.perf_counter()
                events.append((i, self._emit(rows[i], rows[i].k, *values, from_prefill=True)))
                events[-1][1].cached_tokens = rows[i].cached
        events.sort(key=lambda e: e[0])
        joined = [i for i, e in events if e.finish_reason is None]
        for i, _ in events:  # the prompt's K/V, for later prompts sharing its start (a system prompt),
            # which the row's final cache can no longer roll back to once its sliding window moved on
            self._store(rows[i].prompt.tolist(), self.prefill_cache, cache_rows[i])
        if joined:
            self.active += [rows[i] for i in joined]
            for c, row_cache in zip(self.cache, self.prefill_cache):
                c.extend(row_cache.select([cache_rows[i] for i in joined]))
            index = mx.array(joined)
            new = (tokens[index], hidden[index], keys[index])
            old = (self.tokens, self.hidden, self.keys)
            self.tokens, self.hidden, self.keys = (n if o is None else mx.concatenate([o, n]) for o, n in zip(old, new))
            if self.unsettled is not None:  # the joining rows are settled
                self.unsettled = mx.concatenate([self.unsettled, mx.zeros((len(joined),), mx.int32)])
        return [e for _, e in events]

    def _round(self) -> List[RowEvent]:
        """Queue a round for every active row, and read the round queued before it."""
        previous, self.pending = self.pending, None
        ahead = self._queues_ahead()
        events = []
        # A round queued behind one that ends every row would be computed and dropped:
        # when the round in flight may reach every row's max_tokens, read it first.
        if previous is not None and (not ahead or _may_end_every_row(previous)):
            events += self._read(previous)
            previous, self.unsettled = None, None
        queued = self._queue() if self.active else None
        if previous is not None:
            events += self._read(previous, next_k=queued.K if queued else None)
        if queued is not None and not ahead:
            events += self._read(queued)
            queued, self.unsettled = None, None
        if queued is not None and not self.active:  # every row finished: let it run out, drop it
            mx.eval(queued.arrays())
            queued = None
        self.pending = queued
        return events

    def _queues_ahead(self) -> bool:
        """Whether the next round may be queued before the last one's outcome is read."""
        if any(r.sampling.logits_processors for r in self.active):
            return False
        widest = AUTO_MAX_DRAFT_TOKENS if any(r.auto for r in self.active) else max(r.k for r in self.active)
        return self.target.compiled.handles_length(widest + 1, self.cache)

    def _queue(self) -> _Pending:
        """Draft, verify and judge a round for every active row: a lazy graph, queued."""
        rows = list(self.active)
        auto = [r for r in rows if r.auto]
        if auto:
            k = self.controller.choose()
            for r in auto:
                r.k = k
        groups = _Groups(rows)
        K = max(r.k for r in rows)
        split = [_split_keys(self.keys[index], row.k + 1) for row, index in zip(groups.first, groups.index)]
        self.keys = groups.gather([key for key, _ in split])
        draw_keys = [keys for _, keys in split]  # per group [G, k + 1, 2]: k draft keys, the acceptance key
        drafts, draft_logprobs = self._draft(rows, groups, K, draw_keys)  # [B, K], per group
        inputs = mx.concatenate([self.tokens[:, None], drafts.astype(self.tokens.dtype)], axis=1)  # [B, K + 1]
        logits, hiddens = self.target(inputs, self.cache, self.unsettled)  # [B, K + 1, vocab], [B, K + 1, hidden]
        judged = [_verify(row, index, inputs, logits, q, keys[:, -1])
                  for row, index, q, keys in zip(groups.first, groups.index, draft_logprobs, draw_keys)]
        accepted = groups.gather([j.accepted for j in judged]).astype(mx.int32)  # [B]
        self.tokens = groups.gather([mx.take_along_axis(j.choices, j.accepted[:, None], axis=1)[:, 0]
                                     for j in judged])
        self.hidden = hiddens[mx.arange(len(rows)), accepted][:, None]
        self.unsettled = K - accepted  # every row wrote K + 1 entries and keeps accepted + 1
        pending = _Pending(rows, [r.k for r in rows], groups, judged, K)
        mx.async_eval(pending.arrays(), self.tokens, self.hidden, self.keys, self.unsettled)
        return pending

    def _read(self, pending: _Pending, next_k: Optional[int] = None) -> List[RowEvent]:
        """Wait for a queued round and hand out its tokens: each of its rows still active
        gets its event, its cache drops the drafts it rejected, and rows that finished
        leave. `next_k`: the K of the round queued after it (None: none is)."""
        index = {id(r): i for i, r in enumerate(self.active)}
        outcomes = [values for j in pending.judged for values in j.lists()]  # waits for the device
        now = time.perf_counter()
        timed = self.last_read is not None and next_k in (None, pending.K)
        seconds = now - self.last_read if timed else None
        self.last_read = now
        order = [b for members in pending.groups.members for b in members]
        lengths = list(self.cache[0].lengths)
        events = {}
        for b, values in zip(order, outcomes):
            row, k = pending.rows[b], pending.ks[b]
            i = index.get(id(row))
            if i is None:  # it finished, or left, after this round was queued
                continue
            events[i] = self._emit(row, k, *values)
            lengths[i] -= pending.K - values[1]  # its rejected drafts
            if row.auto:  # the round's time once, every auto row's acceptance
                self.controller.observe(k, values[1], seconds)
                seconds = None
        for c in self.cache:  # each row keeps exactly its verified positions (and the queued round's)
            c.set_lengths(lengths)
        finished = [i for i, e in events.items() if e.finish_reason is not None]
        if finished:
            for i in finished:
                self._store(self.active[i].verified, self.cache, i)
            self._keep_rows([i for i in range(len(self.active)) if i not in finished])
        return [events[i] for i in sorted(events)]

    def _fetch(self, row: _Row) -> List[RaggedKVCache]:
        """The row's cache rows: the prompt cache's longest prefix of its prompt, or empty."""
        cache = None
        if self.prompt_cache is not None:
            cache, row.cached = self.prompt_cache.fetch(row.prompt.tolist())
        row.prefilled = row.cached
        return make_batch_cache(self.target.args, rows=1) if cache is None else ragged_row(cache)

    def _store(self, tokens: List[int], cache: List[RaggedKVCache], index: int) -> None:
        """Leave row `index` of `cache`, which holds `tokens` (and may hold a queued round's
        entries after them), in the prompt cache."""
        if self.prompt_cache is None:
            return
        rows = [c.select([index]) for c in cache]
        for c in rows:
            c.set_lengths([len(tokens)])
        entry = single_stream(rows)
        # lazy, it would hold the whole batch's buffers: computed behind the queued round
        mx.async_eval([(c.keys, c.values) for c in entry if c.keys is not None])
        self.prompt_cache.store(tokens, entry)

    def _draft(self, rows: List[_Row], groups: _Groups, K: int, draw_keys: List[mx.array]):
        """K drafts per row, each at its row's own position over its own verified K/V:
        (drafts [B, K], per group its drafts' log q [G, k, vocab], or None when greedy)."""
        if K == 0:
            return mx.zeros((len(rows), 0), dtype=mx.uint32), [None] * len(groups.members)
        positions = self.cache[0].offset  # each row's cache length: its newest token's position
        if self.unsettled is not None:
            positions = positions - self.unsettled
        window = self.target.args.sliding_window
        views = {t: self.cache[i].drafter_view(window + 1 if self.cache[i].window else None, self.unsettled)
                 for t, i in self.target.producers.items()}
        shared_kv = {t: (k, v) for t, (k, v, _) in views.items()}
        masks = {t: m for t, (_, _, m) in views.items()}
        sampled = [_samples_drafts(row) for row in groups.first]
        histories = [[mx.array(row.history), mx.array([row.token], mx.uint32)]
                     if s and row.sampling.logits_processors else None for row, s in zip(groups.first, sampled)]
        logqs = [[] for _ in groups.members]
        token, hidden, drafts = self.tokens, self.hidden, []
        for j in range(K):
            embedding = self.target.embed(token)[:, None]
            state, hidden = self.drafter.step(embedding, hidden, positions, shared_kv, masks)
            token = self.drafter.greedy_token(state)[:, 0]  # [B]
            if any(sampled):
                logits = self.drafter.logits(state)[:, 0]  # [B, vocab]
                parts = []
                for g, (row, index) in enumerate(zip(groups.first, groups.index)):
                    if not sampled[g]:
                        parts.append(token[index])
                        continue
                    keys = draw_keys[g][:, min(j, row.k)]  # drafts past the row's k are ignored
                    t, logq = _draw(row.sampling, logits[index], keys, histories[g])
                    parts.append(t.astype(token.dtype))
                    logqs[g].append(logq)
                token = groups.gather(parts)
            drafts.append(token)
        logqs = [mx.stack(q[: row.k], axis=1) if q else None for q, row in zip(logqs, groups.first)]
        return mx.stack(drafts, axis=1), logqs

    def _emit(self, row: _Row, k: int, drafted: List[int], n: int, choices: List[int], logprobs: List[float],
              top_ids: List, top_values: List, from_prefill: bool = False) -> RowEvent:
        """Hand out a round of `k` drafts' tokens, cut after EOS or at max_tokens; record its stats."""
        emitted = drafted[:n] + [choices[n]]
        round_ = until_stop(Round(row.position, drafted, n, emitted, logprobs[: n + 1], from_prefill, k),
                             self.eos, row.max_tokens - row.generated)
        row.stats.record(round_)
        if row.sampling.logits_processors:
            row.history = row.prompt.tolist() if from_prefill else row.history + [row.token] + drafted[:n]
        row.output += round_.emitted
        row.token = emitted[-1]
        finish = "stop" if round_.emitted[-1] in self.eos else "length" if row.generated >= row.max_tokens else None
        top = [sorted(zip(i, v), key=lambda t: -t[1]) for i, v in zip(top_ids, top_values)]
        event = RowEvent(row.uid, round_.emitted, round_.logprobs, top[: len(round_.emitted)],
                         [i < round_.accepted for i in range(len(round_.emitted))], finish,
                         drafted=0 if from_prefill else len(round_.drafted))
        if finish:
            stats = row.stats
            stats.generation_tokens = row.generated
            stats.generation_tps = row.generated / max(time.perf_counter() - row.first_token_time, 1e-9)
            stats.peak_memory = mx.get_peak_memory() / 1e9
            event.stats = stats
        return event


def _split_keys(keys: mx.array, n: int):
    """From each row's key [G, 2]: its next key [G, 2] and `n` keys to draw with [G, n, 2].
    Each row's keys depend on its own key only, whatever else is in the batch."""
    split = mx.vmap(lambda key: mx.random.split(key, n + 1))(keys)
    return split[:, 0], split[:, 1:]


def _samples_drafts(row: _Row) -> bool:
    return row.sampling.exact_distribution and row.sampling.draft_mode == "sampled"


def _draw(sampling: Sampling, logits: mx.array, keys: mx.array, history: Optional[list]):
    """Drafts from the drafter's processed logits [G, vocab], one key per row [G, 2]:
    (tokens [G], log q [G, vocab]). `history` ([earlier tokens, input token], appended to)
    is given for a single row with logits processors."""
    if history is not None:
        logq = sampling.process(mx.concatenate(history[:-1]), history[-1], logits)
        token = sampling.sample(logq, keys[0])
        history.append(token.astype(history[-1].dtype))
        return token, logq
    logq = sampling.process(None, None, logits)  # each row on its own: no history read
    return mx.vmap(lambda row_logq, key: sampling.sample(row_logq, key))(logq, keys), logq


def _first_token(row: _Row, last: mx.array, logits: mx.array, keys: mx.array, history) -> _Judged:
    """A group's first tokens from its prompts' last logits [G, vocab] (lazy)."""
    if history is not None:  # a group of one
        logprobs = row.sampling.process(history, last, logits)
    else:
        logprobs = row.sampling.process(None, None, logits)
    tokens = mx.vmap(lambda lp, key: row.sampling.sample(lp, key))(logprobs, keys).astype(mx.uint32)
    chosen = mx.take_along_axis(logprobs, tokens[:, None].astype(mx.int32), axis=-1)
    G = tokens.shape[0]
    top = tuple(a[:, None] for a in _top(logprobs, row.top_logprobs))
    return _Judged(mx.zeros((G, 0), mx.uint32), mx.zeros((G,), mx.int32), tokens[:, None], chosen, top)


def _verify(row: _Row, index: mx.array, inputs: mx.array, logits: mx.array,
            draft_logprobs: Optional[mx.array], keys: mx.array) -> _Judged:
    """Judge the drafts of one group of rows (options as `row`'s), each with its own key (lazy).

    inputs [B, K + 1]: each row's token then its drafts; logits [B, K + 1, vocab];
    draft_logprobs: the group's [G, k, vocab] (None for greedy drafts); keys [G, 2]."""
    k, sampling = row.k, row.sampling
    row_inputs, row_logits = inputs[index, : k + 1], logits[index, : k + 1]
    if sampling.logits_processors:  # a group of one
        logprobs = sampling.process(mx.array(row.history), row_inputs[0], row_logits[0])[None]
    else:  # each position on its own: no history read
        logprobs = sampling.process(None, None, row_logits.reshape(-1, row_logits.shape[-1]))
        logprobs = logprobs.reshape(row_logits.shape)

    def judge(row_inputs, logprobs, key, q=None):
        drafts = row_inputs[1:]
        if k:
            accepted, choices = sampling.accept(drafts, q, logprobs, key)
        else:  # plain decoding: (mx.vmap cannot draw from a [1, vocab] block)
            accepted, choices = mx.array(0), sampling.sample(logprobs[0], key)[None]
        choices = choices.astype(mx.uint32)
        # index j < accepted: draft j was emitted; index accepted: the target's own choice
        padded = mx.concatenate([drafts, mx.zeros((1,), drafts.dtype)])
        emitted = mx.where(mx.arange(k + 1) < accepted, padded, choices)
        token_logprobs = mx.take_along_axis(logprobs, emitted[:, None].astype(mx.int32), axis=-1)[:, 0]
        return accepted, choices, token_logprobs

    args = [row_inputs, logprobs, keys] + ([] if draft_logprobs is None else [draft_logprobs])
    if sampling.logits_processors:
        out = [a[None] for a in judge(*(a[0] for a in args))]
    else:
        out = mx.vmap(judge)(*args)
    return _Judged(row_inputs[:, 1:], *out, _top(logprobs, row.top_logprobs))


def _top(logprobs: mx.array, n: int) -> tuple:
    """The `n` most likely tokens and their log-probabilities [..., n] per position, or ()."""
    if n == 0:
        return ()
    n = min(n, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, kth=n - 1, axis=-1)[..., :n]
    return ids, mx.take_along_axis(logprobs, ids, axis=-1)


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
                   seed: Optional[int] = None) -> BatchResponse:
    """Generate for every prompt (text or token ids, any lengths) in one batch.

    Every row is exactly what `stream_generate` gives its prompt alone (greedy: token for
    token; sampling: the same distribution). `max_tokens` is one limit or one per prompt.
    `seed` makes the whole call reproducible.
    """
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of prompts (texts or token-id lists)")
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"max_tokens has {len(limits)} values for {len(prompts)} prompts: "
                         "give one per prompt, or a single int")
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
    uids = [engine.insert(p, max_tokens=n, **options) for p, n in zip(encoded, limits)]
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


def pooled(stats: List[SpeculativeStats], elapsed: float) -> SpeculativeStats:
    """Counts summed over rows; tokens/s of all rows together over `elapsed` seconds."""
    total = functools.reduce(SpeculativeStats.merge, stats)
    total.generation_tps = total.generation_tokens / elapsed if elapsed > 0 else 0.0
    return total
