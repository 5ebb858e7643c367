"""What a generation reports about itself: `SpeculativeStats`, counted over the rounds
whose tokens were handed out."""

from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from typing import List, Optional

from .speculative import Round


@dataclass
class SpeculativeStats:
    """Counts over the rounds whose tokens were handed out, and the run's speeds.

    Rates are derived from the counts (`mean_accepted_length`, `acceptance_by_position`,
    `rejection_rate`, `fallback_rate`), so statistics of several runs `merge` exactly.
    """

    num_draft_tokens: int = 0  # k; with `auto`, the most a round may draft
    auto: bool = False  # k chosen per round (num_draft_tokens="auto")
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    fallback_rounds: int = 0  # rounds where no draft was accepted
    accepted_by_position: List[int] = field(default_factory=list)
    drafted_by_position: List[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    media_tokens: int = 0  # the prompt's image soft tokens (counted in prompt_tokens)
    encoder_seconds: float = 0.0  # reading, preprocessing and encoding the images
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB, as in mlx-lm's GenerationResponse
    rounds_log: Optional[List[dict]] = None
    rounds_by_k: List[int] = field(default_factory=list)  # rounds that drafted k tokens, k = 0..

    @classmethod
    def empty(cls, num_draft_tokens: int, prompt_tokens: int = 0, record_rounds: bool = False,
              auto: bool = False):
        """Statistics of a run that has not produced a round yet."""
        k = num_draft_tokens
        return cls(num_draft_tokens=k, auto=auto, accepted_by_position=[0] * k, drafted_by_position=[0] * k,
                   prompt_tokens=prompt_tokens, rounds_log=[] if record_rounds else None,
                   rounds_by_k=[0] * (k + 1))

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per round: accepted drafts per round + 1."""
        return self.accepted_tokens / self.rounds + 1 if self.rounds else 0.0

    @property
    def acceptance_by_position(self) -> List[float]:
        """Fraction of rounds drafting position i whose draft i was accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    @property
    def rejection_rate(self) -> float:
        drafted = self.drafted_tokens
        return (drafted - self.accepted_tokens) / drafted if drafted else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.fallback_rounds / self.rounds if self.rounds else 0.0

    def record(self, round_: Round) -> None:
        if self.rounds_log is not None:
            self.rounds_log.append(
                dict(position=round_.position, k=round_.k, drafted=round_.drafted, accepted=round_.accepted,
                     emitted=round_.emitted, prefill=round_.from_prefill)
            )
        if round_.from_prefill:
            return
        self.rounds += 1
        if round_.k < len(self.rounds_by_k):
            self.rounds_by_k[round_.k] += 1
        self.drafted_tokens += len(round_.drafted)
        self.accepted_tokens += round_.accepted
        self.fallback_rounds += bool(round_.drafted) and round_.accepted == 0
        for i in range(len(round_.drafted)):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += i < round_.accepted

    def finish(self, generation_tokens: int, seconds: float, peak_memory: float) -> None:
        """Record the end of the run: tokens handed out in `seconds` of generation."""
        self.generation_tokens = generation_tokens
        self.generation_tps = generation_tokens / seconds
        self.peak_memory = peak_memory

    def merge(self, other: "SpeculativeStats") -> "SpeculativeStats":
        """Two runs' statistics as one run's: counts summed (so the rates weigh every round
        alike; per position over the runs that drafted it, k the larger), tokens/s over both
        runs' time, the higher peak memory, round logs joined (kept only when both runs
        recorded one)."""
        logs = None
        if self.rounds_log is not None and other.rounds_log is not None:
            logs = self.rounds_log + other.rounds_log
        return SpeculativeStats(
            num_draft_tokens=max(self.num_draft_tokens, other.num_draft_tokens),
            rounds=self.rounds + other.rounds,
            drafted_tokens=self.drafted_tokens + other.drafted_tokens,
            accepted_tokens=self.accepted_tokens + other.accepted_tokens,
            fallback_rounds=self.fallback_rounds + other.fallback_rounds,
            accepted_by_position=_summed(self.accepted_by_position, other.accepted_by_position),
            drafted_by_position=_summed(self.drafted_by_position, other.drafted_by_position),
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            prompt_tps=_pooled_rate(self.prompt_tokens, self.prompt_tps, other.prompt_tokens, other.prompt_tps),
            media_tokens=self.media_tokens + other.media_tokens,
            encoder_seconds=self.encoder_seconds + other.encoder_seconds,
            generation_tokens=self.generation_tokens + other.generation_tokens,
            generation_tps=_pooled_rate(self.generation_tokens, self.generation_tps,
                                        other.generation_tokens, other.generation_tps),
            peak_memory=max(self.peak_memory, other.peak_memory),
            rounds_log=logs,
            auto=self.auto or other.auto,
            rounds_by_k=_summed(self.rounds_by_k, other.rounds_by_k),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["rounds_log"] is None:
            del d["rounds_log"]
        for name in ("mean_accepted_length", "acceptance_by_position", "rejection_rate", "fallback_rate"):
            d[name] = getattr(self, name)
        return d

    @property
    def draft_length(self) -> str:
        """k as people read it: the fixed k, or auto with how many rounds drafted each k."""
        if not self.auto:
            return str(self.num_draft_tokens)
        used = " ".join(f"{k}:{n}" for k, n in enumerate(self.rounds_by_k) if n)
        return f"auto (up to {self.num_draft_tokens}; rounds by k {used or '-'})"

    def summary(self) -> str:
        """The statistics as a few lines of text, for people."""
        by_position = " ".join(f"{a:.2f}" for a in self.acceptance_by_position) or "-"
        media = (f" ({self.media_tokens} image tokens, encoded in {self.encoder_seconds:.3f} s)"
                 if self.media_tokens else "")
        return (
            f"prompt: {self.prompt_tokens} tokens{media}, {self.prompt_tps:.1f} tokens/s\n"
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s\n"
            f"speculation: k={self.draft_length}, {self.rounds} rounds, "
            f"mean accepted length {self.mean_accepted_length:.2f}, "
            f"acceptance by position [{by_position}], "
            f"rejection rate {self.rejection_rate:.2f}, fallback rate {self.fallback_rate:.2f}\n"
            f"peak memory: {self.peak_memory:.3f} GB"
        )


def _pooled_rate(count_a: int, rate_a: float, count_b: int, rate_b: float) -> float:
    """Items per second of two runs together, from each run's count and rate."""
    seconds = (count_a / rate_a if rate_a else 0.0) + (count_b / rate_b if rate_b else 0.0)
    return (count_a + count_b) / seconds if seconds else 0.0


def _summed(a: List[int], b: List[int]) -> List[int]:
    """Element-wise sum; the shorter list counts as zeros past its end."""
    return [x + y for x, y in zip_longest(a, b, fillvalue=0)]
