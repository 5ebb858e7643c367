"""`gemma-mtp bench --profile`: where a speculative round's time goes.

A round is: build the next round's lazy graph (draft, verify forward, acceptance) and queue
it (`mx.async_eval`), then wait for the device to finish the round before it
(`accepted.item()`, the one host synchronisation), settle the caches and hand its tokens
out. The device runs the earlier round while the host builds (rounds with logits
processors build only after the wait, with nothing queued). This runs the real round
(`speculative.generate_rounds`) with the target, drafter and sampling wrapped in timers,
and splits each round's wall time into those host phases, the queueing call, and the rest:
waiting for the device plus the bookkeeping between rounds. On MLX's CPU backend
`mx.async_eval` returns only once few operations are left in flight, so there `queue`
holds most of the device's time and `wait` little of it.
"""

import statistics
import time
from contextlib import contextmanager
from typing import Dict, List, Sequence, Union

import mlx.core as mx

from ..adaptive import AUTO, AUTO_MAX_DRAFT_TOKENS, DraftLengthController
from ..generate import encode_prompt
from ..sampling import Sampling
from ..speculative import generate_rounds
from ..target import Target

PHASES = ("draft", "verify", "accept", "queue")
BUILD = ("draft", "verify", "accept")  # host graph building


class _Clock:
    def __init__(self):
        self.spent = {phase: 0.0 for phase in PHASES}

    def timed(self, phase: str, fn):
        def call(*args, **kwargs):
            tic = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[phase] += time.perf_counter() - tic
        return call


class _TimedTarget(Target):
    """The target, with the time spent building its forward graphs counted as `verify`."""

    def __init__(self, target: Target, clock: _Clock):
        super().__init__(target.model, target.vision, target.placeholder_ids, target.pad_token_id)
        self._forward = clock.timed("verify", super().__call__)

    def __call__(self, tokens, cache, unsettled=None):
        return self._forward(tokens, cache, unsettled)


class _Proxy:
    """Delegates to `inner`, timing the named methods under their phases."""

    def __init__(self, inner, clock: _Clock, phases: Dict[str, str]):
        self._inner, self._clock, self._phases = inner, clock, phases

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        return self._clock.timed(self._phases[name], value) if name in self._phases else value


@contextmanager
def _timed_queueing(clock: _Clock):
    real = mx.async_eval
    mx.async_eval = clock.timed("queue", real)
    try:
        yield
    finally:
        mx.async_eval = real


def profile_rounds(target: Target, tokenizer, drafter, prompts: Sequence, *, k: Union[int, str],
                   temp: float = 0.0, max_tokens: int = 64) -> dict:
    """Per-round medians in ms over every round after the first of every prompt: `round`
    (wall), the host phases `draft`, `verify`, `accept` (graph building) and `queue`
    (mx.async_eval), and `wait_and_bookkeeping` (the rest). Also tokens per round and the
    share of the round spent building graphs on the host (`host_build_share`). `k`: a
    fixed draft length, or "auto" (each prompt's rounds choose theirs, as `stream_generate`'s)."""
    widest = AUTO_MAX_DRAFT_TOKENS if k == AUTO else k
    clock = _Clock()
    timed_target = _TimedTarget(target, clock)
    timed_drafter = _Proxy(drafter, clock, {"draft": "draft"}) if k else None
    sampling = Sampling(temp=temp, draft_mode="sampled")
    timed_sampling = _Proxy(sampling, clock, {"process": "accept", "accept": "accept", "sample": "accept"})
    rounds: List[Dict[str, float]] = []
    with _timed_queueing(clock):
        for prompt in prompts:
            ids = encode_prompt(tokenizer, prompt)
            cache = target.make_cache(widest)
            draft_length = DraftLengthController(widest) if k == AUTO else k
            stream = generate_rounds(ids, timed_target, cache, timed_sampling, timed_drafter, draft_length)
            produced, before, tic = 0, None, None
            for round_ in stream:
                now = time.perf_counter()
                if tic is not None:
                    spent = {p: (clock.spent[p] - before[p]) * 1e3 for p in PHASES}
                    wall = (now - tic) * 1e3
                    rounds.append(dict(round=wall, **spent, tokens=len(round_.emitted),
                                       wait_and_bookkeeping=wall - sum(spent.values())))
                produced += len(round_.emitted)
                if produced >= max_tokens:
                    break
                before, tic = dict(clock.spent), time.perf_counter()
            stream.close()
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    total_ms = sum(r["round"] for r in rounds)
    host = sum(r[p] for r in rounds for p in BUILD)
    return dict(k=k, temp=temp, rounds=len(rounds), median_ms=medians,
                tokens_per_round=sum(r["tokens"] for r in rounds) / len(rounds),
                host_build_share=host / total_ms, tokens_per_s=sum(r["tokens"] for r in rounds) / total_ms * 1e3)


def markdown_table(profiles: List[dict]) -> str:
    lines = ["| k | rounds | tokens/round | round ms | draft build | verify build | accept build | queue "
             "| wait + bookkeeping | host build share | tokens/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in profiles:
        m = p["median_ms"]
        lines.append(f"| {p['k']} | {p['rounds']} | {p['tokens_per_round']:.2f} | {m['round']:.2f} | {m['draft']:.2f} "
                     f"| {m['verify']:.2f} | {m['accept']:.2f} | {m['queue']:.2f} | {m['wait_and_bookkeeping']:.2f} "
                     f"| {p['host_build_share']:.0%} | {p['tokens_per_s']:.1f} |")
    return "\n".join(lines)
