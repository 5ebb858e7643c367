"""Turning logits into tokens, for plain and speculative decoding alike.

`Sampling` holds the user's options (mlx-lm's names) and produces, for a block of
positions, the processed target distribution p: logits processors with each position's
own token history, then top-p / min-p / top-k on the log-probabilities (mlx-lm's order and
functions), then temperature. Acceptance follows Leviathan et al.: accept draft x with
probability min(1, p(x) / q(x)); at the first rejection sample normalize(max(0, p - q));
after k acceptances sample a bonus token from p. Everything stays on the device.
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .validate import check_sampling, check_seed

DRAFT_MODES = ("greedy", "sampled")


class RandomKeys:
    """One generation's random state: a fresh subkey for every draw, split off a key made
    from `seed`, so a seeded run draws the same numbers whatever else runs beside it (other
    generations in this process, other rows of a batch). Without a seed every draw uses
    MLX's global random state."""

    def __init__(self, seed: Optional[int] = None):
        self.key = None if seed is None else mx.random.key(seed)

    def next(self) -> Optional[mx.array]:
        if self.key is None:
            return None
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
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.is_greedy or self.sampler is not None:
            return logprobs
        if self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p > 0:
            logprobs = apply_min_p(logprobs, self.min_p, self.min_tokens_to_keep)
        if self.top_k > 0 and self.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, self.top_k)
        logprobs = logprobs / self.temp
        return logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)

    def sample(self, logprobs: mx.array, key: Optional[mx.array] = None) -> mx.array:
        """One token per row of processed log-probabilities: [N, V] -> [N]. `key`: an MLX
        random key (default: the next of this generation's keys, from `seed`)."""
        if self.sampler is not None:
            return self.sampler(logprobs)
        if self.is_greedy:
            return mx.argmax(logprobs, axis=-1)
        return mx.random.categorical(logprobs, key=self.keys.next() if key is None else key)

    def accept(self, drafts: mx.array, draft_logprobs: Optional[mx.array], logprobs: mx.array,
               key: Optional[mx.array] = None):
        """Judge k drafts against the target's processed log-probabilities.

        drafts [..., k]; draft_logprobs [..., k, V] (log q; None for one-hot greedy drafts);
        logprobs [..., k + 1, V] (log p); `key`: an MLX random key for the draws (default:
        the global random state). Leading axes are independent sequences. Returns
        (accepted count [...], the target's token for every position [..., k + 1]: the one
        emitted after `accepted` drafts is at index `accepted`).
        """
        k = drafts.shape[-1]
        drafts = drafts.astype(mx.int32)
        if not self.exact_distribution:
            # Greedy, or a black-box sampler: keep drafts while they equal the target's own
            # choice at that position. Each emitted token is the target's choice: exact.
            choices = self.sample(logprobs)
            matches = drafts == choices[..., :k]
            return mx.cumprod(matches.astype(mx.int32), axis=-1).sum(-1), choices
        p = mx.exp(logprobs)
        if draft_logprobs is None:
            q = mx.zeros(p[..., :k, :].shape, dtype=p.dtype)
            q = mx.put_along_axis(q, drafts[..., None], mx.array(1.0, p.dtype), axis=-1)
        else:
            q = mx.exp(draft_logprobs)
        p_draft = mx.take_along_axis(p[..., :k, :], drafts[..., None], axis=-1)[..., 0]
        q_draft = mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        uniform_key, residual_key = mx.random.split(key) if key is not None else (self.keys.next(), self.keys.next())
        accepted_each = mx.random.uniform(shape=drafts.shape, key=uniform_key) * q_draft < p_draft
        accepted = mx.cumprod(accepted_each.astype(mx.int32), axis=-1).sum(-1)
        residual = mx.maximum(p[..., :k, :] - q, 0)
        # Where p <= q everywhere the draft is always accepted; keep the row valid anyway.
        residual = mx.where(residual.sum(-1, keepdims=True) > 0, residual, p[..., :k, :])
        choices = mx.random.categorical(
            mx.log(mx.concatenate([residual, p[..., k:, :]], axis=-2)), key=residual_key
        )
        return accepted, choices
