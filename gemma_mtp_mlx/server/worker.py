"""The generation thread: it owns the model and drives the engine.

HTTP handlers (asyncio) hand `Job`s to `Worker.submit`; the thread admits them between
steps (round boundaries), runs `engine.step()`, turns each row's tokens into text with
the request's own detokenizer and stop strings (`Job.feed`), and pushes `Delta`s back to
the job's asyncio queue with `loop.call_soon_threadsafe`. `Worker.cancel` (a client that
went away) removes the row before the next step.
"""

import asyncio
import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from ..adaptive import AUTO, AUTO_MAX_DRAFT_TOKENS
from ..batch import RowEvent
from ..stats import SpeculativeStats

TopList = List[Tuple[str, float]]
PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")
# SpeculativeStats fields the usage block leaves out: usage counts tokens itself, and a
# server reports no timings per request
NOT_IN_USAGE = ("prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps", "peak_memory", "rounds_log")


def insert_request(engine, prompt: List[int], request: dict) -> int:
    """Queue a request's row on `engine`; returns its uid. `request` holds numbers only
    (`BatchEngine.insert`'s options, with the penalties in place of logits processors,
    which are built here), so another rank can replay it exactly."""
    options = {name: value for name, value in request.items() if name not in PENALTIES}
    processors = make_logits_processors(**{name: request.get(name) for name in PENALTIES})
    return engine.insert(prompt, logits_processors=processors, **options)


@dataclass
class TokenInfo:
    token: int
    text: str  # the token on its own, decoded
    logprob: float
    top: TopList  # the n most likely tokens there, with their log-probabilities


@dataclass
class Delta:
    """New text for a client; the last one has `finish_reason` and `usage`."""

    text: str
    tokens: List[TokenInfo]
    finish_reason: Optional[str] = None
    usage: Optional[dict] = None
    error: Optional[str] = None  # the request failed: the engine refused it (400) or broke (500)
    status: int = 500
    offset: int = 0  # where `text` starts in the whole reply


class Job:
    """One request: its options, and the text state the generation thread keeps for it."""

    def __init__(self, prompt: List[int], options: dict, stop: List[str], top_logprobs: int,
                 want_logprobs: bool, detokenizer, decode: Callable[[int], str], eos: set,
                 num_draft_tokens: Union[int, str], loop: asyncio.AbstractEventLoop):
        self.prompt, self.options, self.stop = prompt, options, stop
        self.top_logprobs, self.want_logprobs = top_logprobs, want_logprobs
        self.detokenizer, self.decode, self.eos = detokenizer, decode, eos
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.uid: Optional[int] = None
        self.cancelled = False
        self.done = False
        self.text = ""  # all text so far; text[:sent] has gone to the client
        self.sent = 0
        self.unsent: List[Tuple[int, TokenInfo]] = []  # tokens not yet reported, by text start offset
        self.completion_tokens = 0
        self.cached_tokens = 0
        auto = num_draft_tokens == AUTO
        # the row's rounds as they are handed out (a stop string may end the job before the row ends)
        self.stats = SpeculativeStats.empty(AUTO_MAX_DRAFT_TOKENS if auto else num_draft_tokens, len(prompt),
                                            auto=auto)

    def push(self, delta: Delta) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)

    def feed(self, event: RowEvent) -> Optional[Delta]:
        """The event's tokens as a Delta (None when all its text is held back); sets `done`
        when the row finished or a stop string ended it."""
        if event.cached_tokens is not None:
            self.cached_tokens = event.cached_tokens
        if event.round is not None:
            self.stats.record(event.round)
        finish, cut = None, False
        tops = event.top_logprobs or [[]] * len(event.tokens)
        for token, logprob, top in zip(event.tokens, event.logprobs, tops):
            self.completion_tokens += 1
            start = len(self.text)
            if token not in self.eos:
                self.detokenizer.add_token(token)
            if self.completion_tokens == self.options["max_tokens"] or token in self.eos:
                self.detokenizer.finalize()
            self.text += self.detokenizer.last_segment
            if self.want_logprobs:
                top = [(self.decode(t), lp) for t, lp in top]
                self.unsent.append((start, TokenInfo(token, self.decode(token), logprob, top)))
            stop_at = self._stop_at(start)
            if stop_at is not None:
                self.text = self.text[:stop_at]
                finish, cut = "stop", True
                break
        else:
            finish = event.finish_reason
        return self._delta(finish, cut)

    def _stop_at(self, start: int) -> Optional[int]:
        """Where the first stop string begins, if one ends in the new text."""
        first = None
        for s in self.stop:
            i = self.text.find(s, max(0, start - len(s) + 1))
            if i >= 0 and (first is None or i < first):
                first = i
        return first

    def _held_back(self) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _delta(self, finish: Optional[str], cut: bool) -> Optional[Delta]:
        """The text that can go out now; tokens are reported with the text they start."""
        end = len(self.text) if finish else len(self.text) - self._held_back()
        if end <= self.sent and not finish:
            return None
        offset, text = self.sent, self.text[self.sent:end]
        self.sent = max(self.sent, end)
        reported = [info for start, info in self.unsent if start < end or (finish and not cut)]
        self.unsent = self.unsent[len(reported):]
        if finish:
            self.done = True
            return Delta(text, reported, finish, self.usage(), offset=offset)
        return Delta(text, reported, offset=offset)

    def usage(self) -> dict:
        return dict(
            prompt_tokens=len(self.prompt),
            completion_tokens=self.completion_tokens,
            total_tokens=len(self.prompt) + self.completion_tokens,
            prompt_tokens_details=dict(cached_tokens=self.cached_tokens),
            speculative=self.speculative(),
        )

    def speculative(self) -> dict:
        """The usage block's `speculative` object: the row's `SpeculativeStats` counts and
        rates; `num_draft_tokens` is "auto" when each round chose its k."""
        out = {name: value for name, value in self.stats.to_dict().items() if name not in NOT_IN_USAGE}
        if out.pop("auto"):
            out["num_draft_tokens"] = AUTO
        return out


@dataclass
class Counters:
    """What /metrics reports; written by the generation thread only."""

    requests: Dict[str, int] = field(default_factory=dict)  # finish reason -> count
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0


class Worker:
    """The generation thread; `load()` runs in it, so MLX work stays on one thread."""

    def __init__(self, load: Callable[[], object]):
        self._load = load  # -> an object with the engine as `.engine` (app.Served)
        self.served = None
        self.engine = None
        self.ready = threading.Event()
        self.load_error: Optional[str] = None
        self.inbox: "queue.Queue[Tuple[str, Job]]" = queue.Queue()
        self.jobs: Dict[int, Job] = {}
        self.counters = Counters()
        self.idle_memory = 0
        self.on_load_error: Callable[[], None] = lambda: None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gemma-mtp-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self.inbox.put(("cancel", job))

    def _run(self) -> None:
        try:
            self.served = self._load()
            self.engine = self.served.engine
        except Exception as e:  # reported by /health and every request
            self.load_error = f"the model failed to load: {e}"
            self.on_load_error()
            return
        finally:
            self.ready.set()
        self.idle_memory = mx.get_active_memory()
        while not self._stopping.is_set():
            self._admit(block=not self.engine.has_work)
            if self.engine.has_work:
                self._step()

    def _admit(self, block: bool) -> None:
        try:
            action, job = self.inbox.get(timeout=0.2) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if action == "submit" and not job.cancelled:
                self._insert(job)
            elif action == "cancel" and job.uid in self.jobs:
                self.remove_row(job.uid)
                del self.jobs[job.uid]
                self._count_finish(job, "cancelled")
            try:
                action, job = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _insert(self, job: Job) -> None:
        try:
            job.uid = self.insert_row(job.prompt, dict(job.options, top_logprobs=job.top_logprobs))
        except ValueError as e:
            job.push(Delta("", [], "error", error=str(e), status=400))
            return
        self.jobs[job.uid] = job

    def _step(self) -> None:
        try:
            events = self.step_rows()
        except Exception as e:  # no request may take the server down: fail the rows in flight
            traceback.print_exc()
            for uid, job in list(self.jobs.items()):
                self.remove_row(uid)
                job.push(Delta("", [], "error", error=f"generation failed: {e}"))
                self._count_finish(job, "error")
            self.jobs.clear()
            return
        for event in events:
            job = self.jobs.get(event.uid)
            if job is not None:
                self._deliver(job, event)

    def _deliver(self, job: Job, event: RowEvent) -> None:
        try:
            delta = job.feed(event)
        except Exception as e:  # fail this request only
            traceback.print_exc()
            delta = Delta("", [], "error", error=f"generation failed: {e}")
            job.done = True
        if job.done:  # counted before the client hears of it, so /metrics is never behind
            del self.jobs[event.uid]
            if not event.finish_reason:  # a stop string or an error ended it: free the row now
                self.remove_row(event.uid)
            self._count_finish(job, delta.finish_reason)
        if delta is not None:
            job.push(delta)

    # Every change to the engine goes through these three (server/lockstep.py mirrors them).
    def insert_row(self, prompt: List[int], request: dict) -> int:
        return insert_request(self.engine, prompt, request)

    def remove_row(self, uid: int) -> None:
        self.engine.remove(uid)

    def step_rows(self) -> List[RowEvent]:
        return self.engine.step()

    def _count_finish(self, job: Job, reason: str) -> None:
        c = self.counters
        c.requests[reason] = c.requests.get(reason, 0) + 1
        c.prompt_tokens += len(job.prompt)
        c.cached_tokens += job.cached_tokens
        c.completion_tokens += job.completion_tokens
        c.rounds += job.stats.rounds
        c.drafted_tokens += job.stats.drafted_tokens
        c.accepted_tokens += job.stats.accepted_tokens
