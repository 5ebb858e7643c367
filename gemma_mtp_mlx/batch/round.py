"""One batched round, as a lazy graph: draft K tokens for every row, verify them in one
target forward, judge each row with its own options and random key.

    draft K tokens for all rows (the drafter at each row's own position P, reading each
        row's own verified K/V through masks)
    verify: one target forward over [token, d1..dK] for all rows (per-row RoPE and masks)
    accept per row, with that row's sampling options, logits processors, random key and
        draft length (rows drafting fewer than K ignore the rest)

Rows with equal options are judged together (`Groups`); `queue_round` builds the graph and
starts it on the device (`Pending`), `first_tokens` judges rows' first tokens from their
prompts' last logits. Reading the outcomes and settling the rows is the engine's.
"""

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx

from ..sampling import Sampling
from .rows import ActiveRows, Row


@dataclass
class Judged:
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


class Groups:
    """Rows (by index into a batch) split by `Row.options`."""

    def __init__(self, rows: List[Row]):
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

    @property
    def order(self) -> List[int]:
        """The batch index of each member, group after group (the order of `lists`)."""
        return [b for members in self.members for b in members]


@dataclass
class Pending:
    """A round queued on the device for `rows` (the active rows when it was built)."""

    rows: List[Row]
    ks: List[int]  # each row's k in this round
    groups: Groups
    judged: List[Judged]  # per group
    K: int  # drafts per row (rows drafting fewer ignore the rest)

    def arrays(self) -> list:
        return [j.arrays() for j in self.judged]

    def outcomes(self) -> list:
        """Per row, in `groups.order`: (drafts, accepted, choices, logprobs, top ids, top
        logprobs). Waits for the device."""
        return [values for j in self.judged for values in j.lists()]


def queue_round(target, drafter, active: ActiveRows) -> Pending:
    """Draft, verify and judge a round for every active row (each with its `k` set): a
    lazy graph, queued. Advances `active`'s tokens, states, keys and unsettled counts."""
    rows = list(active.rows)
    groups = Groups(rows)
    K = max(r.k for r in rows)
    split = [split_keys(active.keys[index], row.k + 1) for row, index in zip(groups.first, groups.index)]
    active.keys = groups.gather([key for key, _ in split])
    draw_keys = [keys for _, keys in split]  # per group [G, k + 1, 2]: k draft keys, the acceptance key
    drafts, draft_logprobs = draft(target, drafter, active, groups, K, draw_keys)  # [B, K], per group
    inputs = mx.concatenate([active.tokens[:, None], drafts.astype(active.tokens.dtype)], axis=1)  # [B, K + 1]
    logits, hiddens = target(inputs, active.cache, active.unsettled)  # [B, K + 1, vocab], [B, K + 1, hidden]
    judged = [verify(row, index, inputs, logits, q, keys[:, -1])
              for row, index, q, keys in zip(groups.first, groups.index, draft_logprobs, draw_keys)]
    accepted = groups.gather([j.accepted for j in judged]).astype(mx.int32)  # [B]
    active.tokens = groups.gather([mx.take_along_axis(j.choices, j.accepted[:, None], axis=1)[:, 0]
                                   for j in judged])
    active.hidden = hiddens[mx.arange(len(rows)), accepted][:, None]
    active.unsettled = K - accepted  # every row wrote K + 1 entries and keeps accepted + 1
    pending = Pending(rows, [r.k for r in rows], groups, judged, K)
    mx.async_eval(pending.arrays(), active.tokens, active.hidden, active.keys, active.unsettled)
    return pending


def draft(target, drafter, active: ActiveRows, groups: Groups, K: int, draw_keys: List[mx.array]):
    """K drafts per row, each at its row's own position over its own verified K/V:
    (drafts [B, K], per group its drafts' log q [G, k, vocab], or None when greedy)."""
    if K == 0:
        return mx.zeros((len(active), 0), dtype=mx.uint32), [None] * len(groups.members)
    positions = active.cache[0].offset  # each row's cache length: its newest token's position
    if active.unsettled is not None:
        positions = positions - active.unsettled
    window = target.args.sliding_window
    views = {t: active.cache[i].drafter_view(window + 1 if active.cache[i].window else None, active.unsettled)
             for t, i in target.producers.items()}
    shared_kv = {t: (k, v) for t, (k, v, _) in views.items()}
    masks = {t: m for t, (_, _, m) in views.items()}
    sampled = [samples_drafts(row) for row in groups.first]
    histories = [[mx.array(row.history), mx.array([row.token], mx.uint32)]
                 if s and row.sampling.logits_processors else None for row, s in zip(groups.first, sampled)]
    logqs = [[] for _ in groups.members]
    token, hidden, drafts = active.tokens, active.hidden, []
    for j in range(K):
        embedding = target.embed(token)[:, None]
        state, hidden = drafter.step(embedding, hidden, positions, shared_kv, masks)
        token = drafter.greedy_token(state)[:, 0]  # [B]
        if any(sampled):
            logits = drafter.logits(state)[:, 0]  # [B, vocab]
            parts = []
            for g, (row, index) in enumerate(zip(groups.first, groups.index)):
                if not sampled[g]:
                    parts.append(token[index])
                    continue
                keys = draw_keys[g][:, min(j, row.k)]  # drafts past the row's k are ignored
                t, logq = draw(row.sampling, logits[index], keys, histories[g])
                parts.append(t.astype(token.dtype))
                logqs[g].append(logq)
            token = groups.gather(parts)
        drafts.append(token)
    logqs = [mx.stack(q[: row.k], axis=1) if q else None for q, row in zip(logqs, groups.first)]
    return mx.stack(drafts, axis=1), logqs


def first_tokens(target, rows: List[Row], hidden: mx.array):
    """Rows' first tokens from their prompts' last hidden states [D, 1, hidden] (lazy):
    (groups, judged per group, tokens [D], next keys [D, 2])."""
    groups = Groups(rows)
    logits = target.logits(hidden[:, 0])  # [D, vocab]
    keys = mx.stack([r.key for r in rows])
    judged, next_keys = [], []
    for row, index in zip(groups.first, groups.index):
        key, keys_to_draw = split_keys(keys[index], 1)
        next_keys.append(key)
        history = mx.array(row.prompt.tolist()[:-1]) if row.sampling.logits_processors else None
        judged.append(first_token(row, row.prompt[-1:], logits[index], keys_to_draw[:, 0], history))
    tokens = groups.gather([j.choices[:, 0] for j in judged])
    return groups, judged, tokens, groups.gather(next_keys)


def split_keys(keys: mx.array, n: int):
    """From each row's key [G, 2]: its next key [G, 2] and `n` keys to draw with [G, n, 2].
    Each row's keys depend on its own key only, whatever else is in the batch."""
    split = mx.vmap(lambda key: mx.random.split(key, n + 1))(keys)
    return split[:, 0], split[:, 1:]


def samples_drafts(row: Row) -> bool:
    """Whether the row's drafts are drawn from the drafter's processed distribution (see
    `Sampling.drafts_processed`), not taken as its argmax."""
    s = row.sampling
    return s.drafts_processed or (s.exact_distribution and s.draft_mode == "sampled")


def draw(sampling: Sampling, logits: mx.array, keys: mx.array, history: Optional[list]):
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


def first_token(row: Row, last: mx.array, logits: mx.array, keys: mx.array, history) -> Judged:
    """A group's first tokens from its prompts' last logits [G, vocab] (lazy)."""
    if history is not None:  # a group of one
        logprobs = row.sampling.process(history, last, logits)
    else:
        logprobs = row.sampling.process(None, None, logits)
    tokens = mx.vmap(lambda lp, key: row.sampling.sample(lp, key))(logprobs, keys).astype(mx.uint32)
    chosen = mx.take_along_axis(logprobs, tokens[:, None].astype(mx.int32), axis=-1)
    G = tokens.shape[0]
    top_ = tuple(a[:, None] for a in top(logprobs, row.top_logprobs))
    return Judged(mx.zeros((G, 0), mx.uint32), mx.zeros((G,), mx.int32), tokens[:, None], chosen, top_)


def verify(row: Row, index: mx.array, inputs: mx.array, logits: mx.array,
           draft_logprobs: Optional[mx.array], keys: mx.array) -> Judged:
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
    return Judged(row_inputs[:, 1:], *out, top(logprobs, row.top_logprobs))


def top(logprobs: mx.array, n: int) -> tuple:
    """The `n` most likely tokens and their log-probabilities [..., n] per position, or ()."""
    if n == 0:
        return ()
    n = min(n, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, kth=n - 1, axis=-1)[..., :n]
    return ids, mx.take_along_axis(logprobs, ids, axis=-1)

