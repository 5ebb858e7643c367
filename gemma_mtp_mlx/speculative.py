"""The speculative round: draft k -> verify k + 1 -> accept -> roll back.

One host synchronisation per round. The next round is queued on the device
(`mx.async_eval`) before the current round's tokens are handed to the caller, so
detokenising and streaming overlap with the device's work.
"""

import time
from dataclasses import dataclass
from typing import Generator, List, Union

import mlx.core as mx

from .adaptive import DraftLengthController
from .cache import rollback_cache
from .sampling import Sampling
from .target import Target


# Rounds are built and run on their own stream, so queuing the next one does not wait on
# work the caller puts on the default stream (as mlx-lm's generate_step does).
GENERATION_STREAM = mx.new_stream(mx.default_device())


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


def prefill(target: Target, prompt: mx.array, cache: List, step_size: int = 512):
    """Run the prompt through the target in chunks of `step_size`; return the last
    position's (logits [1, vocab], hidden [1, 1, hidden])."""
    start = 0
    while prompt.size - start > step_size:
        target(prompt[None, start : start + step_size], cache)
        mx.eval([(c.keys, c.values) for c in cache])
        start += step_size
    logits, hidden = target(prompt[None, start:], cache)
    return logits[0, -1:], hidden[:, -1:]


def generate_rounds(
    prompt: mx.array,
    target: Target,
    cache: List,
    sampling: Sampling,
    drafter=None,
    num_draft_tokens: Union[int, DraftLengthController] = 0,
    prefill_step_size: int = 512,
) -> Generator[Round, None, None]:
    """Yield rounds until the caller stops. The first round carries only the token chosen
    from the prompt's last logits.

    `num_draft_tokens` is every round's k, or a controller (adaptive.py) asked for each
    round's k and told each round's outcome and duration; the cache must have rollback
    room for its largest k. The cache is left holding exactly the verified positions
    before the newest token of the last round that was handed out.
    """
    controller = num_draft_tokens if drafter is not None and not isinstance(num_draft_tokens, int) else None
    fixed_k = num_draft_tokens if drafter is not None and controller is None else 0
    next_k = controller.choose if controller is not None else lambda: fixed_k
    sampled_drafts = sampling.exact_distribution and sampling.draft_mode == "sampled"
    position = (cache[0].offset if cache else 0) + prompt.size
    logits, hidden = prefill(target, prompt, cache, prefill_step_size)
    logprobs = sampling.process(prompt[:-1], prompt[-1:], logits)
    token = sampling.sample(logprobs)  # [1]
    history = prompt  # every token before `token`

    def draft_sampler(history):
        """Draw drafts from the drafter's processed distribution, with their histories."""
        seen = [history]

        def sample(input_token, logits):
            logq = sampling.process(mx.concatenate(seen), input_token, logits)
            seen.append(input_token)
            return sampling.sample(logq), logq

        return sample

    def schedule(token, hidden, position, history):
        with mx.stream(GENERATION_STREAM):
            return build_round(next_k(), token, hidden, position, history)

    def build_round(k, token, hidden, position, history):
        drafts, draft_logprobs = mx.array([], dtype=mx.uint32), None
        if k:
            sample = draft_sampler(history) if sampled_drafts else None
            drafts, draft_logprobs = drafter.draft(
                target.embed, token, hidden, position, target.drafter_kv(cache), k, sample
            )
        inputs = mx.concatenate([token, drafts.astype(token.dtype)])
        logits, hiddens = target(inputs[None], cache)
        logprobs = sampling.process(history, inputs, logits[0])
        accepted, choices = sampling.accept(drafts, draft_logprobs, logprobs)
        draft_lp = mx.take_along_axis(logprobs[:k], drafts[:, None].astype(mx.int32), axis=-1)
        choice_lp = mx.take_along_axis(logprobs, choices[:, None], axis=-1)
        pending = (drafts, accepted, choices, hiddens, draft_lp, choice_lp)
        mx.async_eval(pending)
        return (k, *pending)

    first_logprob = mx.take_along_axis(logprobs, token[:, None], axis=-1)
    pending = schedule(token, hidden, position, history)
    finished = None  # when the last round's outcome reached the host
    overlapped = False  # the round was queued before the one ahead of it finished
    try:
        yield Round(position - 1, [], 0, token.tolist(), first_logprob.reshape(-1).tolist(), True)
        while True:
            k, drafts, accepted, choices, hiddens, draft_lp, choice_lp = pending
            pending = None
            timed, overlapped = not (k and overlapped), False
            if not k:
                # Plain decoding keeps every round's one token, so the next round does not
                # depend on this one's outcome: queue it before waiting (as mlx-lm does),
                # and the device never idles while the host builds a graph.
                if sampling.logits_processors:
                    history = mx.concatenate([history, token])
                token = choices
                pending, overlapped = schedule(token, hiddens, position + 1, history), True
            n = accepted.item()  # the round's one wait; the rest is already computed
            if controller is not None:
                now = time.perf_counter()
                # A drafting round queued behind a plain one ran partly before `finished`:
                # its time is unknown. Back-to-back plain rounds share it out on average.
                controller.observe(k, n, now - finished if finished is not None and timed else None)
                finished = now
            drafted = drafts.tolist()
            emitted = drafted[:n] + [choices.tolist()[n]]
            logprobs = draft_lp.reshape(-1).tolist()[:n] + [choice_lp.reshape(-1).tolist()[n]]
            round_ = Round(position, drafted, n, emitted, logprobs, k=k)
            if k:
                rollback_cache(cache, position + n + 1)
                if sampling.logits_processors:  # only they read the history
                    history = mx.concatenate([history, token, drafts[:n].astype(token.dtype)])
                token, hidden = choices[n : n + 1], hiddens[:, n : n + 1]
                pending = schedule(token, hidden, position + n + 1, history)
            position += n + 1
            yield round_
    finally:
        if pending is not None:  # the caller stopped: drop the round still in flight
            mx.eval(pending)
            rollback_cache(cache, position)
