"""A property: however authentications, revocations, user disables, renewals, drops, freezes
and reconnections interleave, no consumer accepts a token after the change forbidding it returned.

One real server (SQLite, a short lease) and two real consumers with their
background streams; hypothesis picks the sequence of steps. Revocations go
through RevokeToken, user disables through the command line's path (the
change committed, then a wait for every process's ack in the store), so both
the in-process and the cross-process paths are exercised.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from conftest import RunningServer, make_config, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenservice_client import LeaseCache, RateLimited, TokenServiceClient, Unauthenticated
from tokenservice_server import narrowing
from tokenservice_server.fanout import settle_blocking

LEASE = 0.3
USERS, TOKENS_PER_USER, CONSUMERS = 2, 2, 2

pytestmark = pytest.mark.slow


@dataclass
class Rig:
    ts: RunningServer
    manager: TokenServiceClient
    consumers: list[LeaseCache] = field(default_factory=list)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    url = f"sqlite:///{tmp_path_factory.mktemp('property') / 'tokens.db'}"
    # No rate limit: the hammering below would spend any, and limits have tests of their own.
    ts = start_server(make_config(url, lease_seconds=LEASE, rate_limit=None))
    ts.add_user("ops@acme.test", "acme",
                ["api_token:manage", "api_token:admin", "api_token:verify", "pass:read"])
    # An org admin: it may revoke every user's tokens.
    admin = ts.mint("ops@acme.test", ["api_token:manage", "api_token:admin"])
    rig = Rig(ts, TokenServiceClient(ts.target, admin))
    verify = ts.mint("ops@acme.test", ["api_token:verify"])
    rig.consumers = [LeaseCache(ts.target, verify) for _ in range(CONSUMERS)]
    try:
        yield rig
    finally:
        for consumer in rig.consumers:
            consumer.close()
        rig.manager.close()
        ts.channel.close()
        ts.server.stop(grace=1)


consumer = st.integers(0, CONSUMERS - 1)
token = st.integers(0, USERS * TOKENS_PER_USER - 1)
step = st.one_of(
    st.tuples(st.just("auth"), consumer, token),
    st.tuples(st.just("auth"), consumer, token),  # twice as likely: the thing being tested
    st.tuples(st.just("revoke"), token),
    st.tuples(st.just("disable"), st.integers(0, USERS - 1)),
    st.tuples(st.just("renew")),
    st.tuples(st.just("drop"), consumer),
    st.tuples(st.just("freeze"), consumer),
    st.tuples(st.just("thaw"), consumer),
)


def _disable(rig: Rig, email: str, first: bool) -> None:
    """What `tokenservice user disable` does: commit, then wait for every process's ack."""
    service = rig.ts.server.service
    narrowed: list = []
    collecting = narrowing.collect(narrowed)
    try:
        with service.store.connection():
            service.disable_user(email)
    finally:
        narrowing.stop(collecting)
    # Disabling a disabled user changes nothing, and records nothing.
    assert bool(narrowed) == first, "disabling a user recorded no event"
    settle_blocking(service.store, narrowed)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=4, max_size=16))
def test_no_consumer_accepts_a_token_after_the_change_forbidding_it_returned(
    rig: Rig, steps: list[tuple]
) -> None:
    run = uuid.uuid4().hex[:8]
    emails = [f"u{i}-{run}@acme.test" for i in range(USERS)]
    raws: list[str] = []
    owner: list[int] = []
    for u, email in enumerate(emails):
        rig.ts.add_user(email, "acme", ["pass:read"])
        for _ in range(TOKENS_PER_USER):
            raws.append(rig.ts.mint(email, ["pass:read"]))
            owner.append(u)
    ids = [rig.manager.authenticate(raw).token_id for raw in raws]
    forbidden: set[int] = set()
    disabled: set[int] = set()
    # Meanwhile every consumer is hammered with every token, so answers are in
    # flight whenever an invalidation arrives (their outcomes are not checked:
    # each races a change).
    stop = threading.Event()
    hammers = [threading.Thread(target=_hammer, args=(cache, raws, stop), daemon=True)
               for cache in rig.consumers]
    for hammer in hammers:
        hammer.start()
    try:
        for op in steps:
            kind = op[0]
            if kind == "auth":
                _, c, t = op
                cache = rig.consumers[c]
                if t in forbidden:
                    with pytest.raises(Unauthenticated):
                        cache.authenticate(raws[t])
                else:
                    assert cache.authenticate(raws[t]).token_id == ids[t]
            elif kind == "revoke":
                rig.manager.revoke_token(ids[op[1]], timeout=30)
                forbidden.add(op[1])
            elif kind == "disable":
                _disable(rig, emails[op[1]], first=op[1] not in disabled)
                disabled.add(op[1])
                forbidden.update(t for t in range(len(raws)) if owner[t] == op[1])
            elif kind == "renew":
                time.sleep(LEASE / 3)  # a renewal or two happen meanwhile
            elif kind == "drop":
                rig.consumers[op[1]].disconnect()
            elif kind == "freeze":
                rig.consumers[op[1]].freeze()
            elif kind == "thaw":
                rig.consumers[op[1]].thaw()
        # And at the end, with every consumer awake and leased again: still refused.
        for cache in rig.consumers:
            cache.thaw()
            assert cache.wait_leased(30)
            for t in forbidden:
                with pytest.raises(Unauthenticated):
                    cache.authenticate(raws[t])
    finally:
        stop.set()
        for hammer in hammers:
            hammer.join(timeout=30)
        for cache in rig.consumers:
            cache.thaw()


def _hammer(cache: LeaseCache, raws: list[str], stop: threading.Event) -> None:
    while not stop.is_set():
        for raw in raws:
            try:
                cache.authenticate(raw)
            except (Unauthenticated, RateLimited):
                pass  # refused is fine here; the property is about what is admitted
