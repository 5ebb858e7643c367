"""The speculative round: draft k -> verify k + 1 -> accept -> roll back.

One host synchronisation per round, and the device never waits for the host: round r + 1
is built and queued (`mx.async_eval`) before the host reads round r's outcome. Its input
token, hidden state, position and cache slots are taken on the device from round r's
accepted count; the caches' offsets on the host count all of round r's drafts until that
count is read, then drop the rejected ones ("settle"). Building a round's graphs takes the
host a fifth of a round on the default pair: this hides it. Rounds with logits processors
(which read the tokens so far) and caches the compiled forward does not take wait for the
outcome first.
"""

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Generator, List, Optional, Tuple, Union

import mlx.core as mx

from .cache import rollback_cache
from .media.merge import MediaPrompt
from .sampling import Sampling
from .target import Target


# Rounds are built and run on their own stream, so queuing the next one does not wait on
# work the caller puts on the default stream (as mlx-lm's generate_step does). MLX streams
# belong to the thread that made them: a thread-local one works from any thread (a server's).
GENERATION_STREAM = mx.new_thread_local_stream(mx.default_device())


@dataclass
class Round:
    """What one round proposed and kept."""

    position: int  # position of the token the round starts from
    drafted: List[int]
    accepted: int  # leading drafts the target kept
    emitted: List[int]  # accepted drafts + one target token
    logprobs: List[float]  # each emitted token's log-probability under the target
    from_prefill: bool = False  # the first token, chosen from the prompt's last logits
    k: int = 0  # drafts the round was built for (a round cut at a stop drafted fewer)


@dataclass
class RoundInput:
    """Where a round starts: the newest token, which the cache does not hold yet."""

    token: mx.array  # [1]
    hidden: mx.array  # [1, 1, hidden]: the target's final-norm state that chose `token`
    position: int  # position of `token`, counting every draft of the round before as kept until settled
    history: mx.array  # every token before `token` (kept current only for logits processors)
    unsettled: Optional[mx.array] = None  # int32 []: the round before's rejected drafts, not yet read


@dataclass
class PendingRound:
    """A round queued on the device; nothing in it has been waited on yet."""

    position: int  # position of the round's input token
    drafts: mx.array  # [k]
    accepted: mx.array  # []: leading drafts the target kept
    choices: mx.array  # [k + 1]: the target's token after each input; index `accepted` is emitted
    hiddens: mx.array  # [1, k + 1, hidden]: the target's final-norm state at each input
    draft_logprobs: mx.array  # [k]: each draft's log-probability under the target
    choice_logprobs: mx.array  # [k + 1]: each choice's
    k: int = 0  # drafts asked for

    def arrays(self) -> Tuple[mx.array, ...]:
        return (self.drafts, self.accepted, self.choices, self.hiddens, self.draft_logprobs, self.choice_logprobs)

    def result(self) -> Round:
        """Wait for the device (the round's one synchronisation) and read what it kept."""
        n = self.accepted.item()
        drafted = self.drafts.tolist()
        emitted = drafted[:n] + [self.choices.tolist()[n]]
        logprobs = self.draft_logprobs.tolist()[:n] + [self.choice_logprobs.tolist()[n]]
        return Round(self.position, drafted, n, emitted, logprobs, k=self.k)


def prefill(target: Target, prompt: mx.array, cache: List, step_size: int = 512,
            media: Optional[MediaPrompt] = None):
    """Run the prompt through the target in chunks of `step_size` (a chunk never ends
    inside one of `media`'s images); return the last position's (logits [1, vocab],
    hidden [1, 1, hidden])."""
    start = 0
    while True:
        end = min(start + step_size, prompt.size)
        end = end if media is None else media.chunk_end(start, end)
        chunk = None if media is None else media.chunk(start, end)
        if chunk is None:
            logits, hidden = target(prompt[None, start:end], cache)
        else:
            logits, hidden = target(prompt[None, start:end], cache, media=chunk)
        if end == prompt.size:
            return logits[0, -1:], hidden[:, -1:]
        mx.eval([(c.keys, c.values) for c in cache])
        start = end


def generate_rounds(
    prompt: mx.array,
    target: Target,
    cache: List,
    sampling: Sampling,
    drafter=None,
    num_draft_tokens: Union[int, "DraftLengthController"] = 0,
    prefill_step_size: int = 512,
    max_tokens: Optional[int] = None,
    media: Optional[MediaPrompt] = None,
) -> Generator[Round, None, None]:
    """Yield rounds until the caller stops. The first round carries only the token chosen
    from the prompt's last logits.

    `num_draft_tokens` is every round's k, or a controller (adaptive.py) asked for each
    round's k and told each round's outcome and duration; the cache must have rollback
    room for its largest k. When a round is yielded the cache holds every verified
    position before the round's newest token, and the positions of the round queued after
    it. When the caller stops, that round in flight is finished, and the cache keeps its
    positions: the caller rolls it back to what it kept (`rollback_cache`). `max_tokens`:
    the tokens the caller will take at most (the first round's included); no round is
    queued behind one that may reach it, as it would be computed and dropped. `media`:
    the prompt's images (prefill only; every round is text).
    """
    controller = num_draft_tokens if drafter is not None and not isinstance(num_draft_tokens, int) else None
    k = num_draft_tokens if drafter is not None and controller is None else 0
    start, first_logprob = first_token(target, prompt, cache, sampling, prefill_step_size, media)
    budget = math.inf if max_tokens is None else max_tokens
    # Queued before the first token is handed out, unless that token is all the caller takes.
    pending = None if budget == 1 else queue_round(target, drafter, cache, sampling, start,
                                                         round_length(controller, k))
    widest = controller.max_k if controller is not None else k
    ahead = not sampling.logits_processors and target.compiled.handles_length(widest + 1, cache)
    clock = RoundClock(controller, every_round_ahead=ahead)
    taken = 1  # tokens yielded so far
    try:
        yield Round(start.position - 1, [], 0, start.token.tolist(), first_logprob.tolist(), from_prefill=True)
        while True:
            if pending is None:  # the caller went on past max_tokens
                pending = queue_round(target, drafter, cache, sampling, start, round_length(controller, k))
            current, pending = pending, None
            last = budget - taken <= current.k + 1  # it may be the last round
            if (ahead or not current.k) and not last:
                # Queue the next round before waiting for this one (a plain round keeps its
                # one token: nothing to settle), so the device never idles while the host
                # builds a graph.
                start = next_input(sampling, start, current, None if current.k else 0)
                pending = queue_round(target, drafter, cache, sampling, start, round_length(controller, k))
            round_ = current.result()
            clock.observe(round_, next_k=None if pending is None else pending.k)
            taken += len(round_.emitted)
            if pending is None:
                rollback_cache(cache, round_.position + round_.accepted + 1)  # drop the rejected drafts
                start = next_input(sampling, start, current, round_.accepted)
                if taken < budget:
                    pending = queue_round(target, drafter, cache, sampling, start, round_length(controller, k))
            elif current.k:
                settle(cache, current.k - round_.accepted)
                start.position = pending.position = round_.position + round_.accepted + 1
                start.unsettled = None
            yield round_
    finally:
        if pending is not None:  # the caller stopped: let the round in flight finish
            mx.eval(pending.arrays())


def round_length(controller, k: int) -> int:
    """The next round's k: the controller's choice, else the fixed k."""
    return controller.choose() if controller is not None else k


class RoundClock:
    """Tells an adaptive controller each round's outcome and how long it took (host time
    between consecutive round results; no extra synchronisation)."""

    def __init__(self, controller, every_round_ahead: bool = False):
        self.controller = controller
        self.every_round_ahead = every_round_ahead  # each round is queued before the one before finishes
        self.finished: Optional[float] = None  # when the last round's outcome reached the host
        self.overlapped = False  # the round now in flight was queued before the last one finished

    def observe(self, round_: Round, next_k: Optional[int]) -> None:
        """`next_k`: the k of the round queued before this one's outcome was read (None:
        none was)."""
        if self.controller is None:
            return
        now = time.perf_counter()
        if self.every_round_ahead:
            # The time since the last outcome holds the host building the next round as
            # well as this round's device time: it is this width's cost only when the next
            # round has the same width.
            timed = next_k == round_.k
        else:
            # Only plain rounds are queued ahead: a drafting round queued behind a plain one
            # ran partly before `finished`, so its time is unknown; back-to-back plain
            # rounds share the time out on average.
            timed = not (round_.k and self.overlapped)
        seconds = now - self.finished if timed and self.finished is not None else None
        self.controller.observe(round_.k, round_.accepted, seconds)
        self.finished, self.overlapped = now, next_k is not None


def first_token(target: Target, prompt: mx.array, cache: List, sampling: Sampling, step_size: int,
                media: Optional[MediaPrompt] = None):
    """Prefill the prompt and choose the token after it: (the first round's input, that
    token's log-probability [1])."""
    position = (cache[0].offset if cache else 0) + prompt.size
    # All model work runs on the one generation stream: in a tensor-parallel run, work on
    # two streams could reach its all-reduces in different orders on different ranks.
    with mx.stream(GENERATION_STREAM):
        logits, hidden = prefill(target, prompt, cache, step_size, media)
        logprobs = sampling.process(prompt[:-1], prompt[-1:], logits)  # [1, vocab]
        token = sampling.sample(logprobs)  # [1]
    return RoundInput(token, hidden, position, prompt), token_logprobs(logprobs, token)


def queue_round(target: Target, drafter, cache: List, sampling: Sampling, start: RoundInput, k: int) -> PendingRound:
    """Draft k tokens after `start.token`, verify all k + 1 in one target forward, judge
    the drafts: a lazy graph, queued on the device."""
    with mx.stream(GENERATION_STREAM):
        drafts, draft_logq = draft(target, drafter, cache, sampling, start, k)
        inputs = mx.concatenate([start.token, drafts.astype(start.token.dtype)])  # [k + 1]
        logits, hiddens = target(inputs[None], cache, start.unsettled)
        if sampling.logits_processors:  # the verify runs while they work on the host (a grammar's masks)
            mx.async_eval(logits, hiddens)
        logprobs = sampling.process(start.history, inputs, logits[0])  # [k + 1, vocab]
        accepted, choices = sampling.accept(drafts, draft_logq, logprobs)
        pending = PendingRound(start.position, drafts, accepted, choices, hiddens,
                               token_logprobs(logprobs[:k], drafts), token_logprobs(logprobs, choices), k)
        mx.async_eval(pending.arrays())
    return pending


def draft(target: Target, drafter, cache: List, sampling: Sampling, start: RoundInput, k: int):
    """(drafts [k], the drafter's processed log q [k, vocab], or None when the drafts are
    its argmax)."""
    if not k:
        return mx.array([], dtype=mx.uint32), None
    sample = keys = None
    if sampling.drafts_processed:  # they read the drafts so far: op by op
        sample = partial(sample_draft, sampling, start.history)
    elif sampling.exact_distribution and sampling.draft_mode == "sampled":  # traced into the compiled draft
        sample, keys = sampling.draw, mx.random.split(sampling.keys.next(), k)
    shared_kv = target.drafter_kv(cache, start.unsettled)
    position = start.position if start.unsettled is None else start.position - start.unsettled
    return drafter.draft(target.embed, start.token, start.hidden, position, shared_kv, k, sample, keys)


def sample_draft(sampling: Sampling, history: mx.array, tokens: mx.array, logits: mx.array):
    """One draft from the drafter's processed distribution: (token [1], log q [1, vocab]).

    history: the tokens before the round; tokens [j + 1]: the round's input token and its
    j drafts so far; logits [1, vocab]: the drafter's after the last of them.
    """
    logq = sampling.process(mx.concatenate([history, tokens[:-1]]), tokens[-1:], logits)
    return sampling.sample(logq), logq


def next_input(sampling: Sampling, start: RoundInput, pending: PendingRound, accepted: Optional[int]) -> RoundInput:
    """The input of the round after `pending`, which kept `accepted` drafts (None: not
    read yet; taken on the device, the position counting every draft as kept)."""
    if accepted is None:
        n = pending.accepted.astype(mx.int32)
        return RoundInput(mx.take(pending.choices, n[None]), mx.take(pending.hiddens, n[None], axis=1),
                          start.position + pending.k + 1, start.history, pending.k - n)
    history = start.history
    if sampling.logits_processors:  # only they read the history
        kept = pending.drafts[:accepted].astype(start.token.dtype)
        history = mx.concatenate([history, start.token, kept])
    n = accepted
    return RoundInput(pending.choices[n : n + 1], pending.hiddens[:, n : n + 1], start.position + n + 1, history)


def settle(cache: List, rejected: int) -> None:
    """Drop a round's `rejected` drafts from the caches' offsets once the host knows their
    number. The next round, already queued, wrote its entries where they belong (right
    after the kept positions); the rejected drafts' slots lie past the new end and are no
    longer seen."""
    if rejected:
        for c in cache:
            c.trim(rejected)


def token_logprobs(logprobs: mx.array, tokens: mx.array) -> mx.array:
    """logprobs [N, vocab], tokens [N] -> each token's log-probability [N]."""
    return mx.take_along_axis(logprobs, tokens[:, None].astype(mx.int32), axis=-1)[:, 0]
