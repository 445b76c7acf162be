"""Token buckets for failed authentications, per client address and per lookup id."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class FailureBuckets:
    """Each key may fail `burst` times at once, refilled at `per_second`.

    Only failures take from a bucket; a key whose bucket is empty is throttled
    until it refills. Buckets are kept for at most `max_keys` keys (least
    recently failed dropped first), so memory stays bounded under a flood of
    distinct addresses.
    """

    def __init__(
        self,
        burst: int,
        per_second: float,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = float(burst)
        self._rate = per_second
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _level(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self._burst
        tokens, at = entry
        return min(self._burst, tokens + (now - at) * self._rate)

    def retry_after(self, key: str) -> float:
        """Seconds until `key` may fail again; 0 when it is not throttled."""
        if not self._buckets:  # fast path: nobody has failed lately
            return 0.0
        with self._lock:
            level = self._level(key, self._clock())
        return 0.0 if level >= 1.0 else (1.0 - level) / self._rate

    def untouched(self, key: str) -> bool:
        """True when `key` has no failures that have not refilled yet."""
        if not self._buckets:
            return True
        with self._lock:
            return self._level(key, self._clock()) >= self._burst

    def hold(self, key: str, seconds: float) -> None:
        """`key` was kept waiting `seconds` (a tarpit): that time refills nothing.

        Without this a client answered after its retry delay would find its bucket
        refilled on every call, and a tarpit would grant it the refill rate."""
        with self._lock:
            entry = self._buckets.get(key)
            if entry is None:
                return
            now = self._clock()
            tokens, at = entry
            # At most one refill period of debt beyond the longest hold.
            self._buckets[key] = (tokens, min(at + seconds, now + seconds))

    def fail(self, key: str) -> None:
        with self._lock:
            now = self._clock()
            level = self._level(key, now)
            self._buckets[key] = (max(0.0, level - 1.0), now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
