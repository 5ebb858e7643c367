"""Speculative sampling keeps the target's distribution exactly: proven by statistics.

The joint distribution of the first three generated tokens is computed exactly from the
target (batched forwards over every likely prefix) and compared, by a chi-square test, with
20,000 speculative samples and 20,000 plain samples. The samples are drawn in a batch: the
harness in batched_rounds.py runs the rounds of `speculative.generate_rounds` (prefill
token, k drafts, verify, accept, and a second round where the first accepted nothing) for
20,000 sequences at once with the package's own target, drafter and `Sampling`. A deliberately wrong
acceptance rule must fail the same test. A smaller end-to-end run through
`stream_generate` checks the loop's own wiring.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_logits_processors

from batched_rounds import PromptState, plain_samples, processed, speculative_samples, target_as_drafter
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


CONFIGS = [
    dict(temp=temp, **filters) for temp in (0.7, 1.0) for filters in (dict(), FILTERS)
]


@pytest.fixture(scope="module")
def e2b(mlx_pairs):
    return mlx_pairs["e2b"]


@pytest.fixture(scope="module")
def state(e2b):
    return PromptState(e2b.target, PROMPT)


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
    samples = speculative_samples(state, drafter, sampling, SAMPLES, K)
    assert chi_square_p_value(samples, joint) > 1e-3


@pytest.mark.parametrize("draft_mode", ["greedy", "sampled"])
@pytest.mark.parametrize("wrong_rule", [ResampleFromTargetOnRejection, AcceptTargetArgmax])
def test_wrong_acceptance_rule_fails_the_same_test(wrong_rule, draft_mode, state):
    sampling = wrong_rule(temp=1.0, draft_mode=draft_mode)
    mx.random.seed(3)
    joint = exact_joint(state, sampling, MIN_EXPECTED / SAMPLES)
    samples = speculative_samples(state, target_as_drafter, sampling, SAMPLES, K)
    assert chi_square_p_value(samples, joint) < 1e-6


def exact_joint_with_processors(target, sampling, min_prob, length=3):
    """As `exact_joint` (over `length` tokens), for samplings whose logits processors read
    each row's history."""
    def next_logprobs(prefixes):
        cache_free = np.array([PROMPT + list(p) for p in prefixes])
        logits, _ = target(mx.array(cache_free), None)
        rows = [sampling.process(mx.array(row[:-1]), mx.array(row[-1:]), logits[i, -1:])
                for i, row in enumerate(cache_free)]
        return np.exp(np.array(mx.concatenate(rows)))

    joint = {(): 1.0}
    for _ in range(length):
        p = next_logprobs(list(joint))
        joint = {prefix + (t,): mass * p[i, t] for i, (prefix, mass) in enumerate(joint.items())
                 for t in np.flatnonzero(mass * p[i] >= min_prob)}
    return joint


END_TO_END_SAMPLES = 1200


@pytest.mark.parametrize("draft_mode", ["sampled", "greedy"])
def test_stream_generate_with_repetition_penalty_keeps_the_distribution(draft_mode, e2b):
    """The loop's own wiring (histories, hidden states, rollback, both draft modes) through
    the public API."""
    processors = make_logits_processors(repetition_penalty=1.5)
    sampling = Sampling(temp=1.0, logits_processors=processors)
    joint = exact_joint_with_processors(e2b.target, sampling, MIN_EXPECTED / END_TO_END_SAMPLES)
    samples = np.array([
        [r.token for r in stream_generate(e2b.target, e2b.tokenizer, PROMPT, draft_model=e2b.drafter, num_draft_tokens=K,
                                          max_tokens=3, temp=1.0, logits_processors=processors, draft_mode=draft_mode,
                                          seed=i)]
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


def test_min_p_and_min_tokens_to_keep_shape_the_distribution():
    """p restricted to the tokens with p >= min_p * max p (at least the `min_tokens_to_keep`
    most likely), renormalised, then tempered: checked against numpy."""
    logits = np.array([[2.0, 1.6, 1.0, 0.2, -0.5, -3.0], [0.0, 3.0, 2.9, 1.0, 0.5, 0.4]], dtype=np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for min_p, keep, temp in [(0.3, 1, 1.0), (0.3, 4, 1.0), (0.9, 1, 1.0), (0.9, 3, 0.5), (1.0, 2, 1.0)]:
        sampling = Sampling(temp=temp, min_p=min_p, min_tokens_to_keep=keep)
        got = np.exp(np.array(sampling.process(None, None, mx.array(logits))))
        top = np.argsort(-p, axis=-1)[:, :keep]
        kept = p >= min_p * p.max(-1, keepdims=True)
        np.put_along_axis(kept, top, True, axis=-1)
        expected = np.where(kept, p ** (1 / temp), 0)
        expected /= expected.sum(-1, keepdims=True)
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"min_p={min_p} keep={keep} temp={temp}")


def test_min_p_one_samples_the_greedy_path(mlx_pairs):
    """At min_p = 1 only the most likely token survives: sampling is greedy, end to end."""
    target, tokenizer, drafter = mlx_pairs["e2b"]
    prompt = list(range(30, 50))
    greedy = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=30)]
    for draft in (None, drafter):
        out = stream_generate(target, tokenizer, prompt, draft_model=draft, max_tokens=30, temp=1.0, min_p=1.0, seed=1)
        assert [r.token for r in out] == greedy


def second_choice(logprobs):
    """A custom sampler: the second most likely token of each row, [N, V] -> [N]."""
    return mx.argsort(-logprobs, axis=-1)[:, 1]


def test_custom_sampler_drives_plain_and_speculative_decoding(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    prompt = list(range(30, 50))
    expected = list(prompt)
    for _ in range(20):  # the reference: the whole sequence through the target, no cache
        logits, _ = target(mx.array([expected]), None)
        expected.append(int(np.argsort(-np.array(logits[0, -1]))[1]))
    expected = expected[len(prompt):]
    for draft, k in ((None, None), (drafter, 1), (drafter, 4)):
        out = stream_generate(target, tokenizer, prompt, draft_model=draft, num_draft_tokens=k, max_tokens=20,
                              sampler=second_choice)
        assert [r.token for r in out] == expected, f"k={k}"


@pytest.mark.parametrize(
    "options",
    [dict(), dict(temp=0.7, top_k=20, top_p=0.9, seed=1), dict(temp=1.0, min_p=0.05, seed=2),
     dict(logits_processors=make_logits_processors(repetition_penalty=1.5))],
    ids=["greedy", "temp-top_k-top_p", "temp-min_p", "repetition_penalty"],
)
def test_each_logprob_is_the_targets_for_that_token(options, e2b):
    """What plain decoding would report for the same tokens: the processed target
    log-probability after the same prefix, from one forward over the whole sequence."""
    target, tokenizer, drafter = e2b
    prompt = list(range(30, 50))
    sampling = Sampling(**{name: value for name, value in options.items() if name != "seed"})
    for draft in (None, drafter):
        out = list(stream_generate(target, tokenizer, prompt, draft_model=draft, num_draft_tokens=3, max_tokens=30,
                                   **options))
        tokens = [r.token for r in out]
        sequence = prompt + tokens
        logits, _ = target(mx.array([sequence[:-1]]), None)
        inputs = mx.array(sequence[len(prompt) - 1 : -1])
        logprobs = sampling.process(mx.array(prompt[:-1]), inputs, logits[0, len(prompt) - 1 :])
        expected = np.array(mx.take_along_axis(logprobs, mx.array(tokens)[:, None], axis=-1)[:, 0])
        np.testing.assert_allclose([r.logprob for r in out], expected, atol=1e-4)
