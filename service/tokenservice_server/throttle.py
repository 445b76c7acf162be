"""Token buckets for failed authentications, per client address and per lookup id."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from .ratelimit import LimitStore, LocalStore


class FailureBuckets:
    """Each key may fail `burst` times at once, refilled at `per_second`.

    Only failures take from a bucket; a key whose bucket is empty is throttled
    until it refills. By default the buckets live in this process, for at most
    `max_keys` keys (least recently failed dropped first), so memory stays
    bounded under a flood of distinct addresses. Given a shared `store` (a
    RedisStore), every process using it draws on the same buckets, kept under
    `namespace`; `max_keys` and `clock` are then the store's business.
    """

    def __init__(
        self,
        burst: int,
        per_second: float,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        store: LimitStore | None = None,
        namespace: str = "failures",
    ) -> None:
        self._burst = float(burst)
        self._rate = per_second
        self._store = store if store is not None else LocalStore(max_keys, clock)
        self._namespace = namespace

    def _level(self, key: str) -> float:
        return self._store.bucket_level(self._namespace, key, self._burst, self._rate)

    def retry_after(self, key: str) -> float:
        """Seconds until `key` may fail again; 0 when it is not throttled."""
        level = self._level(key)
        return 0.0 if level >= 1.0 else (1.0 - level) / self._rate

    def untouched(self, key: str) -> bool:
        """True when `key` has no failures that have not refilled yet."""
        return self._level(key) >= self._burst

    def hold(self, key: str, seconds: float) -> None:
        """`key` was kept waiting `seconds` (a tarpit): that time refills nothing.

        Without this a client answered after its retry delay would find its bucket
        refilled on every call, and a tarpit would grant it the refill rate."""
        self._store.bucket_hold(self._namespace, key, seconds, self._burst, self._rate)

    def fail(self, key: str) -> None:
        self._store.bucket_fail(self._namespace, key, self._burst, self._rate)


# An IPv6 client usually holds a whole /64 (one LAN, one subscriber), so a fresh
# address costs it nothing: its failures count against its /64 as well.
IPV6_CLIENT_PREFIX = 64


def client_keys(address: str) -> tuple[str, ...]:
    """The buckets a client's failures count in: its address and, for IPv6, its /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return (address,)
    if ip.version == 6:
        return (address, str(ipaddress.ip_network(f"{ip}/{IPV6_CLIENT_PREFIX}", strict=False)))
    return (address,)
