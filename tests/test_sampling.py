"""Speculative sampling keeps the target's distribution exactly: proven by statistics.

The joint distribution of the first three generated tokens is computed exactly from the
target (batched forwards over every likely prefix) and compared, by a chi-square test, with
20,000 speculative samples and 20,000 plain samples. The samples are drawn in a batch: the
harness below runs the rounds of `speculative.generate_rounds` (prefill token, k drafts,
verify, accept, and a second round where the first accepted nothing) for 20,000 sequences
at once with the package's own target, drafter and `Sampling`. A deliberately wrong
acceptance rule must fail the same test. A smaller end-to-end run through
`stream_generate` checks the loop's own wiring.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import make_logits_processors

from gemma_mtp_mlx import stream_generate
from gemma_mtp_mlx.sampling import Sampling

PROMPT = [2, 40, 41, 42]
K = 2
SAMPLES = 20_000
MIN_EXPECTED = 5  # outcomes expected fewer times than this share one "other" bin
FILTERS = dict(top_p=0.9, top_k=20)


class ResampleFromTargetOnRejection(Sampling):
    """A classic mistake: on rejection draw from p instead of normalize(max(0, p - q))."""

    def accept(self, drafts, draft_logprobs, logprobs):
        accepted, _ = super().accept(drafts, draft_logprobs, logprobs)
        return accepted, mx.random.categorical(logprobs)


class AcceptTargetArgmax(Sampling):
    """Another: keep a draft whenever it is the target's most likely token."""

    def accept(self, drafts, draft_logprobs, logprobs):
        matches = drafts == mx.argmax(logprobs[..., :-1, :], axis=-1)
        accepted = mx.cumprod(matches.astype(mx.int32), axis=-1).sum(-1)
        return accepted, mx.random.categorical(logprobs)


class PromptState:
    """The target run over PROMPT once; caches copied per batch of continuations."""

    def __init__(self, target):
        self.target = target
        num_kv_layers = target.args.num_hidden_layers - target.args.num_kv_shared_layers
        self.cache = [KVCache() for _ in range(num_kv_layers)]
        self.logits, self.hidden = target(mx.array([PROMPT]), self.cache)

    def copies(self, n: int):
        caches = []
        for c in self.cache:
            copy = KVCache()
            keys, values = c.keys_and_values()
            copy.keys, copy.values = mx.repeat(keys, n, axis=0), mx.repeat(values, n, axis=0)
            copy.offset = c.offset
            caches.append(copy)
        return caches

    def after(self, suffixes: np.ndarray):
        """Run suffixes [N, S] after PROMPT: (logits [N, S, V], hidden [N, S, H], cache)."""
        cache = self.copies(len(suffixes))
        logits, hidden = self.target(mx.array(suffixes), cache)
        return logits, hidden, cache


def processed(sampling, logits: mx.array) -> mx.array:
    """Processed log-probabilities for logits [..., V] (no logits processors here)."""
    shape = logits.shape
    return sampling.process(None, None, logits.reshape(-1, shape[-1])).reshape(shape)


def exact_joint(state, sampling, min_prob):
    """{(x1, x2, x3): p} for every outcome with p >= min_prob under the target."""
    p1 = np.exp(np.array(processed(sampling, state.logits[0, -1])))
    first = np.flatnonzero(p1 >= min_prob)
    p2 = np.exp(np.array(processed(sampling, state.after(first[:, None])[0][:, -1])))
    pairs = [(a, b, p1[a] * p2[i, b]) for i, a in enumerate(first) for b in np.flatnonzero(p1[a] * p2[i] >= min_prob)]
    p3 = np.exp(np.array(processed(sampling, state.after(np.array([[a, b] for a, b, _ in pairs]))[0][:, -1])))
    return {
        (a, b, c): mass * p3[i, c]
        for i, (a, b, mass) in enumerate(pairs)
        for c in np.flatnonzero(mass * p3[i] >= min_prob)
    }


def chi_square_p_value(samples: np.ndarray, joint: dict) -> float:
    """Goodness of fit of sampled triples [N, 3] to the exact joint distribution."""
    n = len(samples)
    bins = {outcome: i for i, outcome in enumerate(o for o, p in joint.items() if n * p >= MIN_EXPECTED)}
    expected = np.array([n * joint[o] for o in bins] + [0.0])
    expected[-1] = n - expected[:-1].sum()
    observed = np.zeros(len(bins) + 1)
    for triple in map(tuple, samples.tolist()):
        observed[bins.get(triple, len(bins))] += 1
    if expected[-1] < MIN_EXPECTED:  # no room for an "other" bin
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    df = len(expected) - 1
    # Wilson-Hilferty: (X / df)^(1/3) is close to normal.
    z = ((statistic / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def unique_rows(rows: np.ndarray):
    """Deterministic work is done once per distinct row: (unique rows [U, C], inverse [N])."""
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    return unique, inverse.reshape(-1)


def drafter_logits(state, drafter, verified, newest, drafts):
    """The drafter's next-token logits [U, V] after `newest` [U] and `drafts` [U, j], with
    PROMPT + `verified` [U, m] as the target's verified context."""
    n = len(newest)
    if verified.shape[1]:
        _, hidden, cache = state.after(verified)
        hidden = hidden[:, -1:]
    else:
        cache = state.copies(n)
        hidden = mx.broadcast_to(state.hidden[:, -1:], (n, 1, state.hidden.shape[-1]))
    shared_kv = {t: cache[i].keys_and_values() for t, i in state.target.producers.items()}
    tokens = np.concatenate([newest[:, None], drafts], axis=1)
    for i in range(tokens.shape[1]):
        embedding = state.target.embed(mx.array(tokens[:, i]))[:, None]
        step, hidden = drafter.step(embedding, hidden, cache[0].offset, shared_kv)
    return drafter.logits(step)[:, 0]


def target_as_drafter(state, _, verified, newest, drafts):
    """A drafter that mostly agrees with the target (its own logits, flattened a little):
    long accepted runs, so a wrong acceptance rule shows."""
    logits, _, _ = state.after(np.concatenate([verified, newest[:, None], drafts], axis=1))
    return 0.8 * logits[:, -1]


def speculative_round(state, drafter, sampling, verified: np.ndarray, newest: np.ndarray):
    """One round for N sequences: PROMPT + verified [N, m] is verified, newest [N] is not.
    `drafter` is a fixture drafter or `target_as_drafter`.

    Returns (accepted [N], choices [N, K + 1], drafts [N, K])."""
    draft_logits = target_as_drafter if drafter is target_as_drafter else drafter_logits
    m, drafts, logqs = verified.shape[1], np.zeros((len(newest), 0), dtype=np.int64), []
    for _ in range(K):
        unique, inverse = unique_rows(np.concatenate([verified, newest[:, None], drafts], axis=1))
        logits = draft_logits(state, drafter, unique[:, :m], unique[:, m], unique[:, m + 1 :])
        if sampling.draft_mode == "sampled":
            logq = processed(sampling, logits)[mx.array(inverse)]
            token = sampling.sample(logq)
            logqs.append(logq)
        else:
            token = mx.argmax(logits, axis=-1)[mx.array(inverse)]
        drafts = np.concatenate([drafts, np.array(token)[:, None]], axis=1)
    unique, inverse = unique_rows(np.concatenate([verified, newest[:, None], drafts], axis=1))
    logits, _, _ = state.after(unique)
    logp = processed(sampling, logits[:, m:])[mx.array(inverse)]  # [N, K + 1, V]
    accepted, choices = sampling.accept(mx.array(drafts), mx.stack(logqs, axis=1) if logqs else None, logp)
    return np.array(accepted), np.array(choices), drafts


def speculative_samples(state, drafter, sampling, n) -> np.ndarray:
    """The first three tokens of n speculative generations: [n, 3]."""
    logp = mx.broadcast_to(processed(sampling, state.logits[:, -1]), (n, state.logits.shape[-1]))
    first = np.array(sampling.sample(logp)).astype(np.int64)
    accepted, choices, drafts = speculative_round(state, drafter, sampling, np.zeros((n, 0), np.int64), first)
    # Round one emits drafts[:a] then choices[a]; keep the first two.
    padded = np.pad(drafts, ((0, 0), (0, 1)))
    emitted = np.where(np.arange(K + 1) < accepted[:, None], padded, choices[np.arange(n), accepted][:, None])
    out = np.concatenate([first[:, None], emitted[:, :2]], axis=1)
    redo = np.flatnonzero(accepted == 0)  # round one gave one token: round two gives the third
    if redo.size:
        a2, c2, d2 = speculative_round(state, drafter, sampling, out[redo, :1], out[redo, 1])
        out[redo, 2] = np.where(a2 > 0, d2[:, 0], c2[:, 0])
    return out


def plain_samples(state, sampling, n) -> np.ndarray:
    out = np.zeros((n, 0), dtype=np.int64)
    for _ in range(3):
        if out.shape[1]:
            unique, inverse = unique_rows(out)
            logits = state.after(unique)[0][:, -1][mx.array(inverse)]
        else:
            logits = mx.broadcast_to(state.logits[:, -1], (n, state.logits.shape[-1]))
        token = sampling.sample(processed(sampling, logits))
        out = np.concatenate([out, np.array(token)[:, None]], axis=1)
    return out


CONFIGS = [
    dict(temp=temp, **filters) for temp in (0.7, 1.0) for filters in (dict(), FILTERS)
]


@pytest.fixture(scope="module")
def e2b(mlx_pairs):
    return mlx_pairs["e2b"]


@pytest.fixture(scope="module")
def state(e2b):
    return PromptState(e2b.target)


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_plain_sampling_matches_the_exact_distribution(options, state):
    sampling = Sampling(**options)
    mx.random.seed(1)
    joint = exact_joint(state, sampling, MIN_EXPECTED / SAMPLES)
    assert chi_square_p_value(plain_samples(state, sampling, SAMPLES), joint) > 1e-3


@pytest.mark.parametrize("drafter", ["fixture", "agreeing"])
@pytest.mark.parametrize("draft_mode", ["greedy", "sampled"])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_speculative_sampling_matches_the_exact_distribution(options, draft_mode, drafter, e2b, state):
    sampling = Sampling(**options, draft_mode=draft_mode)
    mx.random.seed(2)
    joint = exact_joint(state, sampling, MIN_EXPECTED / SAMPLES)
    drafter = e2b.drafter if drafter == "fixture" else target_as_drafter
    samples = speculative_samples(state, drafter, sampling, SAMPLES)
    assert chi_square_p_value(samples, joint) > 1e-3


@pytest.mark.parametrize("draft_mode", ["greedy", "sampled"])
@pytest.mark.parametrize("wrong_rule", [ResampleFromTargetOnRejection, AcceptTargetArgmax])
def test_wrong_acceptance_rule_fails_the_same_test(wrong_rule, draft_mode, state):
    sampling = wrong_rule(temp=1.0, draft_mode=draft_mode)
    mx.random.seed(3)
    joint = exact_joint(state, sampling, MIN_EXPECTED / SAMPLES)
    samples = speculative_samples(state, target_as_drafter, sampling, SAMPLES)
    assert chi_square_p_value(samples, joint) < 1e-6
