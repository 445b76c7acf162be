"""WatchTokenEvents against hostile callers: what one verify token can take from everyone else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
import pytest
from conftest import RunningServer, bearer, make_config, start_server
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc
from tokenservice_client import LeaseCache, TokenServiceClient, Unauthenticated
from tokenservice_server import ratelimit
from tokenservice_server.config import Config
from tokenservice_server.grpc_api import WATCH_STREAM_BEHIND, WATCH_STREAMS_EXHAUSTED
from tokenservice_server.leases import MAX_UNSENT_EVENTS

LEASE = 0.5
PERMISSIONS = ["api_token:manage", "api_token:verify", "pass:read"]
# A client whose HTTP/2 window stays at its 64 KiB default: a server writing to
# a consumer that does not read blocks after a few thousand small events.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
def server_config(database_url: str) -> Config:
    return make_config(database_url, lease_seconds=LEASE, watch_streams_per_token=3)


@pytest.fixture
def email(ts: RunningServer) -> str:
    email = f"ops-{uuid.uuid4().hex[:8]}@acme.test"
    ts.add_user(email, "acme", PERMISSIONS)
    return email


@pytest.fixture
def manager(ts: RunningServer, email: str) -> Iterator[TokenServiceClient]:
    client = TokenServiceClient(ts.target, ts.mint(email, ["api_token:manage", "pass:read"]))
    try:
        yield client
    finally:
        client.close()


class Stream:
    """A raw WatchTokenEvents stream: the test decides what it sends and whether it reads."""

    def __init__(self, ts: RunningServer, token: str, options=(), timeout: float = 30) -> None:
        self.channel = grpc.insecure_channel(ts.target, options=list(options))
        self.outgoing: queue.SimpleQueue[pb.WatchTokenEventsRequest | None] = queue.SimpleQueue()
        self.call = pb_grpc.TokenServiceStub(self.channel).WatchTokenEvents(
            self._requests(), metadata=bearer(token), timeout=timeout
        )

    def _requests(self) -> Iterator[pb.WatchTokenEventsRequest]:
        while (item := self.outgoing.get()) is not None:
            yield item

    def send(self, request: pb.WatchTokenEventsRequest) -> None:
        self.outgoing.put(request)

    def renew(self, renew_id: int = 1) -> None:
        self.send(pb.WatchTokenEventsRequest(renew=pb.Renew(id=renew_id)))

    def ack(self, sequence: int) -> None:
        self.send(pb.WatchTokenEventsRequest(ack=pb.Ack(sequence=sequence)))

    def next(self) -> pb.TokenEvent:
        return next(self.call)

    def close(self) -> None:
        self.outgoing.put(None)
        self.call.cancel()
        self.channel.close()


def ended_with(stream: Stream) -> tuple[grpc.StatusCode, str]:
    """Reads the stream to its end: its status code and ErrorInfo reason ("" for none)."""
    with pytest.raises(grpc.RpcError) as caught:
        while True:
            stream.next()
    status = rpc_status.from_call(caught.value)
    reason = ""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
    return caught.value.code(), reason


def leased(stream: Stream) -> pb.TokenEvent:
    stream.renew()
    event = stream.next()
    assert event.HasField("lease")
    return event


def test_a_token_holds_a_bounded_number_of_streams_and_others_are_not_shut_out(
    ts: RunningServer, email: str
) -> None:
    hog, other = ts.mint(email, ["api_token:verify"]), ts.mint(email, ["api_token:verify"])
    streams = [Stream(ts, hog) for _ in range(3)]
    try:
        for stream in streams:
            leased(stream)
        refused = Stream(ts, hog)
        refused.renew()
        assert ended_with(refused) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       WATCH_STREAMS_EXHAUSTED)
        refused.close()
        bystander = Stream(ts, other)
        leased(bystander)  # another token's consumer still gets its stream
        bystander.close()
        streams.pop().close()  # a stream that ends gives its place back
        for _ in range(100):
            again = Stream(ts, hog)
            again.renew()
            try:
                again.next()
                break
            except grpc.RpcError:
                time.sleep(0.05)  # the server has not seen the cancel yet
            finally:
                again.close()
        else:
            raise AssertionError("an ended stream's place was never given back")
    finally:
        for stream in streams:
            stream.close()


async def _invalidations(ts: RunningServer, events: int, tokens: int) -> None:
    """Pushes `events` Invalidates naming `tokens` made-up ids each, as a burst of changes would."""
    ids = [str(uuid.uuid4()) for _ in range(tokens)]
    for _ in range(events):
        await ts.server.hub.invalidate(ids, [])


def _unsent(ts: RunningServer) -> list[int]:
    return [sub.outbox.qsize() for sub in list(ts.server.hub._subs)]


def test_a_renew_flood_that_never_reads_holds_no_growing_backlog(
    ts: RunningServer, email: str
) -> None:
    """Each Renew would be answered by a Lease: a consumer that floods them and reads
    nothing once made the server queue every Lease its window could not take."""
    stream = Stream(ts, ts.mint(email, ["api_token:verify"]), SMALL_WINDOW)
    try:
        sent = 30_000
        for i in range(sent):
            stream.renew(i + 1)
        hub = ts.server.hub
        for _ in range(200):  # until the server has read them all
            subs = list(hub._subs)
            if subs and subs[0].sequence and subs[0].outbox.leases:
                seen = subs[0].sequence
                time.sleep(0.2)
                if subs[0].sequence == seen:
                    break
            time.sleep(0.05)
        assert max(_unsent(ts)) <= 1, "leases pile up for a consumer that does not read"
    finally:
        stream.close()


def test_a_stream_that_leaves_its_events_unread_is_ended_and_told_why(
    ts: RunningServer, email: str
) -> None:
    """Changes keep coming to a consumer that stopped reading: the server once kept
    every one of them for it; now it ends the stream past MAX_UNSENT_EVENTS."""
    stream = Stream(ts, ts.mint(email, ["api_token:verify"]))
    try:
        leased(stream)  # subscribed; from now on it reads nothing (nor acks)
        sent = MAX_UNSENT_EVENTS + 10
        # One burst, faster than any write: all of it waits to be sent.
        ts.server._call(_invalidations(ts, sent, 10), 30)
        assert max(_unsent(ts), default=0) <= MAX_UNSENT_EVENTS + 1
        seen = 0
        with pytest.raises(grpc.RpcError) as caught:
            while True:
                stream.next()
                seen += 1
        assert seen < sent, "every event was kept for the consumer after all"
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(caught.value)
        assert status is not None
        reasons = set()
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reasons.add(info.reason)
        assert reasons == {WATCH_STREAM_BEHIND}
    finally:
        stream.close()


def test_a_watcher_whose_token_is_revoked_gets_nothing_more_even_without_renewing(
    ts: RunningServer, email: str, manager: TokenServiceClient
) -> None:
    """It once kept receiving every org's invalidations (and sending usage reports)
    until its next Renew, which a hostile watcher never sends."""
    own = ts.mint(email, ["api_token:verify"])
    own_id = ts.authenticate(own).token_id
    stream = Stream(ts, own)
    try:
        leased(stream)
        manager.revoke_token(own_id, timeout=30)
        first = stream.next()
        assert list(first.invalidate.token_ids) == [own_id]
        stream.ack(first.sequence)
        other = manager.create_token("other", ["pass:read"]).api_token.id
        manager.revoke_token(other, timeout=30)
        assert ended_with(stream)[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stream.close()


def test_a_watcher_whose_token_expires_is_ended_then(ts: RunningServer, email: str) -> None:
    soon = ts.mint(email, ["api_token:verify"], expires_at=datetime.now(UTC) + timedelta(seconds=1))
    stream = Stream(ts, soon, timeout=15)
    try:
        leased(stream)
        # No event names an expiring token: the stream ends by itself (before the
        # deadline, which would be DEADLINE_EXCEEDED).
        assert ended_with(stream)[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stream.close()


def test_a_consumer_that_renews_but_never_acks_gets_no_lease_past_the_change(
    ts: RunningServer, email: str, manager: TokenServiceClient
) -> None:
    """A change waits for each consumer's ack or for the lease it held when the
    Invalidate was sent. A consumer that keeps renewing without acking must not be
    granted a newer lease meanwhile: that lease would outlive the change's return."""
    doomed = manager.create_token("doomed", ["pass:read"])
    stream = Stream(ts, ts.mint(email, ["api_token:verify"]))
    try:
        leased(stream)
        revoked = threading.Thread(target=manager.revoke_token,
                                   args=(doomed.api_token.id,), kwargs={"timeout": 30})
        revoked.start()
        invalidate = stream.next()
        assert invalidate.WhichOneof("kind") == "invalidate"
        stream.renew(2)  # renews, acks nothing
        revoked.join(30)
        assert not revoked.is_alive()  # returned once the old lease ran out
        # Nothing was granted while the Invalidate stood unacked...
        events: queue.SimpleQueue[pb.TokenEvent] = queue.SimpleQueue()
        threading.Thread(target=lambda: events.put(stream.next()), daemon=True).start()
        with pytest.raises(queue.Empty):
            events.get(timeout=LEASE * 2)
        # ...and the Renew is answered as soon as it is acked.
        stream.ack(invalidate.sequence)
        lease = events.get(timeout=30)
        assert lease.WhichOneof("kind") == "lease" and lease.lease.renew_id == 2
    finally:
        stream.close()


def test_a_watcher_going_away_mid_write_logs_no_error(
    ts: RunningServer, email: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer cancelling while the server's write waits on its window is routine,
    not an ERROR with a traceback that any verify holder could produce at will."""
    token = ts.mint(email, ["api_token:verify"])

    async def flood_then_leave() -> None:
        async with grpc.aio.insecure_channel(ts.target, options=SMALL_WINDOW) as channel:
            call = pb_grpc.TokenServiceStub(channel).WatchTokenEvents(metadata=bearer(token))
            renew = pb.WatchTokenEventsRequest(renew=pb.Renew(id=1))
            until = time.monotonic() + 2.0  # well past what the window takes
            while time.monotonic() < until:
                for _ in range(500):
                    await call.write(renew)
            call.cancel()

    with caplog.at_level(logging.ERROR, logger="tokenservice"):
        asyncio.run(flood_then_leave())
        for _ in range(100):
            if not ts.server.hub.subscribers:
                break
            time.sleep(0.05)
        assert not ts.server.hub.subscribers
        time.sleep(0.5)  # the stream's handler logs after it has unsubscribed
    # The server's own log (grpc's client side in this process may log its own
    # cancellation noise through asyncio; that is not the server's doing).
    assert [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.startswith("tokenservice")] == []


def _report(real_id: str, junk: int) -> pb.WatchTokenEventsRequest:
    """One use of `real_id` among `junk` made-up ids, as a hostile watcher would send."""
    report = pb.UsageReport()
    for _ in range(junk):
        report.uses.add(token_id=str(uuid.uuid4()), count=2**62).last_used_at.GetCurrentTime()
    report.uses.add(token_id=real_id, count=1).last_used_at.GetCurrentTime()
    return pb.WatchTokenEventsRequest(usage=report)


def test_made_up_ids_in_usage_reports_are_kept_nowhere(
    ts: RunningServer, email: str, manager: TokenServiceClient
) -> None:
    """Each made-up id once went into the pending last_used_at writes (one UPDATE
    each at the next flush) and pushed real tokens' limits out of the kept ones."""
    real = manager.create_token("real", ["pass:read"])
    stream = Stream(ts, ts.mint(email, ["api_token:verify"]))
    service = ts.server.service
    try:
        leased(stream)
        report = _report(real.api_token.id, 1000)
        made_up = {u.token_id for u in report.usage.uses} - {real.api_token.id}
        stream.send(report)
        stream.renew(2)  # answered only after the report was applied
        assert stream.next().lease.renew_id == 2
        assert real.api_token.id in service._report_limits
        assert len(service._report_limits) == 1, "made-up ids were kept as limits"
        assert service.usage is not None
        with service.usage._lock:
            pending = dict(service.usage._pending)
        assert real.api_token.id in pending
        assert not made_up & set(pending), "made-up ids wait to be written as last used"
    finally:
        stream.close()


def test_a_flood_of_usage_reports_is_paced(
    ts: RunningServer, email: str, manager: TokenServiceClient
) -> None:
    """One watcher once had its reports applied as fast as it could send them (30 a
    second of 1,100 ids each: most of a core, and every other caller's Authenticate
    60 times slower). The pace is the caller token's, shared by every stream it
    holds: here three, each flooding. Each report counts one use of a token that
    promised this consumer 10,000; once the streams are gone and the rest of the
    promise has lapsed, the uses counted are the reports the server applied."""
    counter = manager.create_token("counter", ["pass:read"], rate_limit=(100_000, 100_000))
    watcher = ts.mint(email, ["api_token:verify"])
    streams = [Stream(ts, watcher) for _ in range(3)]  # the token's whole allowance
    try:
        for stream in streams:
            leased(stream)
        ask = (("tokenservice-cache-budget", "1"),)  # as a lease cache asks
        ts.stub.Authenticate(pb.AuthenticateRequest(token=counter.token), metadata=ask,
                             timeout=10)
        reports = 1000
        report = _report(counter.api_token.id, 1)
        start = time.monotonic()
        for _ in range(reports):
            for stream in streams:
                stream.send(report)
        time.sleep(1.0)
        elapsed = time.monotonic() - start
    finally:
        for stream in streams:
            stream.close()
    time.sleep(ratelimit.PROMISE_BUCKETS + 0.5)
    remaining = ts.authenticate(counter.token).rate_limit.remaining
    applied = 100_000 - 2 - remaining
    # One pace for the three: a burst of 10,000 entries, then 10,000 a second, each
    # report counting as 100 (and one report per stream that was being applied as
    # the streams went). Paced per stream, three times as many would be applied.
    allowed = (10_000 + 10_000 * elapsed) / 100 + 2 + len(streams)
    assert 0 < applied <= allowed, f"{applied} reports applied in {elapsed:.2f}s"


@pytest.mark.slow
def test_many_streams_that_never_ack_delay_a_revoke_by_one_lease_at_most(
    database_url: str,
) -> None:
    """The contract's bound with a crowd: 300 streams renewing their leases and
    acking nothing; a revoke still returns (within its deadline of a few leases)
    and an honest consumer beside them refuses the token at once."""
    ts = start_server(make_config(database_url, lease_seconds=LEASE))
    email = f"ops-{uuid.uuid4().hex[:8]}@acme.test"
    ts.add_user(email, "acme", PERMISSIONS)
    manager = TokenServiceClient(ts.target, ts.mint(email, PERMISSIONS))
    # Its own limit, high: each stream's opening counts as an Authenticate.
    hostile = manager.create_token("crowd", ["api_token:verify"], rate_limit=(10_000, 1)).token
    stop = threading.Event()

    async def crowd() -> None:
        channels = [grpc.aio.insecure_channel(ts.target, options=[
            ("grpc.use_local_subchannel_pool", 1)]) for _ in range(3)]

        async def one(channel: grpc.aio.Channel) -> None:
            renew_id = 0
            while not stop.is_set():  # a stream refused at first (bcrypt busy) tries again
                call = pb_grpc.TokenServiceStub(channel).WatchTokenEvents(
                    metadata=bearer(hostile))
                try:
                    while not stop.is_set():
                        renew_id += 1
                        await call.write(pb.WatchTokenEventsRequest(renew=pb.Renew(id=renew_id)))
                        await asyncio.sleep(LEASE / 3)
                except (grpc.RpcError, asyncio.InvalidStateError):
                    await asyncio.sleep(0.1)
                finally:
                    call.cancel()

        await asyncio.gather(*(one(channels[i % 3]) for i in range(300)),
                             return_exceptions=True)
        for channel in channels:
            await channel.close()

    runner = threading.Thread(target=asyncio.run, args=(crowd(),), daemon=True)
    runner.start()
    cache = LeaseCache(ts.target, ts.mint(email, ["api_token:verify"]))
    try:
        assert cache.wait_leased(LEASE * 4 + 5)
        for _ in range(400):
            if ts.server.hub.subscribers >= 301:
                break
            time.sleep(0.05)
        assert ts.server.hub.subscribers >= 301, ts.server.hub.subscribers
        doomed = manager.create_token("doomed", ["pass:read"])
        cache.authenticate(doomed.token)
        manager.revoke_token(doomed.api_token.id, timeout=LEASE * 4 + 5)
        with pytest.raises(Unauthenticated):
            cache.authenticate(doomed.token)
    finally:
        stop.set()
        runner.join(10)
        cache.close()
        manager.close()
        ts.channel.close()
        ts.server.stop(grace=1)


def test_a_change_of_this_process_reaches_its_consumers_once(ts: RunningServer, email: str) -> None:
    """The process making a change delivers it to its own consumers as it settles the
    call; its loop reading committed events may read the event first (between the
    commit and the settling) and must not push a second Invalidate. An event it did
    not make, even one given the id of its own rolled-back event, is delivered."""
    from tokenservice_server import narrowing

    server = ts.server
    stream = Stream(ts, ts.mint(email, ["api_token:verify"]))
    events: queue.SimpleQueue[pb.TokenEvent] = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                events.put(stream.next())
        except grpc.RpcError:
            pass

    def write(token_id: str, claim, rollback: bool = False) -> None:
        """A narrowing event, committed (or rolled back) as a call of a process would."""
        collecting = narrowing.collect([], claim)
        try:
            with server.store.connection(), server.store.db.atomic() as txn:
                server.store.narrowed(token_ids=[token_id])
                if rollback:
                    txn.rollback()
        finally:
            narrowing.stop(collecting)

    try:
        leased(stream)
        threading.Thread(target=read, daemon=True).start()
        # Ours, committed, never settled: only settling would deliver it.
        write("tok_ours", server.fanout.claim)
        with pytest.raises(queue.Empty):
            events.get(timeout=1.0)  # ten polls of the loop and more
        # Ours, rolled back (on SQLite its id goes to the next event); then another
        # process's, which this process must deliver.
        write("tok_gone", server.fanout.claim, rollback=True)
        write("tok_theirs", None)
        event = events.get(timeout=10)
        assert list(event.invalidate.token_ids) == ["tok_theirs"]
    finally:
        stream.close()


@contextlib.contextmanager
def narrowing_held_up(database_url: str) -> Iterator[None]:
    """Holds up every narrowing change's commit (the store's write lock on SQLite,
    its event lock on PostgreSQL) while the block runs, as another writer would."""
    if database_url.startswith("sqlite"):
        held = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        held.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            held.execute("COMMIT")
            held.close()
        return
    import psycopg2

    from tokenservice_server.db import postgres_params
    from tokenservice_server.store import EVENTS_LOCK

    held = psycopg2.connect(**postgres_params(database_url))
    held.autocommit = True
    try:
        held.cursor().execute("SELECT pg_advisory_lock(%s)", (EVENTS_LOCK,))
        yield
    finally:
        held.close()  # the session's lock goes with it


def test_a_revoke_whose_caller_gave_up_still_reaches_every_consumer(
    ts: RunningServer, email: str, manager: TokenServiceClient, database_url: str
) -> None:
    """A revoke that commits after its caller's deadline has passed answers
    DEADLINE_EXCEEDED, but the token is revoked: the consumers must still drop it,
    though nobody is left to wait for their acks."""
    doomed = manager.create_token("doomed", ["pass:read"])
    boss = ts.mint(email, ["api_token:manage", "pass:read"])
    stream = Stream(ts, ts.mint(email, ["api_token:verify"]))
    try:
        leased(stream)
        with narrowing_held_up(database_url):
            with pytest.raises(grpc.RpcError) as late:
                ts.stub.RevokeToken(pb.RevokeTokenRequest(id=doomed.api_token.id),
                                    metadata=bearer(boss), timeout=0.3)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.5)  # the call's worker still waits on the lock
        event = stream.next()  # the stream's own deadline bounds the wait
        assert event.WhichOneof("kind") == "invalidate"
        assert doomed.api_token.id in event.invalidate.token_ids
        assert manager.get_token(doomed.api_token.id).state == pb.ApiToken.REVOKED
    finally:
        stream.close()
