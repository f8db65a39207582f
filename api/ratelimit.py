"""Rate limits at the edge: a token bucket per API key, and per client address for requests
without a valid key.

Each bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; a request
takes one token or is refused with 429 and how long until one is back (``Retry-After``).
Memory is bounded: at most ``buckets_max`` buckets are tracked, the least recently seen is
forgotten first (it comes back with a full bucket, which only ever errs towards letting a
request through). Per server process: with ``ledger serve --workers N`` each HTTP worker is
given 1/N of each rate and burst (``api.workers.share_of``), so that N processes do not
multiply a client's budget.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ledger import limits
from ledger.settings import Settings


@dataclass(frozen=True)
class Rate:
    """A token bucket's refill rate (tokens per second) and its size."""

    per_s: float
    burst: int

    def __post_init__(self) -> None:
        assert self.per_s > 0 and self.burst >= 1, self


class RateLimiter:
    """Token buckets keyed by a string (``key:<id>`` or ``addr:<host>``), two rates."""

    def __init__(
        self,
        key_rate: Rate,
        address_rate: Rate,
        buckets_max: int = limits.rate_buckets_max,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key_rate = key_rate
        self.address_rate = address_rate
        self.buckets_max = buckets_max
        self.clock = clock
        # name -> (tokens, time of last refill); ordered from least to most recently seen
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key_id: str | None, address: str | None) -> float:
        """Takes one token for the key (or, without one, the address): 0.0 when the request may
        go ahead, else the seconds to wait before one token is back."""
        if key_id is not None:
            name, rate = f"key:{key_id}", self.key_rate
        else:
            name, rate = f"addr:{address or 'unknown'}", self.address_rate
        now = self.clock()
        tokens, then = self._buckets.pop(name, (float(rate.burst), now))
        tokens = min(float(rate.burst), tokens + (now - then) * rate.per_s)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate.per_s
        self._buckets[name] = (tokens, now)  # re-inserted: now the most recently seen
        while len(self._buckets) > self.buckets_max:
            self._buckets.popitem(last=False)
        return wait


    def spent(self, address: str | None) -> bool:
        """Whether the address (requests without a valid key) has no token left now; takes
        none. Asked before a key the server has not seen is looked up in the database."""
        found = self._buckets.get(f"addr:{address or 'unknown'}")
        if found is None:
            return False
        tokens, then = found
        return tokens + (self.clock() - then) * self.address_rate.per_s < 1.0


def retry_after(wait_s: float) -> str:
    """``Retry-After`` is whole seconds (RFC 9110): rounded up, so that a client that waits
    exactly that long finds a token."""
    return str(max(1, math.ceil(wait_s)))


def from_settings(settings: Settings) -> RateLimiter:
    return RateLimiter(
        Rate(settings.rate_per_s, settings.rate_burst),
        Rate(settings.rate_address_per_s, settings.rate_address_burst),
    )
