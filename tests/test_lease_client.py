"""The consumer's lease state alone, on a fake clock: when an answer may be used and when kept.

The races these pin (an answer fetched before an Invalidate, stored after it)
are too narrow to hit reliably through a real server; the real-server tests
are in test_lease_cache.py.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice_client import Principal
from tokenservice_client.lease import _LeaseState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def principal(token_id: str = "t1", user_id: str = "u1", expires_at=None) -> Principal:
    return Principal(token_id, user_id, f"{user_id}@acme.test", "acme", frozenset({"pass:read"}),
                     expires_at)


def lease_event(sequence: int, renew_id: int, seconds: float) -> pb.TokenEvent:
    event = pb.TokenEvent(sequence=sequence, lease=pb.Lease(renew_id=renew_id))
    event.lease.duration.FromNanoseconds(int(seconds * 1e9))
    return event


def invalidate(sequence: int, tokens=(), users=()) -> pb.TokenEvent:
    return pb.TokenEvent(sequence=sequence,
                         invalidate=pb.Invalidate(token_ids=tokens, user_ids=users))


def leased(clock: Clock, seconds: float = 2.0) -> _LeaseState:
    state = _LeaseState(100, clock)
    renew = state._renew()
    clock.now += 0.1  # the reply comes later than the Renew was sent
    state._apply(lease_event(1, renew.renew.id, seconds))
    return state


def test_a_lease_counts_from_when_the_renew_was_sent() -> None:
    clock = Clock()
    state = leased(clock)  # sent at 100.0, answered at 100.1, 2 s
    state.put("raw", principal(), state.ticket())
    clock.now = 101.99
    assert state.get("raw") is not None
    clock.now = 102.0
    assert state.get("raw") is None, "used past the send time plus the lease"


def test_without_a_lease_nothing_is_answered_or_kept() -> None:
    clock = Clock()
    state = _LeaseState(100, clock)
    assert state.ticket() is None
    state.put("raw", principal(), state.ticket())
    assert state.get("raw") is None and len(state) == 0


def test_an_answer_fetched_before_an_invalidate_is_not_kept_after_it() -> None:
    clock = Clock()
    state = leased(clock)
    ticket = state.ticket()  # the Authenticate call starts ...
    ack = state._apply(invalidate(2, tokens=["other"]))  # ... any Invalidate lands meanwhile ...
    assert ack is not None and ack.ack.sequence == 2
    state.put("raw", principal(), ticket)  # ... and its answer comes back
    assert state.get("raw") is None


def test_an_answer_fetched_before_the_stream_was_lost_is_not_kept() -> None:
    clock = Clock()
    state = leased(clock)
    ticket = state.ticket()
    state._lost()
    renew = state._renew()
    state._apply(lease_event(1, renew.renew.id, 2.0))  # reconnected, leased again
    state.put("raw", principal(), ticket)
    assert state.get("raw") is None


def test_a_lease_that_lapsed_before_the_next_drops_everything() -> None:
    clock = Clock()
    state = leased(clock)
    state.put("raw", principal(), state.ticket())
    renew = state._renew()
    clock.now += 5  # the reply comes after the lease ran out
    state._apply(lease_event(2, renew.renew.id, 2.0))
    assert state.get("raw") is None and len(state) == 0


def test_invalidate_drops_the_tokens_and_every_token_of_the_users() -> None:
    clock = Clock()
    state = leased(clock)
    for raw, p in (("a", principal("t1", "u1")), ("b", principal("t2", "u1")),
                   ("c", principal("t3", "u2")), ("d", principal("t4", "u3"))):
        state.put(raw, p, state.ticket())
    state._apply(invalidate(2, tokens=["t3"], users=["u1"]))
    assert [state.get(r) is not None for r in "abcd"] == [False, False, False, True]


def test_expiry_is_honoured_and_size_is_bounded() -> None:
    clock = Clock()
    state = leased(clock)
    past = datetime.now(UTC) - timedelta(seconds=1)
    state.put("old", principal("t1", expires_at=past), state.ticket())
    assert state.get("old") is None
    small = _LeaseState(2, clock)
    small._apply(lease_event(1, small._renew().renew.id, 2.0))
    for i in range(3):
        small.put(f"r{i}", principal(f"t{i}"), small.ticket())
    assert len(small) == 2 and small.get("r0") is None and small.get("r2") is not None


def test_hits_are_reported_as_uses_once() -> None:
    clock = Clock()
    state = leased(clock)
    state.put("raw", principal("t1"), state.ticket())
    for _ in range(3):
        state.get("raw")
    (report,) = state._usage()
    assert [(u.token_id, u.count) for u in report.usage.uses] == [("t1", 3)]
    assert state._usage() == []


def test_a_lease_longer_than_the_protocol_allows_is_cut_to_five_seconds() -> None:
    """A broken or impostor server granting an hour must not keep answers that long."""
    clock = Clock()
    state = _LeaseState(10, clock)
    state._apply(lease_event(1, state._renew().renew.id, 3600.0))
    state.put("raw", principal("t1"), state.ticket())
    clock.now += 4.9
    assert state.get("raw") is not None
    clock.now += 0.2
    assert not state.leased and state.get("raw") is None


def test_renewals_a_server_never_answers_are_not_kept_forever() -> None:
    state = _LeaseState(10, Clock())
    for _ in range(10_000):
        state._renew()
    assert len(state._renews_sent) <= 64


def test_uses_of_many_tokens_go_out_in_reports_the_server_accepts() -> None:
    """One report for every token answered in a second once passed the server's
    64 KiB request limit past ~1,100 tokens: the server refused it, the stream
    broke, the cache was dropped and the uses were lost, every second."""
    clock = Clock()
    state = leased(clock)
    state._max_entries = 10_000
    ids = [str(uuid.uuid4()) for _ in range(3000)]
    for i in range(len(ids)):
        state.put(f"raw{i}", principal(ids[i], f"u{i}"), state.ticket())
        assert state.get(f"raw{i}") is not None
    reports = state._usage()
    assert all(r.ByteSize() < 65536 for r in reports)
    assert sorted(u.token_id for r in reports for u in r.usage.uses) == sorted(ids)
