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

from conftest import full_length_cache
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
        self.cache = full_length_cache(target)
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


def exact_joint_with_processors(target, sampling, min_prob):
    """As `exact_joint`, for samplings whose logits processors read each row's history."""
    def next_logprobs(prefixes):
        cache_free = np.array([PROMPT + list(p) for p in prefixes])
        logits, _ = target(mx.array(cache_free), None)
        rows = [sampling.process(mx.array(row[:-1]), mx.array(row[-1:]), logits[i, -1:])
                for i, row in enumerate(cache_free)]
        return np.exp(np.array(mx.concatenate(rows)))

    p1 = next_logprobs([()])[0]
    first = [(a,) for a in np.flatnonzero(p1 >= min_prob)]
    p2 = next_logprobs(first)
    pairs = [((a, b), p1[a] * p2[i, b]) for i, (a,) in enumerate(first) for b in np.flatnonzero(p1[a] * p2[i] >= min_prob)]
    p3 = next_logprobs([ab for ab, _ in pairs])
    return {ab + (c,): mass * p3[i, c] for i, (ab, mass) in enumerate(pairs) for c in np.flatnonzero(mass * p3[i] >= min_prob)}


END_TO_END_SAMPLES = 1200


def test_stream_generate_with_repetition_penalty_keeps_the_distribution(e2b):
    """The loop's own wiring (histories, hidden states, rollback) through the public API."""
    processors = make_logits_processors(repetition_penalty=1.5)
    sampling = Sampling(temp=1.0, logits_processors=processors)
    joint = exact_joint_with_processors(e2b.target, sampling, MIN_EXPECTED / END_TO_END_SAMPLES)
    samples = np.array([
        [r.token for r in stream_generate(e2b.target, e2b.tokenizer, PROMPT, draft_model=e2b.drafter, num_draft_tokens=K,
                                          max_tokens=3, temp=1.0, logits_processors=processors, seed=i)]
        for i in range(END_TO_END_SAMPLES)
    ])
    assert chi_square_p_value(samples, joint) > 1e-3


@pytest.mark.parametrize("name", ["e2b", "dense"])
def test_repetition_penalty_greedy_speculative_equals_plain(name, mlx_pairs):
    target, tokenizer, drafter = mlx_pairs[name]
    processors = make_logits_processors(repetition_penalty=1.3, repetition_context_size=10)
    prompt = list(range(30, 50))
    plain = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=50, logits_processors=processors)]
    unpenalized = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=50)]
    assert plain != unpenalized  # the penalty changes the output, so the comparison means something
    for k in (1, 3, 6):
        speculative = stream_generate(target, tokenizer, prompt, draft_model=drafter, num_draft_tokens=k,
                                      max_tokens=50, logits_processors=processors)
        assert [r.token for r in speculative] == plain


def test_temp_zero_is_the_greedy_path(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    prompt = list(range(30, 50))
    greedy = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=40)]
    for options in (dict(temp=0.0), dict(temp=0.0, top_p=0.5, top_k=3, seed=4)):
        out = stream_generate(target, tokenizer, prompt, draft_model=drafter, max_tokens=40, **options)
        assert [r.token for r in out] == greedy


def test_seed_makes_a_sampled_speculative_run_reproducible(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]

    def run(seed):
        out = stream_generate(target, tokenizer, [5, 6, 7], draft_model=drafter, max_tokens=30, temp=1.0, seed=seed)
        return [(r.token, round(r.logprob, 5)) for r in out]

    assert run(1) == run(1) != run(2)
    assert all(lp <= 0 for _, lp in run(1))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temp=-0.1), "temp must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.2), "top_p must be in"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(min_p=1.5), "min_p must be in"),
        (dict(draft_mode="beam"), "draft_mode must be one of"),
    ],
)
def test_invalid_sampling_arguments_are_clear_errors(options, message, mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    with pytest.raises(ValueError, match=message):
        list(stream_generate(target, tokenizer, [5, 6], draft_model=drafter, **options))
