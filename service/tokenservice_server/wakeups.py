"""Redis pub/sub wake-ups for token events and acks, when replicas share a Redis.

The events and acks themselves live in the database (fanout.py reads them
there, so nothing is lost when a message is); Redis only tells the other
processes to read now rather than at their next poll. A narrowing change's
origin publishes on EVENTS once the change has committed, a process that
recorded acks publishes on ACKS, and every process's listener thread wakes its
Fanout. PostgreSQL's LISTEN/NOTIFY does the same where there is no Redis.

Redis failing never fails a change: a publish that cannot reach it is
dropped (the poll still finds the event), and the listener reconnects with a
back-off. Messages carry no token id, only that something happened.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tokenservice.wakeups")

EVENTS = "tokenservice:token-events"
ACKS = "tokenservice:token-event-acks"
LISTEN_TIMEOUT_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 5.0


class RedisWakeups:
    """One publishing client (thread-safe) and, per listener, a subscription of its own."""

    def __init__(self, url: str, timeout_s: float) -> None:
        import redis  # imported here, as in ratelimit.RedisStore: only with a Redis URL

        self._url = url
        self._timeout_s = timeout_s
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._failing = False
        # Wake-ups heard (for tests and debugging): channel -> count.
        self.heard: dict[str, int] = {EVENTS: 0, ACKS: 0}

    def publish(self, channel: str) -> None:
        """Tells every listener to read now; a Redis out of reach only costs the poll's delay."""
        try:
            self._client.publish(channel, b"1")
        except self._errors as error:
            if not self._failing:
                log.warning("cannot publish token event wake-ups: %s", type(error).__name__)
            self._failing = True
        else:
            self._failing = False

    def listen(self, on_message: Callable[[str], None], stopping: threading.Event) -> None:
        """Calls `on_message(channel)` per wake-up until `stopping` is set (a thread body)."""
        import redis

        backoff = 0.1
        while not stopping.is_set():
            client: Any = redis.Redis.from_url(
                self._url, socket_timeout=LISTEN_TIMEOUT_SECONDS * 4,
                socket_connect_timeout=self._timeout_s,
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(EVENTS, ACKS)
                backoff = 0.1
                while not stopping.is_set():
                    message = pubsub.get_message(timeout=LISTEN_TIMEOUT_SECONDS)
                    if message is None:
                        continue
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else str(channel)
                    self.heard[channel] = self.heard.get(channel, 0) + 1
                    on_message(channel)
            except self._errors:
                stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except self._errors:
                    pass

    def close(self) -> None:
        try:
            self._client.close()
        except self._errors:
            pass
