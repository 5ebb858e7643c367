"""The compiled draft (`Drafter.draft`: whole K/V buffers, a visibility mask, position as an
array) proposes exactly what the op-by-op reference step (`Drafter.step` on the visible
views) proposes: every fixture pair, below and past the sliding window, both heads,
greedy and sampled drafting (a sampler between steps, and sampling traced into the graph),
float and quantized drafters."""

import mlx.core as mx
import numpy as np
import pytest

from gemma_mtp_mlx.cache import rollback_cache
from gemma_mtp_mlx.sampling import Sampling

WINDOW = 16
K = 6


def verified_state(target, length: int):
    """Prefill `length` random tokens, then run and roll back 5 more so the buffers hold
    stale entries past the verified end (as after a rejected round).

    Returns (newest token [1], hidden [1, 1, H] that produced it, cache)."""
    ids = np.random.default_rng(length).integers(3, 256, size=length + 5).tolist()
    cache = target.make_cache(K)
    logits, hidden = target(mx.array([ids[:length]]), cache)
    token, hidden = mx.argmax(logits[0, -1:], axis=-1), hidden[:, -1:]
    target(mx.array([ids[length:]]), cache)
    rollback_cache(cache, length)
    mx.eval(token, hidden, [c.state for c in cache])
    return token, hidden, cache


def argmax_sampler(token, logits):
    """A deterministic stand-in for sampling: (argmax [1], log-softmax [1, vocab])."""
    return mx.argmax(logits, axis=-1), logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def reference_draft(drafter, target, token, hidden, position, cache, sample=None, keys=None):
    """The draft loop op by op: `Drafter.step` on the visible K/V views."""
    shared_kv = target.drafter_kv(cache)
    drafts, logqs = [], []
    for i in range(K):
        state, hidden = drafter.step(target.embed(token)[None], hidden, position, shared_kv)
        if sample is None:
            token = drafter.greedy_token(state)[0]
        else:
            token, logq = sample(drafter.logits(state)[0], keys[i]) if keys is not None else sample(
                token, drafter.logits(state)[0])
            logqs.append(logq)
        drafts.append(token)
    return mx.concatenate(drafts), mx.concatenate(logqs) if logqs else None


def assert_same_drafts(target, drafter, length):
    token, hidden, cache = verified_state(target, length)
    # greedy; a sampler run op by op between compiled steps; real sampling traced into the graph
    keys = mx.random.split(mx.random.key(length), K)
    for sample, sample_keys in ((None, None), (argmax_sampler, None), (Sampling(temp=0.8, top_k=50).draw, keys)):
        ours, ours_logq = drafter.draft(target.embed, token, hidden, length, target.drafter_kv(cache), K, sample,
                                        sample_keys)
        ref, ref_logq = reference_draft(drafter, target, token, hidden, length, cache, sample, sample_keys)
        assert ours.tolist() == ref.tolist(), f"length {length}, {'sampled' if sample else 'greedy'}"
        if sample is not None:
            ours_logq = np.array(ours_logq.astype(mx.float32))
            ref_logq = np.array(ref_logq.astype(mx.float32))
            assert (np.isfinite(ours_logq) == np.isfinite(ref_logq)).all()
            finite = np.isfinite(ref_logq)
            assert np.abs(ours_logq[finite] - ref_logq[finite]).max() < 1e-4


@pytest.mark.parametrize("pair", ["e2b", "dense", "moe", "multimodal"])
@pytest.mark.parametrize("length", [WINDOW // 2, 3 * WINDOW + 3])
def test_compiled_draft_equals_reference_steps(pair, length, mlx_pairs):
    target, _, drafter = mlx_pairs[pair]
    assert_same_drafts(target, drafter, length)


@pytest.mark.parametrize("pair", ["e2b", "dense"])  # centroid head, dense head
@pytest.mark.parametrize("length", [WINDOW // 2, 3 * WINDOW + 3])
def test_compiled_draft_equals_reference_steps_quantized(pair, length, quantized_pairs):
    target, _, drafter = quantized_pairs[pair]
    assert_same_drafts(target, drafter, length)


def test_one_compiled_graph_serves_rounds_until_a_buffer_grows(mlx_pairs):
    """Rounds at successive positions reuse the compiled draft (no new trace per round)."""
    target, _, drafter = mlx_pairs["dense"]
    token, hidden, cache = verified_state(target, 3 * WINDOW)
    traces = []
    graphs_forward = type(drafter).forward

    def counting_forward(self, *args):
        traces.append(1)
        return graphs_forward(self, *args)

    type(drafter).forward = counting_forward
    try:
        for step in range(6):
            position = 3 * WINDOW + step
            drafter.draft(target.embed, token, hidden, position, target.drafter_kv(cache), 2)
            target(token[None], cache)  # the cache grows by one verified position a round
    finally:
        type(drafter).forward = graphs_forward
    assert len(traces) == 2  # the first round traced the 2-step graph once; the rest replayed it
