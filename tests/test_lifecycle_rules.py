"""Lifecycle rules that depend on time, on the rules alone with a clock the test moves."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tokenservice_server.config import Config
from tokenservice_server.crypto import BcryptHasher
from tokenservice_server.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from tokenservice_server.migrations import open_migrated
from tokenservice_server.scopes import ScopeCatalog
from tokenservice_server.service import MAX_GRACE_US, TokenService
from tokenservice_server.store import Store
from tokenservice_server.values import DAY_MICROS, Principal, TokenState, from_micros

START = 1_800_000_000_000_000  # micros: 2027-01-15


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1_000_000)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[TokenService, Clock, Principal]]:
    store = Store(open_migrated(f"sqlite:///{tmp_path}/rules.db"))
    clock = Clock()
    service = TokenService(Config(bcrypt_rounds=4), store, ScopeCatalog.default(),
                           BcryptHasher(rounds=4, slots=2, max_waiting=8), clock=clock)
    with store.connection():
        service.add_user("ann@acme.test", "acme",
                         ["api_token:manage", "api_token:admin", "pass:read"])
        raw = service.mint_for_email("ann@acme.test", "boot",
                                     ["api_token:manage", "api_token:admin", "pass:read"], None)
        yield service, clock, service.authenticate(raw.raw, "192.0.2.1")
    store.close()


def test_state_moves_with_time_alone(world) -> None:
    service, clock, ann = world
    made = service.create_token(ann, "t", ["pass:read"], from_micros(START + 60_000_000))
    assert made.info.state is TokenState.ACTIVE
    clock.advance(60)
    assert service.get_token(ann, made.info.id).state is TokenState.EXPIRED
    page = service.list_tokens(ann, 0, "", state=TokenState.EXPIRED)
    assert [t.id for t in page.tokens] == [made.info.id]


def test_the_grace_ends_exactly_when_promised(world) -> None:
    service, clock, ann = world
    made = service.create_token(ann, "t", ["pass:read"], None)
    rotated = service.rotate_token(ann, made.info.id, 3600 * 1_000_000)
    assert rotated.previous.expires_at == from_micros(START + 3600 * 1_000_000)
    clock.advance(3599)
    assert service.authenticate(made.raw).token_id == made.info.id
    clock.advance(1)
    with pytest.raises(Unauthenticated):
        service.authenticate(made.raw)
    assert service.authenticate(rotated.raw).token_id == rotated.info.id


def test_grace_bounds_are_inclusive(world) -> None:
    service, _, ann = world
    for grace in (-1, MAX_GRACE_US + 1):
        made = service.create_token(ann, "t", ["pass:read"], None)
        with pytest.raises(InvalidArgument) as caught:
            service.rotate_token(ann, made.info.id, grace)
        assert [f for f, _ in caught.value.violations] == ["grace_period"]
    made = service.create_token(ann, "t", ["pass:read"], None)
    week = service.rotate_token(ann, made.info.id, MAX_GRACE_US)
    assert week.previous.expires_at == from_micros(START + 7 * DAY_MICROS)
    with pytest.raises(FailedPrecondition):
        service.rotate_token(ann, made.info.id, 0)


def test_reuse_is_recorded_at_most_once_a_minute_per_token(world) -> None:
    service, clock, ann = world
    made = service.create_token(ann, "t", ["pass:read"], None)
    service.rotate_token(ann, made.info.id, 0)

    def reuses() -> int:
        page = service.list_audit_events(ann, 0, "", action="token.reuse_after_rotation")
        return len(page.events)

    for _ in range(5):
        with pytest.raises(Unauthenticated):
            service.authenticate(made.raw, "198.51.100.9")
    assert reuses() == 1
    clock.advance(59)
    with pytest.raises(Unauthenticated):
        service.authenticate(made.raw, "198.51.100.9")
    assert reuses() == 1
    clock.advance(1)
    with pytest.raises(Unauthenticated):
        service.authenticate(made.raw, "198.51.100.9")
    assert reuses() == 2
    # Another process (an empty in-memory gate) still writes once: the store decides.
    service._reuse_seen.clear()
    with pytest.raises(Unauthenticated):
        service.authenticate(made.raw, "198.51.100.9")
    assert reuses() == 2


def test_retention_prunes_by_age_in_batches(world) -> None:
    service, clock, ann = world
    for i in range(7):
        service.create_token(ann, f"t{i}", ["pass:read"], None)
    clock.advance(timedelta(days=10).total_seconds())
    service.create_token(ann, "fresh", ["pass:read"], None)
    assert service.prune_audit(retention_days=30) == 0
    pruned = [service.prune_audit(retention_days=5, batch=3) for _ in range(4)]
    assert pruned == [3, 3, 3, 0]  # seven creates and the two user/boot events before
    left = service.list_audit_events(ann, 0, "").events
    assert [e.details["name"] for e in left] == ["fresh"]
