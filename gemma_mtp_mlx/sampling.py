"""Turning logits into tokens, for plain and speculative decoding alike.

`Sampling` holds the user's options (mlx-lm's names) and produces, for a block of
positions, the processed target distribution p: logits processors with each position's
own token history, then top-p / min-p / top-k on the log-probabilities (mlx-lm's order and
functions), then temperature. Acceptance follows Leviathan et al.: accept draft x with
probability min(1, p(x) / q(x)); at the first rejection sample normalize(max(0, p - q));
after k acceptances sample a bonus token from p. Everything stays on the device.
"""

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .validate import check_sampling, check_seed

DRAFT_MODES = ("greedy", "sampled")


class RandomKeys:
    """One generation's random state: a fresh subkey for every draw, split off a key made
    from `seed`, so a seeded run draws the same numbers whatever else runs beside it (other
    generations in this process, other rows of a batch). Without a seed the first key is
    drawn from MLX's global random state (`mx.random.seed` makes such runs repeat)."""

    def __init__(self, seed: Optional[int] = None):
        if seed is None:
            self.key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
        else:
            self.key = mx.random.key(seed)

    def next(self) -> mx.array:
        self.key, subkey = mx.random.split(self.key)
        return subkey


@dataclass
class Sampling:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    sampler: Optional[Callable[[mx.array], mx.array]] = None  # logprobs [N, V] -> tokens [N]
    logits_processors: List[Callable] = field(default_factory=list)
    draft_mode: str = "sampled"

    seed: Optional[int] = None  # per-generation random state; None: MLX's global state
    keys: "RandomKeys" = field(init=False, repr=False)

    def __post_init__(self):
        check_sampling(self.temp, self.top_p, self.top_k, self.min_p, self.min_tokens_to_keep,
                       self.draft_mode, DRAFT_MODES)
        self.temp, self.top_p, self.min_p = float(self.temp), float(self.top_p), float(self.min_p)
        self.keys = RandomKeys(check_seed(self.seed))

    @property
    def is_greedy(self) -> bool:
        return self.sampler is None and self.temp == 0

    @property
    def exact_distribution(self) -> bool:
        """Whether p is known (rejection sampling); a custom sampler is a black box."""
        return self.sampler is None and self.temp > 0

    @property
    def drafts_processed(self) -> bool:
        """Whether drafts come from the drafter's distribution after the logits processors
        (each draft seeing the drafts before it): sampled drafts, and greedy ones under
        processors (a grammar: drafts it forbids would only be rejected). Exact either way:
        sampled drafts are judged with that processed q, greedy ones against the target's
        argmax."""
        if not self.logits_processors:
            return False
        return self.is_greedy or (self.exact_distribution and self.draft_mode == "sampled")

    def process(self, history: mx.array, tokens: mx.array, logits: mx.array) -> mx.array:
        """Processed log-probabilities [N, V] for N positions.

        history: the tokens before `tokens`; tokens [N]: the input token of each position;
        logits [N, V]: what the model produced there. Position i's processors see
        history + tokens[: i + 1], as in plain decoding.
        """
        if self.logits_processors:
            rows = []
            for i in range(tokens.size):
                seen = mx.concatenate([history, tokens[: i + 1]])
                row = logits[i : i + 1]
                for processor in self.logits_processors:
                    row = processor(seen, row)
                rows.append(row)
            logits = mx.concatenate(rows)
        if self.is_greedy or self.sampler is not None:
            return _normaliser(0.0, 1.0, 0.0, 0, 1)(logits)
        return _normaliser(self.temp, self.top_p, self.min_p, self.top_k, self.min_tokens_to_keep)(logits)

    def sample(self, logprobs: mx.array, key: Optional[mx.array] = None) -> mx.array:
        """One token per row of processed log-probabilities: [N, V] -> [N]. `key`: an MLX
        random key (default: the next of this generation's keys, from `seed`)."""
        if self.sampler is not None:
            return self.sampler(logprobs)
        if self.is_greedy:
            return mx.argmax(logprobs, axis=-1)
        return _categorical(logprobs, self.keys.next() if key is None else key)

    @property
    def draw(self) -> Callable[[mx.array, mx.array], tuple]:
        """These options' draw as a pure function for `mx.compile` to trace (no logits
        processors): (logits [N, V], key) -> (tokens [N], processed log-probabilities [N, V])."""
        return _drawer(self.temp, self.top_p, self.min_p, self.top_k, self.min_tokens_to_keep)

    def accept(self, drafts: mx.array, draft_logprobs: Optional[mx.array], logprobs: mx.array,
               key: Optional[mx.array] = None):
        """Judge k drafts against the target's processed log-probabilities.

        drafts [..., k]; draft_logprobs [..., k, V] (log q; None for one-hot greedy drafts);
        logprobs [..., k + 1, V] (log p); `key`: an MLX random key for the draws (default:
        the next of this generation's keys). Leading axes are independent sequences.
        Returns (accepted count [...], choices [..., k + 1]: the target's token emitted
        after `accepted` drafts is at index `accepted`; greedy or with a sampler every
        index holds the target's choice at that position).
        """
        drafts = drafts.astype(mx.int32)
        if self.is_greedy:
            return _judge_greedy(drafts, logprobs)
        if not self.exact_distribution:  # a black-box sampler
            return _matching(drafts, self.sample(logprobs))
        key = self.keys.next() if key is None else key
        if drafts.shape[-1] == 0:  # plain decoding: one draw from p
            return mx.zeros(drafts.shape[:-1], mx.int32), _categorical(logprobs, key)
        if draft_logprobs is None:
            return _judge_compiled(drafts, logprobs, key)
        return _judge_compiled(drafts, logprobs, key, draft_logprobs)


@lru_cache(maxsize=64)
def _normaliser(temp: float, top_p: float, min_p: float, top_k: int, min_tokens_to_keep: int):
    """A compiled logits [N, V] -> processed log-probabilities [N, V] for one set of
    options: log-softmax, then (temp > 0) top-p / min-p / top-k and the temperature."""

    def normalise(logits):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if temp == 0:
            return logprobs
        if top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p, min_tokens_to_keep)
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        logprobs = logprobs / temp
        return logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)

    return mx.compile(normalise)


@lru_cache(maxsize=64)
def _drawer(temp: float, top_p: float, min_p: float, top_k: int, min_tokens_to_keep: int):
    normalise = _normaliser(temp, top_p, min_p, top_k, min_tokens_to_keep)

    def draw(logits, key):
        logprobs = normalise(logits)
        return mx.random.categorical(logprobs, key=key), logprobs

    return draw


@mx.compile
def _categorical(logprobs: mx.array, key: mx.array) -> mx.array:
    return mx.random.categorical(logprobs, key=key)


def _matching(drafts: mx.array, choices: mx.array):
    """Keep drafts while they equal the target's choice at their position; each emitted
    token is the target's choice: exact. -> (accepted [...], choices)"""
    matches = drafts == choices[..., : drafts.shape[-1]]
    return mx.cumprod(matches.astype(mx.int32), axis=-1).sum(-1), choices


@mx.compile
def _judge_greedy(drafts: mx.array, logprobs: mx.array):
    return _matching(drafts, mx.argmax(logprobs, axis=-1))


def _judge(drafts: mx.array, logprobs: mx.array, key: mx.array, draft_logprobs: Optional[mx.array] = None):
    """Leviathan et al.'s rule for k >= 1 drafts (shapes as `Sampling.accept`; q one-hot at
    each draft when `draft_logprobs` is None). One categorical draw, from the row the
    emitted token comes from: normalize(max(0, p - q)) at the first rejected draft, p
    after all k were kept. Every index of the returned choices holds that draw."""
    k, vocab = drafts.shape[-1], logprobs.shape[-1]
    uniform_key, residual_key = mx.random.split(key)
    p_drafts = mx.exp(mx.take_along_axis(logprobs[..., :k, :], drafts[..., None], axis=-1)[..., 0])
    if draft_logprobs is None:
        q_drafts = mx.ones(drafts.shape, logprobs.dtype)
    else:
        q_drafts = mx.exp(mx.take_along_axis(draft_logprobs, drafts[..., None], axis=-1)[..., 0])
    kept = mx.random.uniform(shape=drafts.shape, key=uniform_key) * q_drafts < p_drafts
    accepted = mx.cumprod(kept.astype(mx.int32), axis=-1).sum(-1)  # [...]
    row = accepted[..., None, None]
    logp = mx.take_along_axis(logprobs, row, axis=-2)  # [..., 1, V]
    rejected = mx.minimum(row, k - 1)  # the first rejected draft (any valid row after k kept)
    if draft_logprobs is None:
        draft = mx.take_along_axis(drafts, rejected[..., 0], axis=-1)  # [..., 1]
        q = (mx.arange(vocab) == draft[..., None]).astype(logp.dtype)
    else:
        q = mx.exp(mx.take_along_axis(draft_logprobs, rejected, axis=-2))
    p = mx.exp(logp)
    residual = mx.maximum(p - q, 0)
    # Where p <= q everywhere the draft is always accepted; keep the row valid anyway.
    residual = mx.where(residual.sum(-1, keepdims=True) > 0, residual, p)
    draw_from = mx.where(row < k, mx.log(residual), logp)[..., 0, :]  # [..., V] (mx.vmap cannot draw from [1, V])
    choice = mx.random.categorical(draw_from, key=residual_key)  # [...]
    return accepted, mx.broadcast_to(choice[..., None], drafts.shape[:-1] + (k + 1,))


_judge_compiled = mx.compile(_judge)  # one graph per shape and per kind of draft (with or without log q)
