"""A bounded LRU of K/V caches keyed by the tokens they hold.

A request whose prompt starts with an entry's tokens takes that entry and prefills only
the rest (a multi-turn chat: the previous turn's prompt and reply). A request that shares
only part of an entry (a common system prompt) gets a copy rolled back to the shared
prefix, when the sliding-window layers still hold enough to roll back that far. Bounded by
entry count and bytes; the least recently used entries go first.
"""

import copy
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

from ..cache import SlidingKVCache, rollback_cache


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def can_roll_back(cache: List, offset: int) -> bool:
    """Whether every layer can drop its positions at or after `offset` (see SlidingKVCache.trim)."""
    return all(
        not isinstance(c, SlidingKVCache) or c.start <= max(0, offset - c.window - 1) for c in cache
    )


def cache_bytes(cache: List) -> int:
    return sum(c.nbytes for c in cache)


class PromptCache:
    def __init__(self, max_entries: int = 10, max_bytes: int = 1 << 30):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("the prompt cache's entry and byte limits must be >= 0 (0 turns it off)")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: "OrderedDict[Tuple[int, ...], Tuple[List, int]]" = OrderedDict()  # tokens -> (cache, bytes)
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.entries.values())

    def fetch(self, prompt: Sequence[int]) -> Tuple[Optional[List], int]:
        """(a cache holding the first n tokens of `prompt`, n), or (None, 0).

        At least the prompt's last token is left to prefill, since generation starts
        from its logits.
        """
        best, best_len = None, 0
        for tokens, (cache, _) in self.entries.items():
            n = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if n > best_len and can_roll_back(cache, n):
                best, best_len = tokens, n
        if best is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        cache, _ = self.entries[best]
        if best_len == len(best):  # the prompt extends the entry: hand it over
            del self.entries[best]
        else:  # keep the entry for others; hand out a rolled-back copy
            self.entries.move_to_end(best)
            cache = copy.deepcopy(cache)
            rollback_cache(cache, best_len)
        return cache, best_len

    def store(self, tokens: Sequence[int], cache: List) -> None:
        """Keep `cache`, which holds exactly `tokens`, as the most recent entry."""
        size = cache_bytes(cache)
        if self.max_entries == 0 or size > self.max_bytes or not tokens:
            return
        self.entries[tuple(tokens)] = (cache, size)
        self.entries.move_to_end(tuple(tokens))
        while len(self.entries) > self.max_entries or self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)
