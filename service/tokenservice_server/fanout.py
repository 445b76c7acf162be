"""Narrowing changes across processes and replicas: heartbeats, event polling, acks, settling.

Every server process runs a `Fanout` on its event loop. It:

- reads the store's new token events (every POLL seconds, or at once when
  PostgreSQL NOTIFYs one, or Redis pub/sub says so where replicas share a
  Redis: wakeups.py) and hands each to its LeaseHub, then records its ack
  once the hub's consumers have applied it (or their leases ran out);
- while it has watching consumers, records every HEARTBEAT seconds how long
  the leases it grants may hold (`lease_replicas.lease_until`, on the store's
  clock), and only then lets the hub grant up to that time;
- settles the narrowing changes of its own calls (`settle`): its own
  consumers through the hub directly, every other process by waiting for
  their acks in the store.

An origin waits for another process only if that process's lease_until lies
after the event's time and the process was already reading events then; it
stops waiting when the ack is there, or when that lease_until has passed with
no heartbeat moving it on (the process is gone: at most one lease). A process
whose store reads fail stops heartbeating, so its consumers' leases run out
instead of outliving a change it cannot see. The whole wait is capped at
SETTLE_CAP_SECONDS with a warning: past that, a process that heartbeats but
does not ack is broken, and a narrowing call must still return.

Nothing here holds a transaction or a thread while it waits: the store calls
are short, on a thread of their own, and the waiting is on the event loop.
`settle_blocking` is the same wait for the command line, which has no loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

from . import metrics
from .config import MAX_LEASE_SECONDS
from .errors import Unavailable
from .leases import LeaseHub
from .store import ACKS_CHANNEL, EVENTS_CHANNEL, Store
from .values import Narrowed
from .wakeups import ACKS, EVENTS, RedisWakeups

log = logging.getLogger("tokenservice.fanout")

T = TypeVar("T")

# How often a process with watching consumers records how long its leases may
# hold: at most a quarter of a lease, so a renewal always finds room to grant.
HEARTBEAT_SECONDS = 0.5
# SQLite is only polled; PostgreSQL wakes us with NOTIFY, and polling catches
# what a lost LISTEN connection missed.
POLL_SECONDS_SQLITE = 0.05
POLL_SECONDS_POSTGRES = 0.1
SETTLE_POLL_SECONDS = 0.01
# A process that heartbeats but never acks is waited for no longer than this.
SETTLE_CAP_SECONDS = 2 * MAX_LEASE_SECONDS + 1.0
PRUNE_EVERY_SECONDS = 30.0
KEEP_EVENTS_SECONDS = 600.0
PRUNE_BATCH = 1000
EVENTS_PER_READ = 500
# An event one of our calls claimed, committed, and never settled (the call was
# cancelled by its deadline after the commit) is delivered by the loop once it
# has waited this long since the claim: late, never lost. A call that settles
# as usual does so within milliseconds of its commit.
ORPHAN_SECONDS = 1.0


class Fanout:
    """One per server process; `start()` and everything after run on the server's loop."""

    def __init__(
        self,
        store: Store,
        hub: LeaseHub,
        lease_seconds: float,
        blocking: Executor | None = None,
        wakeups: RedisWakeups | None = None,
    ) -> None:
        self.store = store
        self.wakeups = wakeups
        self.hub = hub
        self.replica_id = str(uuid.uuid4())
        self._lease_seconds = lease_seconds
        self._heartbeat = min(HEARTBEAT_SECONDS, lease_seconds / 4)
        self._blocking = blocking
        self._poll = POLL_SECONDS_SQLITE if store.inline_reads else POLL_SECONDS_POSTGRES
        # The store calls of the loop below, on one thread with one connection.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease-sync")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._acks_seen: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._listener_thread: threading.Thread | None = None
        self._redis_thread: threading.Thread | None = None
        self._watch_from: int | None = None
        self._last_seen = 0
        # Events of our own calls: claimed from the calls' threads before they
        # commit (so under a lock), then delivered by settle(). Keyed with the time
        # written: on SQLite a rolled-back event's id is given to the next event
        # written, which may be another process's, and that one is ours to deliver.
        self._claims: dict[tuple[int, int], float] = {}  # not settled yet: when claimed
        self._settled: set[tuple[int, int]] = set()  # settled, maybe not read yet
        # Read by the loop while claimed and not yet settled: delivered here if no
        # settle() comes for them within ORPHAN_SECONDS of the claim.
        self._orphans: dict[tuple[int, int], Narrowed] = {}
        self._local_lock = threading.Lock()
        self._to_ack: list[int] = []
        self._deliveries: set[asyncio.Task[None]] = set()
        self._granted_from = -1e18  # loop time of the last heartbeat recorded

    # Lifecycle.

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._acks_seen = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="token-events")
        if not self.store.inline_reads:
            self._listener_thread = threading.Thread(
                target=self._listen, name="token-events-listen", daemon=True
            )
            self._listener_thread.start()
        if self.wakeups is not None:
            self._redis_thread = threading.Thread(
                target=self.wakeups.listen, args=(self._notified, self._stopping),
                name="token-events-redis", daemon=True,
            )
            self._redis_thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for task in list(self._deliveries):
            task.cancel()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self.store.close)
        self._pool.shutdown(wait=True)
        for thread in (self._listener_thread, self._redis_thread):
            if thread is not None:
                await loop.run_in_executor(None, thread.join, 5)
        if self.wakeups is not None:
            self.wakeups.close()

    def wake(self) -> None:
        """Run the loop now (a renewal waits for a heartbeat); from the loop's thread."""
        if self._wake is not None:
            self._wake.set()

    # Settling our own calls' changes.

    def claim(self, event: Narrowed) -> None:
        """An event of one of our calls, not yet committed: settle() delivers it, not the loop.

        From any thread; called before the event's transaction commits, so the loop
        cannot read it first and push a second Invalidate to our consumers.
        """
        with self._local_lock:
            self._claims[(event.event_id, event.created_at)] = time.monotonic()

    async def settle(self, events: Sequence[Narrowed]) -> None:
        """Returns once every consumer of every process has applied these events
        or its lease has run out (or, for a process that heartbeats but never
        acks, after SETTLE_CAP_SECONDS)."""
        if not events:
            return
        with self._local_lock:
            for event in events:
                key = (event.event_id, event.created_at)
                self._claims.pop(key, None)
                self._orphans.pop(key, None)
                self._settled.add(key)
        tokens = sorted({t for e in events for t in e.token_ids})
        users = sorted({u for e in events for u in e.user_ids})
        await asyncio.gather(
            self.hub.invalidate(tokens, users),
            self._publish(EVENTS),
            self._await_others([e.event_id for e in events]),
        )

    async def _publish(self, channel: str) -> None:
        """Wakes the other processes through Redis, when there is one (off the loop)."""
        if self.wakeups is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.wakeups.publish, channel)

    async def _await_others(self, event_ids: list[int]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_CAP_SECONDS
        pending = set(event_ids)
        while True:
            try:
                pending = await loop.run_in_executor(
                    self._blocking, self._unsettled, sorted(pending)
                )
            except Unavailable:
                pass  # cannot tell: keep waiting, within the cap
            if not pending:
                return
            if loop.time() >= deadline:
                log.warning("gave up waiting for replicas to acknowledge token events",
                            extra={"events": sorted(pending)})
                metrics.narrowing_wait_capped()
                return
            seen = self._acks_seen
            assert seen is not None
            try:
                await asyncio.wait_for(seen.wait(), SETTLE_POLL_SECONDS)
            except TimeoutError:
                pass

    def _unsettled(self, event_ids: list[int]) -> set[int]:
        with self.store.connection():
            return self.store.unsettled(event_ids, self.replica_id)

    # The loop: read events, heartbeat, ack, prune.

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        def call() -> T:
            with self.store.connection():
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        last_prune = loop.time()
        failures = 0
        while True:
            try:
                await self._tick(loop)
                if loop.time() - last_prune >= PRUNE_EVERY_SECONDS:
                    last_prune = loop.time()
                    await self._prune()
                if failures:
                    log.info("token events readable again")
                failures = 0
            except Unavailable:
                if failures == 0:
                    log.warning("cannot read token events; consumers' leases will run out")
                failures += 1
            except Exception:
                log.error("token events loop failed", exc_info=True)
                failures += 1
            poll = min(self._poll, self._heartbeat)
            delay = poll if failures == 0 else min(1.0, poll * 2**failures)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        store = self.store
        if self._watch_from is None:
            # Events before now predate every lease this process will grant.
            self._watch_from = self._last_seen = await self._db(store.last_event_id)
        events = await self._db(store.events_after, self._last_seen, EVENTS_PER_READ)
        deliver: list[Narrowed] = []
        with self._local_lock:
            for event in events:
                self._last_seen = event.event_id
                key = (event.event_id, event.created_at)
                if key in self._settled:
                    self._settled.discard(key)
                elif key in self._claims:
                    self._orphans[key] = event  # settle() is on its way, or never comes
                else:
                    deliver.append(event)
            if events:
                # Claims the loop has read past without finding: rolled back.
                self._claims = {k: at for k, at in self._claims.items()
                                if k[0] > self._last_seen or k in self._orphans}
                self._settled = {k for k in self._settled if k[0] > self._last_seen}
            if self._orphans:
                late = time.monotonic() - ORPHAN_SECONDS
                for key in [k for k in self._orphans if self._claims.get(k, late) <= late]:
                    self._claims.pop(key, None)
                    deliver.append(self._orphans.pop(key))
        for event in deliver:
            task = asyncio.create_task(self._deliver(event))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        if len(events) == EVENTS_PER_READ:
            self.wake()  # more to read
        # Only after a successful read: a process that cannot see new events
        # must let its leases run out.
        now = loop.time()
        if self.hub.subscribers and (
            now - self._granted_from >= self._heartbeat or self.hub.wants_grant
        ):
            started = loop.time()
            lease_us = int(self._lease_seconds * 1_000_000)
            await self._db(store.heartbeat, self.replica_id, self._watch_from, lease_us)
            self._granted_from = started
            self.hub.extend_grants(started + self._lease_seconds)
        if self._to_ack:
            acks, self._to_ack = self._to_ack, []
            try:
                await self._db(store.add_acks, self.replica_id, acks)
            except Exception:
                self._to_ack = acks + self._to_ack
                raise
            await self._publish(ACKS)

    async def _deliver(self, event: Narrowed) -> None:
        await self.hub.invalidate(event.token_ids, event.user_ids)
        loop = asyncio.get_running_loop()
        # Nobody waits for our ack once our recorded lease_until has passed (a
        # margin of seconds: the store's clock may be another machine's).
        if loop.time() < self._granted_from + self._lease_seconds + 10.0:
            self._to_ack.append(event.event_id)
            self.wake()

    async def _prune(self) -> None:
        older = await self._db(self.store.clock_micros) - int(KEEP_EVENTS_SECONDS * 1_000_000)
        while await self._db(self.store.prune_events, older, PRUNE_BATCH) == PRUNE_BATCH:
            await asyncio.sleep(0.05)  # small batches, with room for others in between

    # PostgreSQL LISTEN, on a thread of its own.

    def _listen(self) -> None:
        listener = self.store.listener()
        assert listener is not None and self._loop is not None
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                channels = listener.wait(0.5)
                backoff = 0.1
            except Unavailable:
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for channel in channels:
                self._notified(channel)
        listener.close()

    def _notified(self, channel: str) -> None:
        """From a listener's thread: PostgreSQL's or Redis's channel said something happened."""
        loop = self._loop
        if loop is None:
            return
        try:
            if channel in (EVENTS_CHANNEL, EVENTS):
                loop.call_soon_threadsafe(self.wake)
            elif channel in (ACKS_CHANNEL, ACKS):
                loop.call_soon_threadsafe(self._acks_arrived)
        except RuntimeError:  # the loop is closed: we are stopping
            pass

    def _acks_arrived(self) -> None:
        """Wakes every settle() waiting now; later waiters get a fresh event."""
        if self._acks_seen is not None:
            self._acks_seen.set()
            self._acks_seen = asyncio.Event()


def settle_blocking(store: Store, events: Sequence[Narrowed],
                    wakeups: RedisWakeups | None = None) -> None:
    """settle() for a process without watching consumers (the command line): blocks."""
    if not events:
        return
    if wakeups is not None:
        wakeups.publish(EVENTS)
    ids = [e.event_id for e in events]
    deadline = time.monotonic() + SETTLE_CAP_SECONDS
    while True:
        try:
            with store.connection():
                pending = store.unsettled(ids, None)
        except Unavailable:
            pending = set(ids)
        if not pending:
            return
        if time.monotonic() >= deadline:
            log.warning("gave up waiting for replicas to acknowledge token events",
                        extra={"events": sorted(pending)})
            return
        ids = sorted(pending)
        time.sleep(SETTLE_POLL_SECONDS)
