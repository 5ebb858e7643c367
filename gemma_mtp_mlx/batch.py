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
"""

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Deque, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .batch_cache import make_batch_cache
from .generate import SpeculativeStats, _as_target, _draft_length, encode_prompt
from .sampling import Sampling
from .speculative import GENERATION_STREAM, Round


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


@dataclass
class _Row:
    uid: int
    prompt: mx.array  # [P] token ids
    max_tokens: int
    sampling: Sampling
    k: int  # draft length
    key: mx.array  # this row's own random key
    top_logprobs: int
    stats: SpeculativeStats
    prefilled: int = 0  # prompt tokens in the cache
    prefill_time: float = 0.0
    first_token_time: float = 0.0
    token: Optional[mx.array] = None  # [1]: the newest token, not yet in the cache
    hidden: Optional[mx.array] = None  # [1, 1, hidden]: the target state that produced it
    history: Optional[mx.array] = None  # the tokens before `token` (read by logits processors)
    generated: int = 0

    @property
    def position(self) -> int:
        """Position of `token`: the row's verified length."""
        return self.prompt.size + self.generated - 1

    def next_keys(self, n: int) -> mx.array:
        """`n` fresh random keys from this row's own stream: [n, 2]."""
        keys = mx.random.split(self.key, n + 1)
        self.key = keys[0]
        return keys[1:]


@dataclass
class _Verified:
    """What one round computed for one row, still on the device."""

    drafts: mx.array  # [k]
    accepted: mx.array  # []
    choices: mx.array  # [k + 1]
    logprobs: mx.array  # [k + 1]: of drafts[:n] then choices[n], at each index
    top: Optional[Tuple[mx.array, mx.array]]  # (ids, logprobs) [k + 1, top_logprobs]


class BatchEngine:
    """Continuous batching of exact speculative (or, without a drafter, plain) decoding."""

    def __init__(self, model, tokenizer, draft_model=None, *, num_draft_tokens: Optional[int] = None,
                 max_batch_size: int = 8, prefill_step_size: int = 512):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be at least 1, got {prefill_step_size}")
        self.target = _as_target(model)
        self.tokenizer = tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
        self.drafter = draft_model
        self.num_draft_tokens = _draft_length(self.target, draft_model, num_draft_tokens)
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self.eos = set(self.tokenizer.eos_token_ids)
        self.cache = make_batch_cache(self.target.args, rows=0)  # the active rows'
        self.prefill_cache = make_batch_cache(self.target.args, rows=0)  # the prefilling rows'
        self.waiting: Deque[_Row] = deque()
        self.prefilling: List[_Row] = []
        self.active: List[_Row] = []
        self._uids = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.active)

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
               num_draft_tokens: Optional[int] = None, top_logprobs: int = 0,
               draft_mode: str = "sampled") -> int:
        """Queue a sequence; it joins the batch at a round boundary. Returns its uid."""
        prompt = self._checked_prompt(prompt_ids)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
        k = self.num_draft_tokens
        if num_draft_tokens is not None:
            if self.drafter is None:
                raise ValueError("num_draft_tokens needs a draft model: load the engine with draft_model")
            k = _draft_length(self.target, self.drafter, num_draft_tokens)
        sampling = Sampling(temp, top_p, top_k, min_p, min_tokens_to_keep, None,
                            list(logits_processors or []), draft_mode)
        seed = int(mx.random.randint(0, 2**31 - 1).item()) if seed is None else seed
        stats = SpeculativeStats(num_draft_tokens=k, accepted_by_position=[0] * k,
                                 drafted_by_position=[0] * k, prompt_tokens=prompt.size)
        self._uids += 1
        self.waiting.append(_Row(self._uids, prompt, max_tokens, sampling, k, mx.random.key(seed),
                                 top_logprobs, stats))
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
        """Drop a sequence, queued or running, and free its memory. Unknown uids are ignored."""
        self.waiting = deque(r for r in self.waiting if r.uid != uid)
        prefilling = [i for i, r in enumerate(self.prefilling) if r.uid != uid]
        if len(prefilling) < len(self.prefilling):
            self.prefilling = [self.prefilling[i] for i in prefilling]
            for c in self.prefill_cache:
                c.take(prefilling)
        keep = [i for i, r in enumerate(self.active) if r.uid != uid]
        if len(keep) < len(self.active):
            self._keep_rows(keep)

    def _keep_rows(self, keep: List[int]) -> None:
        self.active = [self.active[i] for i in keep]
        for c in self.cache:
            c.take(keep)

    def step(self) -> List[RowEvent]:
        """Admit waiting rows and prefill up to `prefill_step_size` more of their prompt
        tokens, then run one round for every active row. Returns the rows' new tokens."""
        with mx.stream(GENERATION_STREAM):
            events = self._admit()
            if self.active:
                events += self._round()
        return events

    def _admit(self) -> List[RowEvent]:
        """Move waiting rows into the prefill group while the batch has room, and run one
        chunk of at most `prefill_step_size` prompt tokens per row for the whole group.
        Rows whose prompt is done choose their first token and join the batch."""
        room = self.max_batch_size - len(self.active) - len(self.prefilling)
        joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        if joining:
            self.prefilling += joining
            for c, new in zip(self.prefill_cache, make_batch_cache(self.target.args, rows=len(joining))):
                c.extend(new)
        if not self.prefilling:
            return []
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
        last = [remaining[i] - 1 for i in done]
        hidden = hidden[mx.array(done), mx.array(last)][:, None] if done else None  # [D, 1, hidden]
        firsts = [_first_token(rows[i], self.target.logits(hidden[j])) for j, i in enumerate(done)]
        mx.eval(firsts, hidden, [(c.keys, c.values) for c in self.prefill_cache])
        for r in rows:
            r.prefill_time += time.perf_counter() - tic
        events = [self._join(rows[i], first, hidden[j : j + 1]) for j, (i, first) in enumerate(zip(done, firsts))]
        joined = [i for i, e in zip(done, events) if e.finish_reason is None]
        if joined:
            for c, row_cache in zip(self.cache, self.prefill_cache):
                c.extend(row_cache.select(joined))
        self.prefilling = [r for i, r in enumerate(rows) if i not in done]
        for c in self.prefill_cache:
            c.take([i for i in range(len(rows)) if i not in done])
        return events

    def _join(self, row: _Row, first: _Verified, hidden: mx.array) -> RowEvent:
        """Hand out the row's first token; it joins the batch unless that token ends it."""
        row.first_token_time = time.perf_counter()
        row.stats.prompt_tps = row.prompt.size / row.prefill_time
        row.token, row.hidden = first.choices, hidden
        row.history = row.prompt if row.sampling.logits_processors else None
        event = self._emit(row, first, from_prefill=True)
        if event.finish_reason is None:
            self.active.append(row)
        return event

    def _round(self) -> List[RowEvent]:
        rows = self.active
        K = max(r.k for r in rows)
        keys = [r.next_keys(r.k + 1) for r in rows]  # per row: k draft keys, then the acceptance key
        groups = _groups(rows)
        tokens = mx.concatenate([r.token for r in rows])  # [B]
        hidden = mx.concatenate([r.hidden for r in rows])  # [B, 1, hidden]
        drafts, draft_logprobs = self._draft(rows, groups, tokens, hidden, K, keys)  # [B, K], per group
        inputs = mx.concatenate([tokens[:, None], drafts.astype(tokens.dtype)], axis=1)  # [B, K + 1]
        logits, hiddens = self.target(inputs, self.cache)  # [B, K + 1, vocab], [B, K + 1, hidden]
        verified = [None] * len(rows)
        for group, q in zip(groups, draft_logprobs):
            for i, v in zip(group, _verify(rows, group, inputs, logits, q, keys)):
                verified[i] = v
        mx.eval([(v.drafts, v.accepted, v.choices, v.logprobs, v.top) for v in verified], hiddens)
        events, keep = [], []
        for i, (row, v) in enumerate(zip(rows, verified)):
            n = v.accepted.item()
            row.hidden = hiddens[i : i + 1, n : n + 1]
            if row.history is not None:
                row.history = mx.concatenate([row.history, row.token, v.drafts[:n].astype(row.token.dtype)])
            row.token = v.choices[n : n + 1]
            events.append(self._emit(row, v))
            if events[-1].finish_reason is None:
                keep.append(i)
        for c in self.cache:  # each row keeps exactly its verified positions
            c.set_lengths([r.position for r in rows])
        if len(keep) < len(rows):
            self._keep_rows(keep)
        return events

    def _draft(self, rows, groups, tokens: mx.array, hidden: mx.array, K: int, keys: List[mx.array]):
        """K drafts per row, each at its row's own position over its own verified K/V:
        (drafts [B, K], per group its drafts' log q [G, k, vocab], or None when greedy)."""
        if K == 0:
            return mx.zeros((len(rows), 0), dtype=mx.uint32), [None] * len(groups)
        positions = mx.array([r.position for r in rows])
        window = self.target.args.sliding_window
        views = {t: self.cache[i].drafter_view(window + 1 if self.cache[i].window else None)
                 for t, i in self.target.producers.items()}
        shared_kv = {t: (k, v) for t, (k, v, _) in views.items()}
        masks = {t: m for t, (_, _, m) in views.items()}
        sampled = [g for g in groups if _samples_drafts(rows[g[0]])]
        histories = [[rows[g[0]].history, rows[g[0]].token] if rows[g[0]].sampling.logits_processors else None
                     for g in sampled]  # processors read each draft's history: a group of one
        logqs = [[] for _ in sampled]
        order = mx.array([i for g in groups if g not in sampled for i in g] + [i for g in sampled for i in g])
        inverse = mx.argsort(order)
        token, drafts = tokens, []
        for j in range(K):
            embedding = self.target.embed(token)[:, None]
            state, hidden = self.drafter.step(embedding, hidden, positions, shared_kv, masks)
            token = self.drafter.greedy_token(state)[:, 0]  # [B]
            if sampled:
                logits = self.drafter.logits(state)[:, 0]  # [B, vocab]
                parts = [token[mx.array(g)] for g in groups if g not in sampled]
                for g, history, logq in zip(sampled, histories, logqs):
                    step_keys = mx.stack([keys[i][min(j, rows[i].k)] for i in g])  # drafts past k are ignored
                    t, q = _draw(rows[g[0]].sampling, logits[mx.array(g)], step_keys, history)
                    parts.append(t.astype(token.dtype))
                    logq.append(q)
                token = mx.concatenate(parts)[inverse]
            drafts.append(token)
        by_group = {tuple(g): mx.stack(q[: rows[g[0]].k], axis=1) for g, q in zip(sampled, logqs)}
        return mx.stack(drafts, axis=1), [by_group.get(tuple(g)) for g in groups]

    def _emit(self, row: _Row, v: _Verified, from_prefill: bool = False) -> RowEvent:
        """Hand out a round's tokens, cut after EOS or at max_tokens; record its stats."""
        n = v.accepted.item()
        drafted = v.drafts.tolist()
        emitted = drafted[:n] + [v.choices.tolist()[n]]
        logprobs = v.logprobs.tolist()[: n + 1]
        round_ = _until_stop(Round(row.position, drafted, n, emitted, logprobs, from_prefill),
                             self.eos, row.max_tokens - row.generated)
        row.stats.record(round_)
        row.generated += len(round_.emitted)
        finish = None
        if round_.emitted[-1] in self.eos:
            finish = "stop"
        elif row.generated >= row.max_tokens:
            finish = "length"
        top = []
        if v.top is not None:
            ids, values = (a.tolist() for a in v.top)
            top = [sorted(zip(i, lp), key=lambda t: -t[1]) for i, lp in zip(ids, values)][: len(round_.emitted)]
        event = RowEvent(row.uid, round_.emitted, round_.logprobs, top,
                         [i < round_.accepted for i in range(len(round_.emitted))], finish)
        if finish:
            stats = row.stats
            stats.generation_tokens = row.generated
            stats.generation_tps = row.generated / max(time.perf_counter() - row.first_token_time, 1e-9)
            stats.peak_memory_gb = mx.get_peak_memory() / 1e9
            event.stats = stats
        return event


def _first_token(row: _Row, logits: mx.array) -> _Verified:
    """The token chosen from the prompt's last logits [1, vocab] (lazy)."""
    prompt = row.prompt
    logprobs = row.sampling.process(prompt[:-1], prompt[-1:], logits)
    token = row.sampling.sample(logprobs, row.next_keys(1)[0])
    return _Verified(mx.array([], dtype=mx.uint32), mx.array(0), token,
                     mx.take_along_axis(logprobs, token[:, None].astype(mx.int32), axis=-1)[:, 0],
                     _top(logprobs, row.top_logprobs))


def _groups(rows: List[_Row]) -> List[List[int]]:
    """Rows one vectorised computation can judge: the same options, draft length and
    top_logprobs, and no logits processors (those read each row's own history)."""
    groups = {}
    for i, r in enumerate(rows):
        s = r.sampling
        same = (s.temp, s.top_p, s.top_k, s.min_p, s.min_tokens_to_keep, s.draft_mode, r.k, r.top_logprobs)
        groups.setdefault(("row", i) if s.logits_processors else same, []).append(i)
    return list(groups.values())


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


def _verify(rows: List[_Row], group: List[int], inputs: mx.array, logits: mx.array,
            draft_logprobs: Optional[mx.array], keys: List[mx.array]) -> List[_Verified]:
    """Judge the drafts of a group of rows, each with its own random key (lazy).

    inputs [B, K + 1]: each row's token then its drafts; logits [B, K + 1, vocab];
    draft_logprobs: the group's [G, k, vocab] (None for greedy drafts)."""
    row = rows[group[0]]
    k, top_n, history = row.k, row.top_logprobs, row.history

    def judge(row_inputs, logprobs, key, q=None):
        drafts = row_inputs[1:]
        accepted, choices = row.sampling.accept(drafts, q, logprobs, key)
        choices = choices.astype(mx.uint32)
        # index j < accepted: draft j was emitted; index accepted: the target's own choice
        padded = mx.concatenate([drafts, mx.zeros((1,), drafts.dtype)])
        emitted = mx.where(mx.arange(k + 1) < accepted, padded, choices)
        token_logprobs = mx.take_along_axis(logprobs, emitted[:, None].astype(mx.int32), axis=-1)[:, 0]
        return (accepted, choices, token_logprobs) + (_top(logprobs, top_n) or ())

    index = mx.array(group)
    row_inputs, row_logits = inputs[index, : k + 1], logits[index, : k + 1]
    if row.sampling.logits_processors:  # a group of one
        logprobs = row.sampling.process(history, row_inputs[0], row_logits[0])[None]
    else:  # each position on its own: no history read
        logprobs = row.sampling.process(None, None, row_logits.reshape(-1, row_logits.shape[-1]))
    args = [row_inputs, logprobs.reshape(row_logits.shape), mx.stack([keys[i][k] for i in group])]
    args += [] if draft_logprobs is None else [draft_logprobs]
    if k and not row.sampling.logits_processors:
        out = mx.vmap(judge)(*args)
    else:  # mx.vmap cannot draw from a single [1, vocab] row; a processor row is alone anyway
        out = [mx.stack(a) for a in zip(*(judge(*(a[j] for a in args)) for j in range(len(group))))]
    return [_Verified(args[0][j, 1:], out[0][j], out[1][j], out[2][j], (out[3][j], out[4][j]) if top_n else None)
            for j in range(len(group))]


def _top(logprobs: mx.array, n: int):
    """The `n` most likely tokens and their log-probabilities per position, or None."""
    if n == 0:
        return None
    n = min(n, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, kth=n - 1, axis=-1)[:, :n]
    return ids, mx.take_along_axis(logprobs, ids, axis=-1)


def _until_stop(round_: Round, eos, budget: int) -> Round:
    """The round cut after its first EOS or after `budget` tokens (a cut round counts as
    drafting only the drafts it hands out)."""
    used = min(len(round_.emitted), budget)
    for i, token in enumerate(round_.emitted[:used]):
        if token in eos:
            used = i + 1
            break
    if used == len(round_.emitted):
        return round_
    return replace(round_, drafted=round_.drafted[:used], accepted=min(round_.accepted, used),
                   emitted=round_.emitted[:used], logprobs=round_.logprobs[:used])


@dataclass
class BatchResponse:
    """What `batch_generate` returns, shaped like mlx-lm's."""

    texts: List[str]
    stats: List[SpeculativeStats]  # per prompt
    pooled_stats: SpeculativeStats  # over every prompt; tokens/s of the whole batch
    finish_reasons: List[str]
    token_ids: Optional[List[List[int]]] = None  # with return_token_ids=True


def batch_generate(model, tokenizer, prompts: Sequence[Union[str, Sequence[int]]], *, draft_model=None,
                   max_tokens: Union[int, Sequence[int]] = 128, num_draft_tokens: Optional[int] = None,
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
    k = max(s.num_draft_tokens for s in stats)

    def summed(name):
        return [sum(getattr(s, name)[i] for s in stats if i < len(getattr(s, name))) for i in range(k)]

    total = SpeculativeStats(num_draft_tokens=k, accepted_by_position=summed("accepted_by_position"),
                             drafted_by_position=summed("drafted_by_position"))
    for name in ("rounds", "drafted_tokens", "accepted_tokens", "fallback_rounds", "prompt_tokens",
                 "generation_tokens"):
        setattr(total, name, sum(getattr(s, name) for s in stats))
    total.generation_tps = total.generation_tokens / elapsed if elapsed > 0 else 0.0
    total.peak_memory_gb = max(s.peak_memory_gb for s in stats)
    return total
