"""The speculative round: draft k -> verify k + 1 -> accept -> roll back.

One host synchronisation per round. The next round is queued on the device
(`mx.async_eval`) before the current round's tokens are handed to the caller, so
detokenising and streaming overlap with the device's work.
"""

from dataclasses import dataclass
from typing import Generator, List, Optional, Sequence

import mlx.core as mx

from .cache import rollback_cache
from .target import Target


@dataclass
class Round:
    """What one round proposed and kept."""

    position: int  # position of the token the round starts from
    drafted: List[int]
    accepted: int  # leading drafts the target kept
    emitted: List[int]  # accepted drafts + one target token
    from_prefill: bool = False  # the first token, sampled from the prompt's last logits


def prefill(target: Target, prompt: mx.array, cache: List, step_size: int = 512):
    """Run the prompt through the target in chunks of `step_size`; return the last
    position's (logits [vocab], hidden [1, 1, hidden])."""
    start = 0
    while prompt.size - start > step_size:
        target(prompt[None, start : start + step_size], cache)
        mx.eval([(c.keys, c.values) for c in cache])
        start += step_size
    logits, hidden = target(prompt[None, start:], cache)
    return logits[0, -1], hidden[:, -1:]


def greedy_accept(drafts: mx.array, logits: mx.array):
    """drafts [k], target logits [k + 1, vocab] -> (accepted count [], target tokens [k + 1])."""
    choices = mx.argmax(logits, axis=-1)
    matches = drafts == choices[: drafts.size]
    accepted = mx.cumprod(matches.astype(mx.int32)).sum()
    return accepted, choices


def generate_rounds(
    prompt: mx.array,
    target: Target,
    cache: List,
    drafter=None,
    num_draft_tokens: int = 0,
    prefill_step_size: int = 512,
) -> Generator[Round, None, None]:
    """Yield rounds forever (the caller stops). Greedy drafting and greedy verification.

    The first round carries only the token chosen from the prompt's last logits.

    The cache is left holding exactly the verified positions before the newest token of
    the last round that was handed out.
    """
    k = num_draft_tokens if drafter is not None else 0
    position = (cache[0].offset if cache else 0) + prompt.size
    logits, hidden = prefill(target, prompt, cache, prefill_step_size)
    token = mx.argmax(logits, keepdims=True)  # [1]

    def schedule(token, hidden, position):
        if k:
            drafts = drafter.draft(
                target.embed, token, hidden, position, target.drafter_kv(cache), k
            )
        else:
            drafts = mx.array([], dtype=mx.uint32)
        logits, hiddens = target(mx.concatenate([token, drafts])[None], cache)
        accepted, choices = greedy_accept(drafts, logits[0])
        mx.async_eval(drafts, accepted, choices, hiddens)
        return drafts, accepted, choices, hiddens

    pending = schedule(token, hidden, position)
    try:
        yield Round(position - 1, [], 0, token.tolist(), from_prefill=True)
        while True:
            drafts, accepted, choices, hiddens = pending
            pending = None
            n = accepted.item()
            drafted = drafts.tolist()
            rollback_cache(cache, position + n + 1)
            emitted = drafted[:n] + [choices[n].item()]
            round_ = Round(position, drafted, n, emitted)
            token, hidden, position = choices[n : n + 1], hiddens[:, n : n + 1], position + n + 1
            pending = schedule(token, hidden, position)
            yield round_
    finally:
        if pending is not None:  # the caller stopped: drop the round still in flight
            mx.eval(pending)
            rollback_cache(cache, position)
