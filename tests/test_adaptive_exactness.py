"""`num_draft_tokens="auto"` keeps the output exact whatever k each round uses: greedy
output equals the target alone past 3x the sliding window, and sampled output keeps the
target's distribution (the statistical test of test_sampling.py, at a smaller size)."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import PAIRS
from test_lossless import MAX_TOKENS, decisive_references, tokens
from test_sampling import MIN_EXPECTED, PROMPT, chi_square_p_value, exact_joint_with_processors
from gemma_mtp_mlx import DraftLengthController, stream_generate
from gemma_mtp_mlx.adaptive import AUTO_MAX_DRAFT_TOKENS
from gemma_mtp_mlx.sampling import Sampling


class Cycle(DraftLengthController):
    """Widths in a fixed cycle that starts and stops drafting (0) and jumps between 1 and
    the widest round, so every switch the loop can make happens within a few rounds."""

    WIDTHS = (0, AUTO_MAX_DRAFT_TOKENS, 1, 0, 0, 3, AUTO_MAX_DRAFT_TOKENS, 2, 0, 5)

    def __init__(self):
        super().__init__(AUTO_MAX_DRAFT_TOKENS)
        self.next = 0

    def choose(self) -> int:
        self.next += 1
        return self.WIDTHS[(self.next - 1) % len(self.WIDTHS)]


class FollowsTheDraws(DraftLengthController):
    """k depends on random outcomes, as an adaptive controller's does: 1 until an outcome is
    known, then 2 after a rejection and 3 after an acceptance. Rounds are queued one ahead,
    so the second round is chosen before the first's outcome and the third follows it."""

    def __init__(self):
        super().__init__(3)
        self.k = 1

    def choose(self) -> int:
        return self.k

    def observe(self, k, accepted, seconds=None):
        self.k = 3 if accepted else 2


@pytest.mark.parametrize("pair", list(PAIRS))
def test_greedy_auto_equals_target_alone_past_window(pair, mlx_pairs, hf_targets):
    target, tokenizer, drafter = mlx_pairs[pair]
    hf_target = hf_targets[PAIRS[pair][0]]
    for prompt, reference in decisive_references(hf_target, count=2):
        for policy in ("auto", Cycle()):
            responses = list(stream_generate(target, tokenizer, prompt, draft_model=drafter, num_draft_tokens=policy,
                                             max_tokens=MAX_TOKENS, record_rounds=True))
            assert tokens(responses) == reference, f"{policy} prompt={prompt}"
            stats = responses[-1].stats
            assert stats.auto and sum(stats.rounds_by_k) == stats.rounds
        logged = [r["k"] for r in stats.rounds_log[1:]]
        assert logged == [Cycle.WIDTHS[i % len(Cycle.WIDTHS)] for i in range(len(logged))]


def test_auto_falls_to_plain_decoding_when_nothing_is_accepted(mlx_pairs):
    """The random-weight fixture drafter almost never agrees with its target."""
    target, tokenizer, drafter = mlx_pairs["dense"]
    controller = DraftLengthController(AUTO_MAX_DRAFT_TOKENS)
    plain = tokens(stream_generate(target, tokenizer, [5, 6, 7], max_tokens=120))
    responses = list(stream_generate(target, tokenizer, [5, 6, 7], draft_model=drafter, num_draft_tokens=controller,
                                     max_tokens=120, record_rounds=True))
    assert tokens(responses) == plain
    ks = [r["k"] for r in responses[-1].stats.rounds_log[1:]]
    assert ks[-40:].count(0) >= 30, ks


class AgreeingDrafter:
    """Drafts from the target's own next-token distribution, flattened (logits x 0.5), so
    that many drafts are accepted. It knows the sequence from the prompt, each round's
    newest token and its own drafts, so every round must draft (no k = 0)."""

    default_num_draft_tokens = 2

    def __init__(self, target, prompt):
        self.target, self.sequence, self.proposed = target, list(prompt), []

    def draft(self, embed, token, hidden, position, shared_kv, num_tokens, sample=None, keys=None):
        self.sequence += self.proposed[: position - len(self.sequence)]  # the accepted drafts
        assert len(self.sequence) == position
        context, drafts, logqs = self.sequence + [token.item()], [], []
        for i in range(num_tokens):
            logits, _ = self.target(mx.array([context]), None)
            if keys is not None:  # sampling traced into a compiled draft: one key per draft
                draft, logq = sample(0.5 * logits[0, -1:], keys[i])
            else:
                draft, logq = sample(mx.array(context[-1:]), 0.5 * logits[0, -1:])
            context.append(draft.item())
            drafts.append(draft)
            logqs.append(logq)
        self.proposed = [token.item()] + context[len(self.sequence) + 1 :]
        return mx.concatenate(drafts), mx.concatenate(logqs)


SAMPLES = 500


@pytest.mark.parametrize("policy", [FollowsTheDraws, "auto"])
def test_sampled_auto_keeps_the_target_distribution(policy, mlx_pairs):
    e2b = mlx_pairs["e2b"]
    sampling = Sampling(temp=1.0)
    length = 4  # the third round is the first whose k followed a draw
    joint = exact_joint_with_processors(e2b.target, sampling, MIN_EXPECTED / SAMPLES, length)
    samples, rounds_by_k, accepted = [], np.zeros(4, int), 0
    for i in range(SAMPLES):
        drafter = AgreeingDrafter(e2b.target, PROMPT) if policy is FollowsTheDraws else e2b.drafter
        responses = list(stream_generate(e2b.target, e2b.tokenizer, PROMPT, draft_model=drafter,
                                         num_draft_tokens=policy if policy == "auto" else policy(),
                                         max_tokens=length, temp=1.0, seed=i))
        samples.append(tokens(responses))
        rounds_by_k[: len(responses[-1].stats.rounds_by_k)] += responses[-1].stats.rounds_by_k[:4]
        accepted += responses[-1].stats.accepted_tokens
    assert chi_square_p_value(np.array(samples), joint) > 1e-3
    if policy is FollowsTheDraws:  # drafts were accepted, and the width followed the draws
        assert accepted > SAMPLES / 4 and rounds_by_k[2] > SAMPLES / 10, (accepted, rounds_by_k)
