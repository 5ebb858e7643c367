"""Planted acceptance (`gemma-mtp bench --planted-acceptance A`): acceptance as a dial.

Random or badly matched drafters accept almost nothing, which says nothing about what a
round costs when drafts are good. Here the real drafter runs every round and pays its full
cost; then each draft at sequence position p is replaced by the token plain greedy
decoding of the same target emits at p with probability A, and by some other token
otherwise. Verify, acceptance and the host's work are the real round's, and the output
stays the target's own. Greedy only: planted drafts do not follow the drafter's
distribution q, so sampled acceptance (which divides by q) would no longer be exact.
"""

from typing import List, Sequence

import mlx.core as mx
import numpy as np

from ..generate import stream_generate
from .selfcheck import first_difference


def greedy_continuation(target, tokenizer, prompt: List[int], max_tokens: int) -> List[int]:
    """The tokens plain greedy decoding of `target` emits after `prompt`."""
    return [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=max_tokens)]


class PlantedDrafter:
    """Wraps a drafter: its drafts, then the planted tokens in their place.

    `sequence` is the prompt and its plain greedy continuation, so `sequence[p]` is the
    target's token at position p. Whether position p gets the right token is drawn once per
    position (seeded): a round that rejects the draft at p emits the target's token there
    and starts the next round from it, so no position is judged twice and each judged
    position is accepted with probability A, independently. Past the end of `sequence` the
    drafter's own tokens stay.

    The replacement is built on the device from the round's position, which is an MLX
    array when the round is queued before the one before it is read: no host
    synchronisation is added. The drafter's drafts are an input of the replacement, so
    MLX computes them (the drafter's whole cost) even where every one is replaced; the
    replacement itself is a gather and a select over k tokens.
    """

    def __init__(self, drafter, sequence: Sequence[int], acceptance: float, vocab_size: int, seed: int = 0):
        if not 0 <= acceptance <= 1:
            raise ValueError(f"planted acceptance must be between 0 and 1, got {acceptance}")
        self.drafter = drafter
        self.acceptance = acceptance
        self.sequence = list(sequence)
        rng = np.random.default_rng(seed)
        right = np.array(self.sequence, dtype=np.int64)
        wrong = (right + rng.integers(1, vocab_size, size=right.size)) % vocab_size  # never the right token
        planted = rng.random(right.size) < acceptance
        self.tokens = mx.array(np.where(planted, right, wrong), dtype=mx.int32)  # [len(sequence)]

    @property
    def default_num_draft_tokens(self) -> int:
        return self.drafter.default_num_draft_tokens

    def draft(self, embed, token, hidden, position, shared_kv, num_tokens, sample=None, keys=None):
        """The wrapped drafter's `draft`, with the planted tokens in place of its drafts."""
        drafts, logq = self.drafter.draft(embed, token, hidden, position, shared_kv, num_tokens, sample, keys)
        positions = mx.array(position, dtype=mx.int32) + 1 + mx.arange(num_tokens, dtype=mx.int32)  # [k]
        planted = mx.take(self.tokens, mx.minimum(positions, self.tokens.size - 1))  # [k]
        inside = positions < self.tokens.size
        return mx.where(inside, planted.astype(drafts.dtype), drafts), logq


def check_greedy(temps: Sequence[float]) -> None:
    """Planted acceptance is refused at a temperature above 0, saying why."""
    sampled = [t for t in temps if t > 0]
    if sampled:
        raise ValueError(
            f"planted acceptance needs greedy decoding (--temps 0), got temperatures {sampled}: planted drafts "
            "do not follow the drafter's distribution q, so sampled acceptance would no longer keep the "
            "target's distribution exactly"
        )


def planted_drafters(target, tokenizer, drafter, prompts: List[List[int]], acceptances: Sequence[float], *,
                     max_tokens: int, seed: int = 0) -> dict:
    """{A: one PlantedDrafter per prompt} over each prompt's plain greedy continuation of
    `max_tokens` tokens; prompt i draws with seed `seed + i` (the same draws every repeat)."""
    sequences = [prompt + greedy_continuation(target, tokenizer, prompt, max_tokens) for prompt in prompts]
    return {a: [PlantedDrafter(drafter, sequence, a, target.vocab_size, seed + i)
                for i, sequence in enumerate(sequences)]
            for a in acceptances}


def planted_exactness(target, tokenizer, drafters: dict, prompts: List[List[int]], *, num_draft_tokens: int,
                      max_tokens: int) -> dict:
    """Greedy speculative output with each planted drafter == the plain greedy output it
    plants: `ok`, `identical`, `runs`, `k` and, per A, each prompt's first differing index
    (None where identical)."""
    divergence = {}
    for a, per_prompt in drafters.items():
        divergence[str(a)] = []
        for prompt, planted in zip(prompts, per_prompt):
            spec = [r.token for r in stream_generate(target, tokenizer, prompt, draft_model=planted,
                                                     num_draft_tokens=num_draft_tokens, max_tokens=max_tokens)]
            divergence[str(a)].append(first_difference(planted.sequence[len(prompt):], spec))
    every = [d for ds in divergence.values() for d in ds]
    identical = sum(d is None for d in every)
    return dict(ok=identical == len(every), identical=identical, runs=len(every), k=num_draft_tokens,
                first_divergence=divergence)

