"""Replicas sharing a Redis wake each other through pub/sub when a token narrows or an ack lands.

The events themselves stay in the database; these tests check that the
wake-ups are sent and heard, and that a Redis out of reach costs nothing but
the poll's delay.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from conftest import RunningServer, make_config, start_server
from redis_server import RedisServer
from test_lease_cache import LEASE, WITHIN, refused, warm

from tokenservice_client import LeaseCache, TokenServiceClient
from tokenservice_server.wakeups import ACKS, EVENTS

PERMISSIONS = ["api_token:manage", "api_token:verify", "pass:read"]


def _replicas(url: str, redis_url: str) -> tuple[RunningServer, RunningServer]:
    config = make_config(url, lease_seconds=LEASE, redis_url=redis_url)
    return start_server(config), start_server(config)


def _stop(*servers: RunningServer) -> None:
    for server in servers:
        server.channel.close()
        server.server.stop(grace=1)


def _heard(server: RunningServer, channel: str) -> int:
    wakeups = server.server.fanout.wakeups
    assert wakeups is not None
    return wakeups.heard.get(channel, 0)


@pytest.fixture
def two(sqlite_database_url: str, redis_url: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    a, b = _replicas(sqlite_database_url, redis_url)
    yield a, b
    _stop(a, b)


def _world(a: RunningServer) -> tuple[TokenServiceClient, str]:
    email = f"ops-{uuid.uuid4().hex[:8]}@acme.test"
    a.add_user(email, "acme", PERMISSIONS)
    return (TokenServiceClient(a.target, a.mint(email, ["api_token:manage", "pass:read"])),
            a.mint(email, ["api_token:verify"]))


def test_a_revoke_on_one_replica_wakes_the_other_through_redis(
    two: tuple[RunningServer, RunningServer], redis_url: str
) -> None:
    a, b = two
    manager, verify = _world(a)
    listener = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(EVENTS, ACKS)
    cache = LeaseCache(b.target, verify)  # watching the replica the change does not go through
    try:
        assert cache.wait_leased(WITHIN)
        made = manager.create_token("svc", ["pass:read"])
        warm(cache, made.token)
        events_b, acks_a = _heard(b, EVENTS), _heard(a, ACKS)
        manager.revoke_token(made.api_token.id, timeout=WITHIN)
        assert refused(cache, made.token)
        # The origin published the event, the other replica heard it, and its ack
        # (published in turn) reached the origin.
        seen: set[str] = set()
        deadline = time.monotonic() + WITHIN
        while {EVENTS, ACKS} - seen and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.2)
            if message is not None:
                seen.add(message["channel"].decode())
        assert seen == {EVENTS, ACKS}
        # The replicas' own listeners count what they heard on threads of their own,
        # maybe a moment after this test's listener did.
        while time.monotonic() < deadline and not (
            _heard(b, EVENTS) > events_b and _heard(a, ACKS) > acks_a
        ):
            time.sleep(0.05)
        assert _heard(b, EVENTS) > events_b
        assert _heard(a, ACKS) > acks_a
    finally:
        cache.close()
        manager.close()
        listener.close()


def test_a_redis_out_of_reach_costs_the_wake_ups_not_the_revoke(
    sqlite_database_url: str, own_redis: RedisServer
) -> None:
    a, b = _replicas(sqlite_database_url, own_redis.url())
    manager, verify = _world(a)
    cache = LeaseCache(b.target, verify)
    try:
        assert cache.wait_leased(WITHIN)
        own_redis.stop()
        made = manager.create_token("svc", ["pass:read"])
        warm(cache, made.token)
        # Polling still carries the event: the consumer drops the token before
        # RevokeToken returns.
        manager.revoke_token(made.api_token.id, timeout=WITHIN)
        assert refused(cache, made.token)
        # Redis back: the listeners reconnect by themselves and hear the next one.
        own_redis.start()
        heard = _heard(b, EVENTS)
        deadline = time.monotonic() + WITHIN * 3
        while _heard(b, EVENTS) == heard:
            assert time.monotonic() < deadline, "the listener never came back"
            again = manager.create_token("svc", ["pass:read"])
            manager.revoke_token(again.api_token.id, timeout=WITHIN)
            time.sleep(0.2)
    finally:
        cache.close()
        manager.close()
        _stop(a, b)
