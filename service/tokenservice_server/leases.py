"""Leases and invalidations for consumers watching token events: pure asyncio, on one loop.

Each WatchTokenEvents stream is a `Subscriber`. A consumer may answer from its
cache only while it holds a lease; the hub grants one for each Renew and
remembers each subscriber's `bound`, the loop time its latest lease ends by
(the consumer's own window ends earlier: it counts from when it sent the
Renew, the hub from when it received it).

`invalidate()` pushes an Invalidate to every subscriber, then waits until each
subscriber that held a lease has acknowledged it or the bound its lease had
when the Invalidate was pushed has passed. A consumer applies events in stream
order, so a Lease pushed later cannot let it use an answer the Invalidate
dropped. A stream that ends is still waited for until its bound: the consumer
may not have noticed yet, and keeps its cache until its lease runs out.

A consumer that does not read what it is sent cannot make the server hold
more of it than MAX_UNSENT_EVENTS: past that its stream ends (`behind`), and
it is waited for like an ended stream, until its bound. A Renew that arrives
while the Lease answering an earlier one is still unsent gets no Lease of its
own: the queued one counts from an earlier Renew, so the consumer's window it
opens is shorter, never longer. A Renew flood then costs the server nothing
it keeps.

The hub never grants past `grant_until`, which the process moves forward only
after the store has recorded that this process's leases may hold that long
(fanout.py): an origin on another replica then knows how long to wait for us.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# A grant shorter than this is not worth sending: the renewal waits for the
# next heartbeat instead.
MIN_GRANT_SECONDS = 0.05
# Events a stream may have waiting to be sent (its consumer is not reading them)
# before the stream ends: a burst of narrowing changes from another replica
# (500 per read) fits several times over, a consumer that stopped reading does not.
MAX_UNSENT_EVENTS = 4096


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    sequence: int
    renew_id: int
    duration: float  # seconds


@dataclass(frozen=True, slots=True)
class Invalidation:
    sequence: int
    token_ids: tuple[str, ...]
    user_ids: tuple[str, ...]


Event = LeaseGranted | Invalidation

# Usage reports, per caller token (shared by all the streams it holds on one
# process, so opening more streams buys no more): entries a second, and what a
# report costs at least (so a flood of tiny reports is paced too). A consumer
# reports each token it answered once a second: 10,000 distinct tokens a
# second for the consumers sharing one verify token is far above any real one.
REPORT_USES_PER_SECOND = 10_000.0
REPORT_MIN_COST = 100


class ReportPace:
    """Usage reports beyond REPORT_USES_PER_SECOND wait: the stream's reader
    sleeps, so HTTP/2 flow control holds the sender back and nothing is lost."""

    def __init__(self, clock: Callable[[], float], per_second: float = REPORT_USES_PER_SECOND,
                 burst: float = REPORT_USES_PER_SECOND) -> None:
        self._clock = clock
        self._rate = per_second
        self._burst = burst
        self._tokens = burst
        self._at = clock()

    def delay(self, entries: int) -> float:
        """Seconds to wait before applying a report of `entries` uses (0: at once)."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        self._tokens -= max(entries, REPORT_MIN_COST)
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def rested(self) -> bool:
        """Back to its full burst: forgetting it now gives nobody anything."""
        return self._tokens + (self._clock() - self._at) * self._rate >= self._burst


class _Barrier:
    """Done once each pending subscriber has acked, or its bound has passed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pending: dict[Subscriber, float]) -> None:
        self._loop = loop
        self.pending = pending
        self.done: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def release(self, sub: Subscriber) -> None:
        if self.pending.pop(sub, None) is not None and not self.pending:
            self._finish()

    def _arm(self) -> None:
        if not self.pending:
            self._finish()
            return
        self._timer = self._loop.call_at(min(self.pending.values()), self._expire)

    def _expire(self) -> None:
        now = self._loop.time()
        for sub, bound in list(self.pending.items()):
            if bound <= now:
                del self.pending[sub]
        self._arm()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.done.done():
            self.done.set_result(None)


class _Outbox(asyncio.Queue["Event | None"]):
    """A subscriber's unsent events; knows whether a Lease is among them (as
    PriorityQueue does, through the Queue's own _put/_get hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.leases = 0

    def _put(self, item: Event | None) -> None:
        if isinstance(item, LeaseGranted):
            self.leases += 1
        super()._put(item)

    def _get(self) -> Event | None:
        item = super()._get()
        if isinstance(item, LeaseGranted):
            self.leases -= 1
        return item


class Subscriber:
    """One watching consumer: its outbox, its sequence numbers, its acks and its lease."""

    def __init__(self, hub: LeaseHub, owner: str | None, pace: ReportPace) -> None:
        self._hub = hub
        self.owner = owner  # the caller's token: streams are counted per token
        self.pace = pace  # its usage reports' pace, shared with the owner's other streams
        self.outbox = _Outbox()
        self.sequence = 0  # the last event pushed
        self.acked = 0  # the last event the consumer says it applied
        self.bound = 0.0  # loop time the latest lease granted ends by
        self.closed = False
        # The outbox overflowed: the stream ends, and can no longer ack.
        self.behind = False
        self._barriers: list[tuple[int, _Barrier]] = []
        # The last Invalidate pushed: until it is acked, a Renew gets no Lease (the
        # change's wait is bounded by the lease the consumer held when it was
        # sent; a new one granted before the ack would outlive that bound).
        self.invalidated = 0
        self._deferred_renew: int | None = None

    def renew(self, renew_id: int) -> None:
        self._hub.renew(self, renew_id)

    def ack(self, sequence: int) -> None:
        """Every event up to `sequence` is applied (a sequence never pushed counts as the last)."""
        sequence = min(sequence, self.sequence)
        if sequence <= self.acked:
            return
        self.acked = sequence
        keep = []
        for seq, barrier in self._barriers:
            if seq <= sequence:
                barrier.release(self)
            elif not barrier.done.done():
                keep.append((seq, barrier))
        self._barriers = keep
        if self._deferred_renew is not None and self.acked >= self.invalidated:
            renew_id, self._deferred_renew = self._deferred_renew, None
            self._hub.renew(self, renew_id)

    async def next_event(self) -> Event | None:
        """The next event to send; None when the stream is to end."""
        return await self.outbox.get()

    def _room(self) -> bool:
        """False once the consumer has left MAX_UNSENT_EVENTS unread: the stream ends."""
        if self.behind:
            return False
        if self.outbox.qsize() >= MAX_UNSENT_EVENTS:
            self.behind = True
            self.outbox.put_nowait(None)
            return False
        return True

    def _push_lease(self, renew_id: int, duration: float) -> None:
        self.sequence += 1
        self.outbox.put_nowait(LeaseGranted(self.sequence, renew_id, duration))

    def _push_invalidation(
        self, token_ids: tuple[str, ...], user_ids: tuple[str, ...]
    ) -> int | None:
        """The event's sequence; None when the stream fell behind and ends instead."""
        if not self._room():
            return None
        self.sequence += 1
        self.invalidated = self.sequence
        self.outbox.put_nowait(Invalidation(self.sequence, token_ids, user_ids))
        return self.sequence

    def _wait_on(self, sequence: int, barrier: _Barrier) -> None:
        self._barriers = [(s, b) for s, b in self._barriers if not b.done.done()]
        self._barriers.append((sequence, barrier))


class LeaseHub:
    """Every subscriber of this process; used from the event loop's thread only."""

    def __init__(
        self,
        lease_seconds: float,
        needs_grant: Callable[[], None] | None = None,
        on_count: Callable[[int], None] | None = None,
        max_per_owner: int | None = None,
    ) -> None:
        self.lease_seconds = lease_seconds
        # Streams one caller token may hold open on this process (None: any number).
        self._max_per_owner = max_per_owner
        self._per_owner: dict[str, int] = {}
        # Per owner, while it holds a stream and until its pace has rested after
        # (so closing and reopening streams buys no fresh burst).
        self._paces: dict[str, ReportPace] = {}
        self._needs_grant = needs_grant
        self._on_count = on_count  # told the number of subscribers when it changes
        self._subs: set[Subscriber] = set()
        # Ended streams whose last lease may not have run out yet.
        self._lingering: list[Subscriber] = []
        self._waiting_grant: dict[Subscriber, int] = {}
        self._grant_until = 0.0

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def wants_grant(self) -> bool:
        """A renewal waits for the store to record a longer lease for this process."""
        return bool(self._waiting_grant)

    def subscribe(self, owner: str | None = None) -> Subscriber | None:
        """A new stream of `owner`'s; None when owner already holds max_per_owner."""
        if owner is not None:
            held = self._per_owner.get(owner, 0)
            if self._max_per_owner is not None and held >= self._max_per_owner:
                return None
            self._per_owner[owner] = held + 1
            pace = self._paces.get(owner)
            if pace is None:
                if len(self._paces) > 2 * len(self._per_owner) + 64:
                    self._forget_rested_paces()
                pace = self._paces[owner] = ReportPace(time.monotonic)
        else:
            pace = ReportPace(time.monotonic)
        sub = Subscriber(self, owner, pace)
        self._subs.add(sub)
        if self._on_count is not None:
            self._on_count(len(self._subs))
        return sub

    def _forget_rested_paces(self) -> None:
        """Drops the paces of owners with no stream left whose pace has rested."""
        self._paces = {
            owner: pace for owner, pace in self._paces.items()
            if owner in self._per_owner or not pace.rested()
        }

    def unsubscribe(self, sub: Subscriber, dropped: bool = False) -> None:
        """The stream ended. Its lease still holds until its bound, unless the
        consumer ended it itself (`dropped`): it does so only after dropping
        its cache, so nothing need wait for it any more."""
        if sub.closed:
            return
        sub.closed = True
        self._subs.discard(sub)
        if sub.owner is not None:
            held = self._per_owner.pop(sub.owner, 1) - 1
            if held > 0:
                self._per_owner[sub.owner] = held
        self._waiting_grant.pop(sub, None)
        if self._on_count is not None:
            self._on_count(len(self._subs))
        if dropped:
            for _, barrier in sub._barriers:
                barrier.release(sub)
            sub._barriers = []
        elif sub.bound > self._now():
            self._lingering.append(sub)

    def close_all(self) -> None:
        """Ends every stream (at shutdown): each consumer drops its cache and reconnects."""
        for sub in list(self._subs):
            sub.outbox.put_nowait(None)

    def max_bound(self) -> float:
        """The loop time the last lease granted by this process ends by (0: none)."""
        subs = [*self._subs, *self._lingering]
        return max((s.bound for s in subs), default=0.0)

    def extend_grants(self, until: float) -> None:
        """Leases may now end as late as `until` (loop time): the store says so."""
        if until > self._grant_until:
            self._grant_until = until
        waiting, self._waiting_grant = self._waiting_grant, {}
        for sub, renew_id in waiting.items():
            self.renew(sub, renew_id)

    def renew(self, sub: Subscriber, renew_id: int) -> None:
        if sub.closed or sub.outbox.leases or not sub._room():
            return  # a Lease is on its way (see the module's docstring), or the stream ends
        if sub.invalidated > sub.acked:
            sub._deferred_renew = renew_id  # granted once the Invalidate is acked
            return
        now = self._now()
        duration = min(self.lease_seconds, self._grant_until - now)
        if duration < MIN_GRANT_SECONDS:
            self._waiting_grant[sub] = renew_id
            if self._needs_grant is not None:
                self._needs_grant()
            return
        sub.bound = max(sub.bound, now + duration)
        sub._push_lease(renew_id, duration)

    async def invalidate(self, token_ids: Iterable[str], user_ids: Iterable[str]) -> None:
        """Pushes an Invalidate to every subscriber; returns once each leased one has acked
        it or its lease (as it stood at the push) has run out."""
        tokens, users = tuple(token_ids), tuple(user_ids)
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending: dict[Subscriber, float] = {}
        acks: list[tuple[Subscriber, int]] = []
        for sub in self._subs:
            sequence = sub._push_invalidation(tokens, users)
            if sub.bound > now:
                pending[sub] = sub.bound
                if sequence is not None:  # else it cannot ack: wait out its lease
                    acks.append((sub, sequence))
        self._lingering = [s for s in self._lingering if s.bound > now]
        for sub in self._lingering:
            pending[sub] = sub.bound  # can no longer ack: wait out its lease
        if not pending:
            return
        barrier = _Barrier(loop, pending)
        for sub, sequence in acks:
            sub._wait_on(sequence, barrier)
        await barrier.done
