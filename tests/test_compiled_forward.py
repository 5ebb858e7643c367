"""The compiled target forward (`Target.__call__` for decode steps and verifies: whole K/V
buffers, the write slot and positions as arrays, a visibility mask) computes what mlx-lm's
op-by-op forward computes, and leaves the same cache behind: every fixture target, below
and past the sliding window and past a full-attention buffer's first 256 positions, with
rolled-back rounds between, float and quantized."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import TARGETS, WINDOW
from gemma_mtp_mlx.batch.cache import ragged_row
from gemma_mtp_mlx.cache import rollback_cache

K = 6
# Round lengths (k + 1 tokens) and how many of each round's tokens are kept.
ROUNDS = [(1, 1), (K + 1, 3), (4, 4), (K + 1, 1), (1, 1), (K + 1, K + 1), (2, 1)]


def op_by_op(target, tokens, cache):
    """mlx-lm's forward, uncompiled: the reference."""
    hidden = target.backbone(tokens, cache=cache)
    return target.logits(hidden), hidden


def assert_close(ours, reference, what):
    ours, reference = np.array(ours.astype(mx.float32)), np.array(reference.astype(mx.float32))
    scale = max(1.0, np.abs(reference).max())
    assert np.abs(ours - reference).max() <= 1e-4 * scale, what


def assert_same_rounds(target, length):
    """Prefill `length` tokens into two caches, then run ROUNDS on both (compiled on one,
    op by op on the other), rolling each round back to what it keeps."""
    rng = np.random.default_rng(length)
    prompt = mx.array([rng.integers(3, 256, size=length).tolist()])
    compiled_cache, reference_cache = target.make_cache(K), target.make_cache(K)
    for cache in (compiled_cache, reference_cache):
        mx.eval(op_by_op(target, prompt, cache))
    position = length
    for i, (num_tokens, kept) in enumerate(ROUNDS):
        tokens = mx.array([rng.integers(3, 256, size=num_tokens).tolist()])
        assert target.compiled.handles(tokens, compiled_cache)
        logits, hidden = target(tokens, compiled_cache)
        ref_logits, ref_hidden = op_by_op(target, tokens, reference_cache)
        what = f"length {length}, round {i} ({num_tokens} tokens)"
        assert_close(logits, ref_logits, f"logits, {what}")
        assert_close(hidden, ref_hidden, f"hidden, {what}")
        assert mx.argmax(logits, axis=-1).tolist() == mx.argmax(ref_logits, axis=-1).tolist(), what
        position += kept
        for cache in (compiled_cache, reference_cache):
            rollback_cache(cache, position)
    for ours, ref in zip(compiled_cache, reference_cache):
        assert ours.offset == ref.offset
        for a, b in zip(ours.state[:2], ref.state[:2]):  # the filled slots
            assert_close(a, b, f"cache after the rounds, length {length}")


@pytest.mark.parametrize("name", TARGETS)
@pytest.mark.parametrize("length", [WINDOW // 2, 3 * WINDOW + 3, 254])  # 254: the rounds cross 256
def test_compiled_forward_equals_op_by_op(name, length, mlx_targets):
    assert_same_rounds(mlx_targets[name], length)


@pytest.mark.parametrize("name", ["e2b", "dense"])
def test_compiled_forward_equals_op_by_op_quantized(name, quantized_pairs):
    assert_same_rounds(quantized_pairs[name][0], 3 * WINDOW + 3)


def ragged_batch(target, lengths, seed):
    """A ragged batch cache whose rows hold prompts of `lengths` (each prefilled alone)."""
    rng = np.random.default_rng(seed)
    batch = None
    for length in lengths:
        cache = target.make_cache(K)
        mx.eval(op_by_op(target, mx.array([rng.integers(3, 256, size=length).tolist()]), cache))
        rows = ragged_row(cache)
        if batch is None:
            batch = rows
        else:
            for layer, row in zip(batch, rows):
                layer.extend(row)
    return batch


@pytest.mark.parametrize("name", ["e2b_target", "dense_target", "unified_target"])
def test_compiled_forward_equals_op_by_op_on_ragged_rows(name, mlx_targets):
    """Batched rows of different lengths (one below the window, two past it, one crossing
    a 64-slot block), rounds rolled back by a different amount per row."""
    target = mlx_targets[name]
    lengths = [WINDOW // 2, 3 * WINDOW + 3, 2 * WINDOW, 60]
    compiled_cache, reference_cache = ragged_batch(target, lengths, 1), ragged_batch(target, lengths, 1)
    rng = np.random.default_rng(2)
    positions = list(lengths)
    for i, (num_tokens, _) in enumerate(ROUNDS):
        tokens = mx.array(rng.integers(3, 256, size=(len(lengths), num_tokens)).tolist())
        assert target.compiled.handles(tokens, compiled_cache)
        logits, hidden = target(tokens, compiled_cache)
        ref_logits, ref_hidden = op_by_op(target, tokens, reference_cache)
        assert_close(logits, ref_logits, f"logits, round {i}")
        assert_close(hidden, ref_hidden, f"hidden, round {i}")
        positions = [p + int(rng.integers(1, num_tokens + 1)) for p in positions]
        for cache in (compiled_cache, reference_cache):
            for layer in cache:
                layer.set_lengths(positions)


def test_long_forwards_and_empty_caches_run_op_by_op(mlx_targets):
    target = mlx_targets["dense_target"]
    cache = target.make_cache(K)
    short = mx.array([[5] * (K + 1)])
    assert not target.compiled.handles(short, cache)  # nothing written yet: a prefill
    assert not target.compiled.handles(short, None)  # no cache at all
    target(mx.array([[5] * 40]), cache)
    assert target.compiled.handles(short, cache)
    assert not target.compiled.handles(mx.array([[5] * 40]), cache)


def test_one_compiled_graph_serves_steps_until_a_buffer_grows(mlx_targets):
    """Decode steps at successive positions replay one trace (no new trace per step)."""
    target = mlx_targets["dense_target"]
    cache = target.make_cache(K)
    mx.eval(target(mx.array([list(range(3, 3 + 3 * WINDOW))]), cache))
    traces = []
    backbone_call = type(target.backbone).__call__

    def counting_call(self, *args, **kwargs):
        traces.append(1)
        return backbone_call(self, *args, **kwargs)

    type(target.backbone).__call__ = counting_call
    try:
        for step in range(6):
            mx.eval(target(mx.array([[7 + step]]), cache))
    finally:
        type(target.backbone).__call__ = backbone_call
    assert len(traces) <= 1  # at most the first step traced the one-token graph
