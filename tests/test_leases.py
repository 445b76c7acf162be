"""The lease hub alone (pure asyncio, no server): whom an invalidation waits for, how long."""

from __future__ import annotations

import asyncio

from tokenservice_server.leases import (
    MAX_UNSENT_EVENTS,
    Invalidation,
    LeaseGranted,
    LeaseHub,
    Subscriber,
)

LEASE = 0.3


def drain(sub: Subscriber) -> list:
    events = []
    while not sub.outbox.empty():
        events.append(sub.outbox.get_nowait())
    return events


async def leased_hub(count: int) -> tuple[LeaseHub, list[Subscriber]]:
    hub = LeaseHub(LEASE)
    hub.extend_grants(asyncio.get_running_loop().time() + LEASE)
    subs = [hub.subscribe() for _ in range(count)]
    for i, sub in enumerate(subs):
        sub.renew(i + 1)
        assert [type(e) for e in drain(sub)] == [LeaseGranted]
    return hub, subs


def test_invalidate_returns_once_every_leased_subscriber_has_acked() -> None:
    async def main() -> None:
        hub, (a, b) = await leased_hub(2)
        done = asyncio.create_task(hub.invalidate(["t1"], []))
        await asyncio.sleep(0.01)
        assert not done.done()
        (event_a,) = drain(a)
        assert isinstance(event_a, Invalidation) and event_a.token_ids == ("t1",)
        a.ack(event_a.sequence)
        await asyncio.sleep(0.01)
        assert not done.done(), "returned before the second consumer applied it"
        b.ack(drain(b)[0].sequence)
        await asyncio.wait_for(done, 0.05)  # well before the lease runs out

    asyncio.run(main())


def test_a_silent_subscriber_is_waited_for_until_its_lease_ends_and_no_longer() -> None:
    async def main() -> None:
        hub, (silent,) = await leased_hub(1)
        loop = asyncio.get_running_loop()
        bound = silent.bound
        await asyncio.wait_for(hub.invalidate(["t1"], []), LEASE * 3)
        assert loop.time() >= bound, "returned while the silent consumer's lease still held"

    asyncio.run(main())


def test_a_subscriber_without_a_lease_is_told_but_not_waited_for() -> None:
    async def main() -> None:
        hub = LeaseHub(LEASE)
        sub = hub.subscribe()
        await asyncio.wait_for(hub.invalidate([], ["u1"]), 0.05)
        assert [e.user_ids for e in drain(sub)] == [("u1",)]

    asyncio.run(main())


def test_an_ended_stream_is_waited_for_until_its_lease_ends() -> None:
    async def main() -> None:
        hub, (gone,) = await leased_hub(1)
        bound = gone.bound
        hub.unsubscribe(gone)  # the consumer may not know yet, and keeps its cache
        await hub.invalidate(["t1"], [])
        assert asyncio.get_running_loop().time() >= bound
        assert drain(gone) == [], "a closed stream is sent nothing"

    asyncio.run(main())


def test_no_lease_outlasts_what_the_store_has_recorded() -> None:
    async def main() -> None:
        asked: list[bool] = []
        hub = LeaseHub(LEASE, needs_grant=lambda: asked.append(True))
        sub = hub.subscribe()
        sub.renew(7)
        assert drain(sub) == [] and asked == [True] and hub.wants_grant
        loop = asyncio.get_running_loop()
        until = loop.time() + LEASE / 2
        hub.extend_grants(until)
        (lease,) = drain(sub)
        assert isinstance(lease, LeaseGranted) and lease.renew_id == 7
        assert lease.duration <= LEASE / 2 and sub.bound <= until

    asyncio.run(main())


def test_an_invalidation_comes_before_any_later_lease_on_the_stream() -> None:
    async def main() -> None:
        hub, (sub,) = await leased_hub(1)
        waiting = asyncio.create_task(hub.invalidate(["t1"], []))
        await asyncio.sleep(0)
        sub.renew(2)
        # No Lease while the Invalidate stands unacked: it would outlive the bound
        # the change waits for. The Renew is answered once the ack comes.
        events = drain(sub)
        assert [type(e) for e in events] == [Invalidation]
        sub.ack(events[0].sequence)
        later = drain(sub)
        assert [type(e) for e in later] == [LeaseGranted]
        assert later[0].renew_id == 2 and later[0].sequence > events[0].sequence
        await asyncio.wait_for(waiting, 0.05)

    asyncio.run(main())


def test_acking_the_later_lease_acks_the_invalidation_before_it() -> None:
    async def main() -> None:
        hub, (sub,) = await leased_hub(1)
        waiting = asyncio.create_task(hub.invalidate(["t1"], []))
        await asyncio.sleep(0)
        sub.renew(2)
        sub.ack(drain(sub)[-1].sequence)
        await asyncio.wait_for(waiting, 0.05)
        sub.ack(10**9)  # beyond anything sent: counts as the last one, changes nothing
        assert sub.acked == sub.sequence

    asyncio.run(main())


def test_a_renew_flood_queues_one_lease_at_a_time() -> None:
    async def main() -> None:
        hub = LeaseHub(LEASE)
        hub.extend_grants(asyncio.get_running_loop().time() + LEASE)
        sub = hub.subscribe()
        for i in range(10_000):
            sub.renew(i + 1)
        assert sub.outbox.qsize() == 1, "a Lease queued for every Renew of a flood"
        first = await sub.next_event()
        assert isinstance(first, LeaseGranted) and first.renew_id == 1
        sub.renew(10_001)  # the queued one was sent: the next Renew is answered
        assert [e.renew_id for e in drain(sub)] == [10_001]

    asyncio.run(main())


def test_a_subscriber_that_reads_nothing_is_ended_and_waited_for_only_until_its_bound() -> None:
    async def main() -> None:
        hub, (stuck,) = await leased_hub(1)
        bound = stuck.bound
        changes = [asyncio.create_task(hub.invalidate(["t"], []))
                   for _ in range(MAX_UNSENT_EVENTS + 5)]
        await asyncio.sleep(0)
        assert stuck.behind and stuck.outbox.qsize() == MAX_UNSENT_EVENTS + 1
        assert drain(stuck)[-1] is None, "the stream that fell behind is not told to end"
        stuck.renew(99)
        assert drain(stuck) == [], "a stream that fell behind was granted a lease"
        await asyncio.wait_for(asyncio.gather(*changes), LEASE * 3)
        assert asyncio.get_running_loop().time() >= bound

    asyncio.run(main())


def test_a_caller_holds_at_most_its_share_of_streams() -> None:
    async def main() -> None:
        hub = LeaseHub(LEASE, max_per_owner=2)
        a, b = hub.subscribe("tok"), hub.subscribe("tok")
        assert a is not None and b is not None
        assert hub.subscribe("tok") is None
        assert hub.subscribe("other") is not None
        hub.unsubscribe(a, dropped=True)
        assert hub.subscribe("tok") is not None

    asyncio.run(main())


def test_a_callers_streams_share_one_report_pace_and_reopening_buys_no_new_burst() -> None:
    """A hostile watcher could multiply its usage-report rate by opening more
    streams, or by closing and reopening one; the pace is its token's."""

    async def main() -> None:
        hub = LeaseHub(LEASE, max_per_owner=4)
        a, b = hub.subscribe("tok"), hub.subscribe("tok")
        other = hub.subscribe("other")
        assert a is not None and b is not None and other is not None
        # A report that waits about 30 s (10,000 entries a second, after a
        # burst of 10,000), and leaves the pace that far behind.
        assert a.pace.delay(300_000) > 20
        assert b.pace.delay(100) > 0  # the token's other stream waits too...
        assert other.pace.delay(100) == 0.0  # ...another token does not
        hub.unsubscribe(a, dropped=True)
        hub.unsubscribe(b, dropped=True)
        again = hub.subscribe("tok")
        assert again is not None and again.pace.delay(100) > 0

    asyncio.run(main())
