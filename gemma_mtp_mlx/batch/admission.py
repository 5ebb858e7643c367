"""Rows on their way into the batch: the queue, chunked prefill, and the prompt cache.

`Admission` owns the rows waiting for room and the rows prefilling (their prompts run
through the target in chunks of at most `prefill_step_size` tokens per row, all prefilling
rows in one forward, between rounds), and the hand-off with the server's prompt cache: a
row starts from the longest cached prefix of its prompt, and a row's K/V is left there
when its prompt is done and when it ends.
"""

import time
from collections import deque
from typing import Deque, List, Sequence

import mlx.core as mx

from .cache import RaggedKVCache, make_batch_cache, ragged_row, single_stream
from .rows import Row


class Admission:
    def __init__(self, target, prefill_step_size: int, prompt_cache=None):
        self.target = target
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = prompt_cache  # a `server.prompt_cache.PromptCache`, or None
        self.clear()

    def clear(self) -> None:
        self.waiting: Deque[Row] = deque()
        self.prefilling: List[Row] = []
        self.cache: List[RaggedKVCache] = make_batch_cache(self.target.args, rows=0)  # the prefilling rows'

    def __len__(self) -> int:
        """Rows queued or still prefilling."""
        return len(self.waiting) + len(self.prefilling)

    def checked_prompt(self, prompt_ids) -> mx.array:
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
        """Drop a waiting or prefilling row (unknown uids are ignored)."""
        self.waiting = deque(r for r in self.waiting if r.uid != uid)
        prefilling = [i for i, r in enumerate(self.prefilling) if r.uid != uid]
        if len(prefilling) < len(self.prefilling):
            self.prefilling = [self.prefilling[i] for i in prefilling]
            for c in self.cache:
                c.take(prefilling)

    def admit(self, room: int) -> None:
        """Move up to `room` waiting rows into the prefill group, each from the prompt
        cache's longest prefix of its prompt."""
        joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        for row in joining:
            self.prefilling.append(row)
            for c, new in zip(self.cache, self._fetch(row)):
                c.extend(new)

    def chunk(self):
        """Run one chunk of at most `prefill_step_size` prompt tokens per prefilling row:
        (the rows, the indices of those whose prompt is done, their prompts' last hidden
        states [D, 1, hidden] or None when none is)."""
        rows = self.prefilling
        remaining = [r.prompt.size - r.prefilled for r in rows]
        N = min(self.prefill_step_size, max(remaining))
        pad = mx.zeros((N,), dtype=mx.uint32)
        inputs = mx.stack([mx.concatenate([r.prompt[r.prefilled : r.prefilled + N], pad])[:N] for r in rows])
        hidden = self.target.backbone(inputs, cache=self.cache)  # [G, N, hidden]
        for r, left in zip(rows, remaining):
            r.prefilled += min(N, left)
        for c in self.cache:  # drop the padding each shorter prompt was given
            c.set_lengths([r.prefilled for r in rows])
        done = [i for i, left in enumerate(remaining) if left <= N]
        if not done:
            mx.eval([(c.keys, c.values) for c in self.cache])
            return rows, done, None
        return rows, done, hidden[mx.array(done), mx.array([remaining[i] - 1 for i in done])][:, None]

    def finish_chunk(self, rows: List[Row], done: List[int], tic: float) -> None:
        """Count the chunk started at `tic` in each row's prefill time; rows at `done` leave
        the prefill group (the batch took those that go on)."""
        for r in rows:
            r.prefill_time += time.perf_counter() - tic
            r.stats.prompt_tps = (r.prefilled - r.cached) / r.prefill_time
        self.prefilling = [r for i, r in enumerate(rows) if i not in done]
        for c in self.cache:
            c.take([i for i in range(len(rows)) if i not in done])

    def _fetch(self, row: Row) -> List[RaggedKVCache]:
        """The row's cache rows: the prompt cache's longest prefix of its prompt, or empty."""
        cache = None
        if self.prompt_cache is not None:
            cache, row.cached = self.prompt_cache.fetch(row.prompt.tolist())
        row.prefilled = row.cached
        return make_batch_cache(self.target.args, rows=1) if cache is None else ragged_row(cache)

    def store(self, tokens: List[int], cache: Sequence[RaggedKVCache], index: int) -> None:
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
