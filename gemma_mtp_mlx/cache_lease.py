"""One generation at a time on a prompt cache, and a cache that always matches what was
handed out.

A generation queues its next round (which writes that round's K/V into the cache) before it
hands the current round's tokens to its caller. A caller that stops iterating but keeps the
generator (no `close()`, not garbage collected) would leave those positions in the cache.
So before each token is handed out the generation records the length the cache must have
then, and the next generation on the cache settles it: it closes the paused one (which
drops its round in flight) and rolls the cache back to that length.

While a generation is computing (from the caller's `next()` to the token it returns: in
another thread, say) the cache is busy and a second generation on it is refused. A paused
generation whose cache was taken over this way raises if it is resumed, instead of
continuing from a state that is no longer its own.
"""

import threading
import weakref
from typing import Generator, List, Optional

from .cache import rollback_cache
from .validate import InvalidInput

_leases = weakref.WeakKeyDictionary()  # a cache's first layer -> the lease holding the cache
_lock = threading.Lock()


class CacheInUse(InvalidInput):
    """The prompt cache belongs to another generation."""


class Lease:
    def __init__(self, cache: List):
        self.cache = cache
        self.busy = True  # computing; a paused generation is not busy
        self.revoked = False  # a later generation took the cache
        self.handed_out: Optional[int] = None  # cache length matching the tokens handed out
        self.rounds: Optional[Generator] = None  # the round generator, closed on take-over

    @classmethod
    def claim(cls, cache: List) -> "Lease":
        """Take `cache` for a new generation, settling what a paused one left in it."""
        with _lock:
            held = _leases.get(cache[0])
            if held is not None and held.busy:
                raise CacheInUse(
                    "this prompt_cache is in use by a generation that is running now: "
                    "wait for it to finish, or give each concurrent generation its own cache"
                )
            lease = _leases[cache[0]] = cls(cache)
        if held is not None:
            held._revoke()
        return lease

    def _revoke(self) -> None:
        self.revoked = True
        if self.rounds is not None:
            self.rounds.close()  # drops the round in flight
        if self.handed_out is not None:
            rollback_cache(self.cache, self.handed_out)

    def pause(self, handed_out: int) -> None:
        """About to hand a token out; the cache must then hold `handed_out` positions."""
        self.handed_out = handed_out
        self.busy = False

    def resume(self) -> None:
        if self.revoked:
            raise CacheInUse(
                "this generation's prompt_cache was taken by a later call while it was paused, "
                "so it cannot continue: start it again, or give each generation its own cache"
            )
        self.busy = True

    @property
    def owned(self) -> bool:
        return not self.revoked

    def release(self) -> None:
        """The generation ended and left the cache as it should be."""
        with _lock:
            if _leases.get(self.cache[0]) is self:
                del _leases[self.cache[0]]
