"""Adaptive speculation: each round's draft length k chosen from what this run measures.

A round of k drafts yields E(k) tokens on average and takes T(k) seconds, so it emits
E(k) / T(k) tokens/s; plain decoding (k = 0) emits one token per T(0). The controller
estimates both from the rounds it sees and picks the k with the highest rate:

- E(k) = 1 + sum over j <= k of a_1 ... a_j, where a_i is the chance that draft i is kept
  given drafts 1..i-1 were. Each a_i comes from accepted / judged counts that decay with
  every drafting round (recent rounds weigh more), shrunk toward a_(i-1): a position not
  drafted lately leans on the one before it, so longer drafts are tried when the last
  position keeps being accepted.
- T(k): the host wall time between round completions of each width (everything a round
  costs, measured on this machine), smoothed per width and blended with a line
  a + b k fitted through the widths measured so far. In decode steps that line is the
  benchmark's cost model, T(k) / T(0) = v(k) + k c (DESIGN.md 7; `round_cost`).

Every few rounds it tries a neighbouring k for two rounds (a round's time is known only
when the next round has its width: rounds are queued one ahead), so the estimates around
its choice stay fresh.
When plain decoding wins it still probes drafting now and then: again at once while the
probes emit tokens faster than plain decoding, after twice as many plain rounds (up to a
limit) each time one does not.

Any choice keeps the output exact: k is fixed before the round's random draws, and each
round, whatever its k, emits tokens from the target's distribution.
"""

from typing import List, Optional, Sequence

AUTO = "auto"
AUTO_MAX_DRAFT_TOKENS = 8  # the widest round `num_draft_tokens="auto"` may choose


def round_cost(k: int, c: float, v_k: float) -> float:
    """A round of k drafts in target decode steps: k drafter steps of c each plus one
    verify forward of k + 1 tokens, v(k). Plain decoding (k = 0) costs one step."""
    return 1.0 if k == 0 else v_k + k * c


def expected_tokens(acceptance: Sequence[float]) -> float:
    """Mean tokens a round of len(acceptance) drafts emits, from each position's
    conditional acceptance: 1 + a_1 + a_1 a_2 + ..."""
    tokens, run = 1.0, 1.0
    for a in acceptance:
        run *= a
        tokens += run
    return tokens


class DraftLengthController:
    """Chooses each round's k in [0, max_k] to maximise tokens per second.

    `choose()` returns the next round's k; `observe(k, accepted, seconds)` reports a
    finished round: its k, the drafts the target kept, and the host wall time since the
    previous round finished (None when unknown, e.g. the first round of a call). Rounds
    may be observed one late: plain rounds queue the next before they finish.
    """

    def __init__(
        self,
        max_k: int,
        *,
        decay: float = 0.93,  # weight of past rounds in the acceptance counts, per drafting round
        time_smoothing: float = 0.1,  # weight of a new timing in its width's running mean
        explore_every: int = 16,  # rounds between tries of a neighbouring k (two rounds each)
        first_probe_after: int = 4,  # plain rounds before the first probe of drafting
        max_probe_after: int = 32,
        prior_acceptance: float = 0.5,
        prior_weight: float = 2.0,  # pseudo-counts of a position's prior: the position before
        prior_step_cost: float = 0.25,  # b / a of the round-time line before two widths are timed
    ):
        if max_k < 0:
            raise ValueError(f"max_k must be >= 0, got {max_k}")
        self.max_k = max_k
        self.decay, self.time_smoothing = decay, time_smoothing
        self.explore_every = explore_every
        self.first_probe_after, self.max_probe_after = first_probe_after, max_probe_after
        self.prior_acceptance, self.prior_weight = prior_acceptance, prior_weight
        self.prior_step_cost = prior_step_cost
        self.accepted = [0.0] * max_k  # decayed counts of drafts kept, per position
        self.judged = [0.0] * max_k  # ... and of drafts the target judged
        self.mean_seconds: List[Optional[float]] = [None] * (max_k + 1)  # per width
        self.timings = [0] * (max_k + 1)
        self.rounds = 0
        self.plain_streak = 0  # plain rounds since the last probe
        self.probe_after = first_probe_after
        self.probe_in_flight = False
        self.probe_paid = False  # the last probe emitted tokens faster than plain decoding

    def acceptance(self) -> List[float]:
        """Estimated conditional acceptance of each draft position, a_1..a_max_k."""
        estimates, previous = [], self.prior_acceptance
        for accepted, judged in zip(self.accepted, self.judged):
            previous = (accepted + self.prior_weight * previous) / (judged + self.prior_weight)
            estimates.append(previous)
        return estimates

    def round_seconds(self) -> List[float]:
        """Predicted seconds of a round of each width 0..max_k: a width's own running mean,
        leaning on the line while it has few timings. Plain rounds queue the next one
        before they finish, so they are not on the line: their own mean, once measured."""
        a, b = self._time_line()
        predicted = [a if self.mean_seconds[0] is None else self.mean_seconds[0]]
        for k in range(1, self.max_k + 1):
            weight, mean = min(self.timings[k], 8), self.mean_seconds[k]
            line = a + b * k
            predicted.append(line if mean is None else (weight * mean + 2 * line) / (weight + 2))
        return predicted

    def _time_line(self):
        """(a, b) of T(k) = a + b k for k >= 1, fitted to the widths timed so far (weighted
        least squares); with one width timed, its mean and the prior slope; with none, the
        plain time or 1 (only ratios matter)."""
        points = [(k, m, min(n, 8)) for k, (m, n) in enumerate(zip(self.mean_seconds, self.timings))
                  if k and m is not None]
        if len(points) >= 2:
            w = sum(n for _, _, n in points)
            mk = sum(n * k for k, _, n in points) / w
            mt = sum(n * t for _, t, n in points) / w
            var = sum(n * (k - mk) ** 2 for k, _, n in points)
            b = max(sum(n * (k - mk) * (t - mt) for k, t, n in points) / var, 0.0)
            return max(mt - b * mk, 0.1 * mt), b
        if points:
            k, t, _ = points[0]
            a = t / (1 + self.prior_step_cost * k)
        else:
            a = self.mean_seconds[0] or 1.0
        return a, self.prior_step_cost * a

    def rates(self) -> List[float]:
        """Predicted tokens per second of each width 0..max_k."""
        seconds, acceptance = self.round_seconds(), self.acceptance()
        return [expected_tokens(acceptance[:k]) / seconds[k] for k in range(self.max_k + 1)]

    def choose(self) -> int:
        rates = self.rates()
        best = max(range(len(rates)), key=rates.__getitem__)
        if self.timings[0] < 3 and rates[0] > 0.85 * rates[best]:
            best = 0  # a close call, and plain decoding barely timed: time it
        self.rounds += 1
        if best == 0 and self.max_k:
            return self._plain_or_probe()
        self.plain_streak, self.probe_after, self.probe_paid = 0, self.first_probe_after, False
        if self.rounds % self.explore_every in (0, 1):
            step = 1 if (self.rounds // self.explore_every) % 2 else -1
            return min(max(best + step, 0), self.max_k)
        return best

    def _plain_or_probe(self) -> int:
        """0, or 1 for a probe: the cheapest round that measures acceptance again."""
        self.plain_streak += 1
        if not (self.probe_paid or self.plain_streak > self.probe_after):
            return 0
        if not self.probe_paid:
            self.probe_after = min(2 * self.probe_after, self.max_probe_after)
        self.plain_streak, self.probe_in_flight = 0, True
        return 1

    def observe(self, k: int, accepted: int, seconds: Optional[float] = None) -> None:
        if not 0 <= accepted <= k <= self.max_k:
            raise ValueError(f"a round of k={k} (max {self.max_k}) cannot accept {accepted} drafts")
        if k:
            for i in range(self.max_k):
                self.accepted[i] = self.decay * self.accepted[i] + (i < accepted)
                self.judged[i] = self.decay * self.judged[i] + (i < k and i <= accepted)
            if self.probe_in_flight:  # did it emit tokens faster than plain decoding does?
                took = seconds if seconds else self.round_seconds()[k]
                faster = (accepted + 1) * self.round_seconds()[0] > took
                self.probe_in_flight, self.probe_paid = False, accepted > 0 and faster
        if seconds is not None and seconds > 0:
            self.timings[k] += 1
            mean = self.mean_seconds[k]
            if mean is None:
                self.mean_seconds[k] = seconds
            else:  # the plain mean of the first timings, then a running one; a stalled
                # round (a busy machine) or one that overlapped the previous moves it a bounded step
                weight = max(1 / self.timings[k], self.time_smoothing)
                self.mean_seconds[k] = mean + weight * (min(max(seconds, mean / 2), 2 * mean) - mean)
