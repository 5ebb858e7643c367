"""The batched drafter sees what the single-stream drafter sees.

Greedy token equality (test_batch.py) cannot show a wrong drafter input in the batch: the
fixture drafters are random, their drafts are rejected whatever they saw, and rejection
keeps the output exact. Here every draft step of every row in `BatchEngine` is compared,
as log-probabilities, with the single-stream draft (`speculative.draft`: `Drafter.draft`
over `Target.drafter_kv` of a cache holding the row's verified tokens) fed the same
newest token and the same drafts: the drafter's position P, its window of the target's
sliding-layer K/V (the last `window + 1` verified positions) and its full-attention K/V.
Rows start just below, at and just past the sliding window, and past 3x the window.
"""

import mlx.core as mx
import numpy as np
import pytest

from conftest import PAIRS, Pair, eos_tokens, prompt_of
from gemma_mtp_mlx import load
from gemma_mtp_mlx.batch import BatchEngine
from gemma_mtp_mlx.sampling import Sampling
from gemma_mtp_mlx.speculative import RoundInput, draft, prefill

K = 3
ROUNDS = 3


class RecordingDrafter:
    """The real drafter, keeping the output state of every `step` the batch engine runs
    (one per drafted token, all rows at once)."""

    def __init__(self, drafter):
        self.drafter = drafter
        self.states = []  # per step: [B, 1, H]

    def __getattr__(self, name):
        return getattr(self.drafter, name)

    def step(self, *args, **kwargs):
        state, hidden = self.drafter.step(*args, **kwargs)
        self.states.append(state)
        return state, hidden


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def batched_draft_steps(pair, prompts):
    """Run ROUNDS engine steps over `prompts` (greedy, k = K). Per round and row: (the
    row's tokens up to its newest, which the round drafts after; the drafts [K]; the
    drafter's log q [K, vocab])."""
    recorder = RecordingDrafter(pair.drafter)
    engine = BatchEngine(pair.target, pair.tokenizer, recorder, num_draft_tokens=K)
    uids = [engine.insert(p, max_tokens=ROUNDS * (K + 1) + 1) for p in prompts]
    sequences = {uid: list(p) for uid, p in zip(uids, prompts)}
    rounds = []
    with eos_tokens(pair.tokenizer, []):
        for _ in range(ROUNDS):
            recorder.states.clear()
            # The step hands out the tokens of the round queued the step before (the first
            # step, the token chosen from each prompt), then queues the next round, which
            # drafts after them.
            for event in engine.step():
                sequences[event.uid] += event.tokens
            states = mx.concatenate(recorder.states, axis=1)  # [B, K, H]
            drafts = np.array(pair.drafter.greedy_token(states))
            log_q = np.array(log_softmax(pair.drafter.logits(states)))
            # All rows joined at the first step in insertion order and none has left, so
            # batch row b is prompt b.
            assert len(states) == len(uids)
            rounds.append([(list(sequences[uid]), drafts[b], log_q[b]) for b, uid in enumerate(uids)])
    return rounds


class GivenDrafts:
    """The real drafter, made to draft the given tokens (the batch's drafts) while
    returning its own log q at each step."""

    def __init__(self, drafter, drafts):
        self.drafter = drafter
        self.drafts = drafts

    def draft(self, embed, token, hidden, position, shared_kv, num_tokens, sample=None, keys=None):
        given = iter(self.drafts)

        def take_given_draft(tokens, logits):
            return mx.array([next(given)], dtype=mx.uint32), log_softmax(logits)

        return self.drafter.draft(embed, token, hidden, position, shared_kv, num_tokens, take_given_draft)


class SingleStreamRow:
    """One row as single-stream decoding holds it: a cache of its verified tokens, grown
    round by round as `speculative.generate_rounds` grows it."""

    def __init__(self, pair):
        self.pair = pair
        self.cache = pair.target.make_cache(K)
        self.verified = 0

    def log_q(self, sequence, drafts):
        """The drafter's log q [K, vocab] after `sequence`'s last token (its position
        P = len(sequence) - 1, every earlier token verified), fed `drafts`, through the
        single-stream draft (`speculative.draft`)."""
        new = mx.array(sequence[self.verified : -1], dtype=mx.uint32)
        _, hidden = prefill(self.pair.target, new, self.cache)
        self.verified = len(sequence) - 1
        history = mx.array(sequence[:-1], dtype=mx.uint32)
        start = RoundInput(mx.array(sequence[-1:], dtype=mx.uint32), hidden, self.verified, history)
        drafter = GivenDrafts(self.pair.drafter, drafts.tolist())
        _, log_q = draft(self.pair.target, drafter, self.cache, Sampling(), start, K)
        return np.array(log_q)


def around_the_window(window: int):
    """First-round positions P: the drafter's sliding view (the last window + 1 verified
    positions) is everything below P = window + 1 and a strict suffix from there on."""
    return [window - 1, window, window + 1, 3 * window + 2]


def check_every_draft_step(pair, prompts):
    """Compare every draft step of every row, batched and single-stream; return each
    row's position at each round [ROUNDS, rows]."""
    rows = [SingleStreamRow(pair) for _ in prompts]
    rounds = batched_draft_steps(pair, prompts)
    for r, row_states in enumerate(rounds):
        for row, (sequence, drafts, batched) in zip(rows, row_states):
            reference = row.log_q(sequence, drafts)
            np.testing.assert_allclose(batched, reference, rtol=1e-4, atol=1e-5,
                                       err_msg=f"round {r}, row at position {len(sequence) - 1}")
    return np.array([[len(sequence) - 1 for sequence, _, _ in row_states] for row_states in rounds])


@pytest.mark.parametrize("pair", list(PAIRS))
def test_batched_draft_steps_equal_single_stream_around_the_window(pair, mlx_pairs):
    p = mlx_pairs[pair]
    lengths = around_the_window(p.target.args.sliding_window)
    check_every_draft_step(p, [prompt_of(n, seed=n) for n in lengths])


def test_batched_draft_steps_equal_single_stream_with_ragged_acceptance():
    """The trained default pair accepts different numbers of drafts per row and round, so
    each row's cache is rolled back by its own amount between rounds (rows around its
    window only: the fixture pairs cover 3x the window, cheaply)."""
    p = Pair(*load())
    ids = p.tokenizer.encode("def parse(self, text):\n    for line in text.splitlines():\n        if not line:\n")
    lengths = around_the_window(p.target.args.sliding_window)[:3]
    positions = check_every_draft_step(p, [(ids * (n // len(ids) + 1))[:n] for n in lengths])
    advanced = np.diff(positions, axis=0)  # [ROUNDS - 1, rows]: tokens each row kept per round
    assert (advanced.min(axis=1) < advanced.max(axis=1)).any() and advanced.max() > 1
