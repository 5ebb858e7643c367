"""`BatchEngine`: continuous batching of exact speculative (or, without a drafter, plain)
decoding, shaped like mlx-lm's `BatchGenerator`.

Rows join at any round boundary (their prompts prefilled in chunks between rounds) and
leave at any time. One `step()` admits and prefills (admission.py), then runs one round
for every active row (round.py) and hands out each row's tokens (rows.py). Each row's
cache keeps exactly its own verified positions: `RaggedKVCache` writes each row's entries
after its own end, so a rejected tail is dropped by that row alone.

Rounds are queued one ahead, as in single-stream decoding (speculative.py): a step queues
the next round before it reads the outcome of the round the step before queued, so the
device runs one round while the host builds the next. Each row's new position and write
slot subtract, on the device, the drafts the round before rejected (`unsettled`); the
caches' row lengths count them until they are read. A step therefore hands out the tokens
of the round queued by the step before it; a row that finishes there was already drafted
for once more, and that work is dropped. Rows with logits processors (which read each
row's tokens so far) and caches the compiled forward does not take wait for each outcome.
"""

import time
from typing import Callable, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..adaptive import AUTO_MAX_DRAFT_TOKENS, DraftLengthController
from ..generate import draft_length
from ..loading import as_target
from ..sampling import Sampling
from ..speculative import GENERATION_STREAM
from ..structured.grammar import with_grammar
from ..validate import check_int, check_max_tokens
from .admission import Admission
from .round import Pending, first_tokens, queue_round
from .rows import ActiveRows, Row, RowEvent, emit, first_events, may_end_every_row


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
        # Rows with num_draft_tokens="auto" share one controller: every round's time is the
        # whole batch's, and each of their rows' acceptance counts.
        self.controller = DraftLengthController(AUTO_MAX_DRAFT_TOKENS)
        self.eos = set(self.tokenizer.eos_token_ids)
        self.admission = Admission(self.target, prefill_step_size, prompt_cache)
        self.batch = ActiveRows(self.target.args)
        self.pending: Optional[Pending] = None  # the round queued and not read yet
        self.held: List[RowEvent] = []  # events of a round read outside `step`, handed out by the next
        self.last_read: Optional[float] = None  # when the host last read a round's outcome
        self._uids = 0

    @property
    def prompt_cache(self):
        return self.admission.prompt_cache

    @property
    def active(self) -> List[Row]:
        return self.batch.rows

    @property
    def cache(self) -> list:
        """The active rows' K/V caches."""
        return self.batch.cache

    @property
    def has_work(self) -> bool:
        return bool(self.admission or self.active or self.held)

    @property
    def num_active(self) -> int:
        return len(self.active)

    @property
    def num_waiting(self) -> int:
        """Rows queued or still prefilling."""
        return len(self.admission)

    def insert(self, prompt_ids: Sequence[int], *, max_tokens: int, temp: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, min_p: float = 0.0, min_tokens_to_keep: int = 1,
               logits_processors: Optional[List[Callable]] = None, seed: Optional[int] = None,
               num_draft_tokens: Union[int, str, None] = None, top_logprobs: int = 0,
               draft_mode: str = "sampled", response_format: Optional[dict] = None) -> int:
        """Queue a sequence; it joins the batch at a round boundary. Returns its uid.
        `response_format`: as `stream_generate`'s (the row gets its own grammar state)."""
        prompt = self.admission.checked_prompt(prompt_ids)
        max_tokens = check_max_tokens(max_tokens)
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
        k = self.num_draft_tokens
        if num_draft_tokens is not None:
            if self.drafter is None:
                raise ValueError("num_draft_tokens needs a draft model: load the engine with draft_model")
            k = draft_length(self.target, self.drafter, num_draft_tokens)
        processors = with_grammar(logits_processors, self.tokenizer, response_format, self.target.vocab_size)
        sampling = Sampling(temp, top_p, top_k, min_p, min_tokens_to_keep, None, processors, draft_mode)
        self._uids += 1
        self.admission.waiting.append(Row.new(self._uids, prompt, max_tokens, sampling, k, seed, top_logprobs))
        return self._uids

    def remove(self, uid: int) -> None:
        """Drop a sequence, queued or running, and free its memory. Unknown uids are ignored.
        A round in flight is read first (its other rows' tokens come with the next step)."""
        if self.pending is not None and any(r.uid == uid for r in self.active):
            with mx.stream(GENERATION_STREAM):
                self.held += self._read(self.pending)
            self.pending = self.batch.unsettled = None
        self.held = [e for e in self.held if e.uid != uid]
        self.admission.remove(uid)
        for gone, row in enumerate(self.active):
            if row.uid == uid:
                self.admission.store(row.verified, self.cache, gone)
                self.batch.keep([i for i in range(len(self.active)) if i != gone])
                break

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
        self.admission.clear()
        self.batch.clear()
        self.pending, self.held = None, []

    def _admit(self) -> List[RowEvent]:
        """Move waiting rows into the prefill group while the batch has room, and run one
        chunk of at most `prefill_step_size` prompt tokens per row for the whole group.
        Rows whose prompt is done choose their first token and join the batch."""
        self.admission.admit(self.max_batch_size - len(self.active) - len(self.admission.prefilling))
        if not self.admission.prefilling:
            return []
        self.last_read = None  # the next outcome's wait holds this prefill: not a round's time
        tic = time.perf_counter()
        rows, done, hidden = self.admission.chunk()
        events = self._first_tokens([rows[i] for i in done], hidden, done) if done else []
        self.admission.finish_chunk(rows, done, tic)
        return events

    def _first_tokens(self, rows: List[Row], hidden: mx.array, cache_rows: List[int]) -> List[RowEvent]:
        """Each row's token from its prompt's last hidden state [D, 1, hidden]; rows that
        go on join the batch with their prefill cache rows `cache_rows`."""
        prefill_cache = self.admission.cache
        groups, judged, tokens, keys = first_tokens(self.target, rows, hidden)
        mx.eval([j.arrays() for j in judged], tokens, keys, hidden, [(c.keys, c.values) for c in prefill_cache])
        events = first_events(rows, groups.members, judged, self.eos)
        joined = [i for i, e in events if e.finish_reason is None]
        for i, _ in events:  # the prompt's K/V, for later prompts sharing its start (a system prompt),
            # which the row's final cache can no longer roll back to once its sliding window moved on
            self.admission.store(rows[i].prompt.tolist(), prefill_cache, cache_rows[i])
        if joined:
            index = mx.array(joined)
            self.batch.join([rows[i] for i in joined], [c.select([cache_rows[i] for i in joined]) for c in prefill_cache],
                            tokens[index], hidden[index], keys[index])
        return [e for _, e in events]

    def _round(self) -> List[RowEvent]:
        """Queue a round for every active row, and read the round queued before it."""
        previous, self.pending = self.pending, None
        ahead = self.batch.queues_ahead(self.target.compiled)
        events = []
        # A round queued behind one that ends every row would be computed and dropped:
        # when the round in flight may reach every row's max_tokens, read it first.
        if previous is not None and (not ahead or may_end_every_row(previous.rows, previous.ks)):
            events += self._read(previous)
            previous, self.batch.unsettled = None, None
        queued = self._queue() if self.active else None
        if previous is not None:
            events += self._read(previous, next_k=queued.K if queued else None)
        if queued is not None and not ahead:
            events += self._read(queued)
            queued, self.batch.unsettled = None, None
        if queued is not None and not self.active:  # every row finished: let it run out, drop it
            mx.eval(queued.arrays())
            queued = None
        self.pending = queued
        return events

    def _queue(self) -> Pending:
        """Draft, verify and judge a round for every active row: a lazy graph, queued.
        Rows drafting `auto` draft the k the engine's controller chooses for this round."""
        auto = [r for r in self.active if r.auto]
        if auto:
            k = self.controller.choose()
            for r in auto:
                r.k = k
        return queue_round(self.target, self.drafter, self.batch)

    def _read(self, pending: Pending, next_k: Optional[int] = None) -> List[RowEvent]:
        """Wait for a queued round and hand out its tokens: each of its rows still active
        gets its event, its cache drops the drafts it rejected, and rows that finished
        leave. `next_k`: the K of the round queued after it (None: none is)."""
        index = {id(r): i for i, r in enumerate(self.active)}
        outcomes = pending.outcomes()  # waits for the device
        now = time.perf_counter()
        timed = self.last_read is not None and next_k in (None, pending.K)
        seconds = now - self.last_read if timed else None
        self.last_read = now
        lengths = list(self.cache[0].lengths)
        events = {}
        for b, values in zip(pending.groups.order, outcomes):
            row, k = pending.rows[b], pending.ks[b]
            i = index.get(id(row))
            if i is None:  # it finished, or left, after this round was queued
                continue
            events[i] = emit(row, k, self.eos, *values)
            lengths[i] -= pending.K - values[1]  # its rejected drafts
            if row.auto:  # the round's time once, every auto row's acceptance
                self.controller.observe(k, values[1], seconds)
                seconds = None
        self.batch.set_lengths(lengths)  # each row keeps exactly its verified positions (and the queued round's)
        finished = [i for i, e in events.items() if e.finish_reason is not None]
        if finished:
            for i in finished:
                self.admission.store(self.active[i].verified, self.cache, i)
            self.batch.keep([i for i in range(len(self.active)) if i not in finished])
        return [events[i] for i in sorted(events)]
