"""Speculative rounds for thousands of sequences at once, with the package's own target,
drafter and `Sampling`: the batched harness of tests/test_sampling.py, and of
scripts/measure_draft_modes.py.

A prompt is run through the target once (`PromptState`); each round drafts k tokens for N
sequences (deterministic work once per distinct row), verifies them in one batched
forward and judges them with `Sampling.accept`, as `speculative.generate_rounds` does for
one sequence.
"""

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from gemma_mtp_mlx.cache import num_kv_layers


def full_length_cache(target):
    """Plain mlx-lm caches, one per K/V-computing layer, that keep every position."""
    return [KVCache() for _ in range(num_kv_layers(target.args))]


class PromptState:
    """The target run over `prompt` once; caches copied per batch of continuations."""

    def __init__(self, target, prompt):
        self.target = target
        self.cache = full_length_cache(target)
        self.logits, self.hidden = target(mx.array([prompt]), self.cache)

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
        """Run suffixes [N, S] after the prompt: (logits [N, S, V], hidden [N, S, H], cache)."""
        cache = self.copies(len(suffixes))
        logits, hidden = self.target(mx.array(suffixes), cache)
        return logits, hidden, cache


def processed(sampling, logits: mx.array) -> mx.array:
    """Processed log-probabilities for logits [..., V] (no logits processors here)."""
    shape = logits.shape
    return sampling.process(None, None, logits.reshape(-1, shape[-1])).reshape(shape)


def unique_rows(rows: np.ndarray):
    """Deterministic work is done once per distinct row: (unique rows [U, C], inverse [N])."""
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    return unique, inverse.reshape(-1)


def drafter_logits(state, drafter, verified, newest, drafts):
    """The drafter's next-token logits [U, V] after `newest` [U] and `drafts` [U, j], with
    the prompt + `verified` [U, m] as the target's verified context."""
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


def speculative_round(state, drafter, sampling, verified: np.ndarray, newest: np.ndarray, k: int):
    """One round of k drafts for N sequences: the prompt + verified [N, m] is verified,
    newest [N] is not. `drafter` is a fixture drafter or `target_as_drafter`.

    Returns (accepted [N], choices [N, k + 1], drafts [N, k])."""
    draft_logits = target_as_drafter if drafter is target_as_drafter else drafter_logits
    m, drafts, logqs = verified.shape[1], np.zeros((len(newest), 0), dtype=np.int64), []
    for _ in range(k):
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
    logp = processed(sampling, logits[:, m:])[mx.array(inverse)]  # [N, k + 1, V]
    accepted, choices = sampling.accept(mx.array(drafts), mx.stack(logqs, axis=1) if logqs else None, logp)
    return np.array(accepted), np.array(choices), drafts


def speculative_samples(state, drafter, sampling, n: int, k: int) -> np.ndarray:
    """The first three tokens of n speculative generations with k drafts a round: [n, 3]."""
    logp = mx.broadcast_to(processed(sampling, state.logits[:, -1]), (n, state.logits.shape[-1]))
    first = np.array(sampling.sample(logp)).astype(np.int64)
    accepted, choices, drafts = speculative_round(state, drafter, sampling, np.zeros((n, 0), np.int64), first, k)
    # Round one emits drafts[:a] then choices[a]; keep the first two.
    padded = np.pad(drafts, ((0, 0), (0, 1)))
    emitted = np.where(np.arange(k + 1) < accepted[:, None], padded, choices[np.arange(n), accepted][:, None])
    out = np.concatenate([first[:, None], emitted[:, :2]], axis=1)
    redo = np.flatnonzero(accepted == 0)  # round one gave one token: round two gives the third
    if redo.size:
        a2, c2, d2 = speculative_round(state, drafter, sampling, out[redo, :1], out[redo, 1], k)
        out[redo, 2] = np.where(a2 > 0, d2[:, 0], c2[:, 0])
    return out


def plain_samples(state, sampling, n: int) -> np.ndarray:
    """The first three tokens of n plain generations: [n, 3]."""
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
