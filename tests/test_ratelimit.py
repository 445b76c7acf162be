"""Rate limits and failure throttles: the sliding window's bound, in process and on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from redis_server import RedisServer

from tokenservice_server import cli, ratelimit, tokens
from tokenservice_server.config import (
    ConfigError,
    RateLimit,
    load_config,
    parse_rate_limit,
)
from tokenservice_server.ratelimit import (
    KEY_PREFIX,
    WINDOW_SLICES,
    Decision,
    LocalStore,
    RateLimiter,
    RedisStore,
    open_store,
)
from tokenservice_server.throttle import FailureBuckets


class Clock:
    """A clock that moves only when told to, in seconds."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


def max_in_any_window(times_us: list[int], period_us: int) -> int:
    """The most calls in any half-open window [t, t + period) (it opens on some call)."""
    best, j = 0, 0
    for i in range(len(times_us)):
        while j < len(times_us) and times_us[j] < times_us[i] + period_us:
            j += 1
        best = max(best, j - i)
    return best


@pytest.fixture
def stores(redis_url: str) -> Iterator[list[RedisStore]]:
    """Two RedisStores on one Redis: two replicas' worth of limiters."""
    made = [RedisStore(redis_url), RedisStore(redis_url)]
    yield made
    for store in made:
        store.close()


# The algorithm, in process, on a clock the test moves.


# No slack: at most `requests` calls in any window of the period, all of them at once
# if the caller likes.
@pytest.mark.parametrize(("requests", "period"), [(100, 10.0), (600, 60.0), (7, 1.0), (1, 5.0)])
def test_a_saturating_caller_gets_the_limit_at_once_and_never_more_in_any_window(
    requests: int, period: float
) -> None:
    clock = Clock()
    limiter = RateLimiter(LocalStore(clock=clock))
    # Rested: the whole limit at once, and not one call more.
    assert all(limiter.check("token", requests, period).allowed for _ in range(requests))
    assert not limiter.check("token", requests, period).allowed
    allowed = [micros(clock())] * requests
    # Then seven attempts per period / requests, for four periods.
    step = period / requests / 7
    for _ in range(4 * 7 * requests):
        clock.advance(step)
        if limiter.check("token", requests, period).allowed:
            allowed.append(micros(clock()))
    period_us = micros(period)
    assert max_in_any_window(allowed, period_us) == requests
    # A caller that keeps calling gets the limit every period and a slice: a call
    # counts until its tenth of the period has left the window.
    horizon = allowed[0] + 4 * period_us
    assert len(allowed) >= requests * 4 * WINDOW_SLICES // (WINDOW_SLICES + 1)
    assert all(t <= horizon for t in allowed)


def test_bursty_random_traffic_never_exceeds_the_limit() -> None:
    clock = Clock()
    limiter = RateLimiter(LocalStore(clock=clock))
    rng = random.Random(7)
    requests, period = 50, 5.0
    allowed: list[int] = []
    refused = 0
    for _ in range(400):
        for _ in range(rng.choice([1, 1, 2, 5, 20, 60])):
            if limiter.check("token", requests, period).allowed:
                allowed.append(micros(clock()))
            else:
                refused += 1
        clock.advance(rng.expovariate(1 / 0.15))
    assert refused > 0 and len(allowed) > requests
    assert max_in_any_window(allowed, micros(period)) == requests


def test_a_decision_says_what_is_left_and_exactly_when_to_retry() -> None:
    clock = Clock()  # at 1000 s: the start of a slice (one second for a 10 s period)
    limiter = RateLimiter(LocalStore(clock=clock))
    first = limiter.check("t", 100, 10.0)
    # Counted until its slice has left the window: 10 s and the slice itself.
    assert first == Decision(True, 100, 99, 11.0, 0.0, 0)
    clock.advance(2.5)
    rest = [limiter.check("t", 100, 10.0) for _ in range(99)]
    assert [d.remaining for d in rest] == list(range(98, -1, -1))
    refused = limiter.check("t", 100, 10.0)
    assert not refused.allowed and refused.remaining == 0
    # The first call leaves the window at 1011 s, 8.5 s from now; all of them at 1013 s.
    assert refused.retry_after_s == pytest.approx(8.5)
    assert refused.reset_after_s == pytest.approx(10.5)
    # Refused calls count nothing: many of them do not push the retry time back.
    for _ in range(50):
        assert not limiter.check("t", 100, 10.0).allowed
    clock.advance(refused.retry_after_s - 0.000001)
    assert not limiter.check("t", 100, 10.0).allowed
    clock.advance(0.000001)
    assert limiter.check("t", 100, 10.0).allowed
    assert not limiter.check("t", 100, 10.0).allowed  # one left the window, one came in
    # Another key has its own budget; cost 0 only asks.
    assert limiter.check("u", 100, 10.0, cost=0) == Decision(True, 100, 100, 0.0, 0.0, 0)


def test_a_call_may_cost_more_than_one_and_never_more_than_the_limit() -> None:
    limiter = RateLimiter(LocalStore(clock=Clock()))
    assert limiter.check("t", 60, 60.0, cost=4).remaining == 56
    assert not limiter.check("t", 60, 60.0, cost=57).allowed
    assert limiter.check("t", 60, 60.0, cost=56).remaining == 0
    assert not limiter.check("u", 60, 60.0, cost=61).allowed


def test_the_in_process_store_stays_bounded_under_many_keys() -> None:
    clock = Clock()
    limiter = RateLimiter(LocalStore(max_keys=10, clock=clock))
    for i in range(100):
        limiter.check(str(i), 1, 60.0)
    # Only the 10 most recently used keys are remembered: the oldest start rested.
    assert [limiter.check(str(i), 1, 60.0, cost=0).remaining for i in range(100)] == (
        [1] * 90 + [0] * 10
    )


def test_limits_the_limiter_cannot_keep_are_refused() -> None:
    limiter = RateLimiter()
    for requests, period in [(0, 60.0), (10, 0.0), (10, 0.000001)]:
        with pytest.raises(ValueError):
            limiter.check("t", requests, period)


# Configuration.


@pytest.mark.parametrize(
    ("text", "expected"),
    [("600/60s", RateLimit(600, 60.0)), ("100/10s", RateLimit(100, 10.0)),
     ("1000/1h", RateLimit(1000, 3600.0)), ("5/1.5m", RateLimit(5, 90.0)),
     ("20/500ms", RateLimit(20, 0.5)), (" 600/60s ", RateLimit(600, 60.0)),
     ("off", None), ("OFF", None)],
)
def test_rate_limit_setting_parses(text: str, expected: RateLimit | None) -> None:
    assert parse_rate_limit(text) == expected
    if expected is not None:
        assert parse_rate_limit(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    ["600", "600/60", "600/s", "/60s", "0/60s", "-1/60s", "600/0s", "600/-60s", "600/60 s",
     "600 / 60s", "1e3/60s", "600/60d", "600/25h", "2000000/1s", "six hundred", " "],
)
def test_bad_rate_limit_settings_are_refused_with_the_setting_named(text: str) -> None:
    with pytest.raises(ConfigError, match="TOKENSERVICE_RATE_LIMIT"):
        load_config({}, {"TOKENSERVICE_RATE_LIMIT": text})
    with pytest.raises(ConfigError, match="--rate-limit"):
        load_config({"rate_limit": text}, {})


def test_rate_limit_and_redis_url_come_from_flags_environment_or_defaults() -> None:
    default = load_config({}, {})
    assert default.rate_limit == RateLimit(600, 60.0) and default.redis_url is None
    env = {"TOKENSERVICE_RATE_LIMIT": "100/10s",
           "TOKENSERVICE_REDIS_URL": "redis://10.0.0.5:6380/2"}
    config = load_config({}, env)
    assert config.rate_limit == RateLimit(100, 10.0)
    assert config.redis_url == "redis://10.0.0.5:6380/2"
    config = load_config({"rate_limit": "off", "redis_url": "redis://cache/0"}, env)
    assert config.rate_limit is None and config.redis_url == "redis://cache/0"


def test_serve_workers_are_given_the_supervisors_limit_and_redis() -> None:
    for flags in ({"rate_limit": "100/10s", "redis_url": "redis://cache:6380/1"},
                  {"rate_limit": "off"}, {}):
        config = load_config(flags, {"TOKENSERVICE_REDIS_TIMEOUT_SECONDS": "0.05"})
        environ = cli._worker_environ(config, 50051, None)
        worker = load_config({}, {k: v for k, v in environ.items()
                                  if k.startswith("TOKENSERVICE_")})
        assert (worker.rate_limit, worker.redis_url) == (config.rate_limit, config.redis_url)
        assert worker.redis_timeout_seconds == 0.05


@pytest.mark.parametrize(
    "url", ["http://cache:6379/0", "redis://", "redis://cache:port/0", "redis://cache/zero",
            "cache:6379"],
)
def test_bad_redis_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="Redis URL"):
        load_config({}, {"TOKENSERVICE_REDIS_URL": url})


def test_no_redis_url_means_the_in_process_store() -> None:
    assert isinstance(open_store(None), LocalStore)


# Redis: the same answers, shared.


def test_redis_agrees_with_the_in_process_store(stores: list[RedisStore]) -> None:
    local = RateLimiter(LocalStore(clock=Clock()))
    shared = RateLimiter(stores[0])
    # An hour's window: the milliseconds this test takes change no answer. The two
    # clocks sit at different points of a slice (360 s), which moves the times only.
    for cost, cache in [(1, True), (1, False), (3, True), (1, False), (2, True), (2, False),
                        (1, True), (0, False), (1, False), (1, True), (1, False), (4, True)]:
        a = local.check("t", 10, 3600.0, cost=cost, cache=cache)
        b = shared.check("t", 10, 3600.0, cost=cost, cache=cache)
        assert (a.allowed, a.remaining, a.cache_budget, a.limit) == (
            b.allowed, b.remaining, b.cache_budget, b.limit)
        assert b.retry_after_s == pytest.approx(a.retry_after_s, abs=361.0)
        assert b.reset_after_s == pytest.approx(a.reset_after_s, abs=361.0)
    assert stores[0].healthy


def test_two_limiters_on_one_redis_share_one_budget(stores: list[RedisStore]) -> None:
    first, second = RateLimiter(stores[0]), RateLimiter(stores[1])
    decisions = [(first if i % 2 else second).check("t", 10, 3600.0) for i in range(20)]
    assert sum(d.allowed for d in decisions) == 10
    assert [d.remaining for d in decisions[:10]] == list(range(9, -1, -1))
    # The same key in another namespace (another kind of limit) is counted apart.
    assert RateLimiter(stores[1], namespace="other").check("t", 100, 3600.0).allowed


def test_concurrent_callers_on_two_limiters_never_exceed_the_bound(
    stores: list[RedisStore],
) -> None:
    requests, period = 20, 1.0
    limiters = [RateLimiter(stores[0]), RateLimiter(stores[1])]
    allowed = [0] * 4
    stop = threading.Event()

    def hammer(n: int) -> None:
        while not stop.is_set():
            if limiters[n % 2].check("t", requests, period).allowed:
                allowed[n] += 1

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(1.2)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    # Every allowed call fell within `elapsed` on Redis's clock (1.2 s and a little):
    # the whole limit at once, then no more until the first calls left the window.
    total = sum(allowed)
    assert elapsed < 2 * period
    assert requests <= total <= 2 * requests
    assert all(store.healthy for store in stores)


def test_redis_keys_hold_no_secret_and_expire_by_themselves(redis_url: str) -> None:
    raw, parsed = tokens.new_token("tks_")
    token_id, client = str(uuid.uuid4()), "203.0.113.7"
    store = RedisStore(redis_url)
    # Lifetimes of a second or two: long enough to be seen, short enough to wait out.
    RateLimiter(store).check(token_id, 2, 3.0)
    lookups = FailureBuckets(2, 1.0, store=store, namespace="lookup")
    clients = FailureBuckets(2, 1.0, store=store, namespace="client")
    lookups.fail(parsed.lookup_id)
    clients.fail(client)
    clients.hold(client, 0.5)
    with redis.Redis.from_url(redis_url) as r:
        keys = [k.decode() for k in r.scan_iter("*")]
        assert len(keys) == 3
        for key in keys:
            assert key.startswith(KEY_PREFIX)
            for clear in (raw, parsed.secret, parsed.lookup_id, token_id, client):
                assert clear not in key
            # Every key expires once it is as good as absent: the limit's once its
            # call has left the window (3 s and at most a slice of 0.3 s), a bucket's
            # once refilled (1 s, plus 0.5 s held).
            assert 0 < r.pttl(key) <= 3_302
        deadline = time.monotonic() + 15
        while r.dbsize() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.dbsize() == 0
    store.close()


def test_a_redis_that_forgot_the_scripts_is_sent_them_again(
    redis_url: str, stores: list[RedisStore]
) -> None:
    limiter = RateLimiter(stores[0])
    buckets = FailureBuckets(1, 0.001, store=stores[0])
    assert limiter.check("t", 100, 3600.0).remaining == 99
    buckets.fail("c")
    with redis.Redis.from_url(redis_url) as r:
        r.script_flush()  # as after a Redis restart or failover
        assert limiter.check("t", 100, 3600.0).remaining == 98
        assert buckets.retry_after("c") > 0
        assert stores[0].healthy
        # Sent whole once, the scripts are cached again for the next EVALSHA.
        assert r.script_exists(*(script.sha for script in _SCRIPTS)) == [True, True, False, False]


_SCRIPTS = [ratelimit._WINDOW, ratelimit._BUCKET_LEVEL, ratelimit._BUCKET_FAIL,
            ratelimit._BUCKET_HOLD]


# Failed-authentication throttles over Redis.


def test_failure_buckets_on_redis_are_shared_by_every_instance(stores: list[RedisStore]) -> None:
    one = FailureBuckets(3, 0.001, store=stores[0], namespace="client")
    two = FailureBuckets(3, 0.001, store=stores[1], namespace="client")
    local = FailureBuckets(3, 0.001, clock=Clock())
    assert two.untouched("198.51.100.9")
    for n in range(3):
        assert two.retry_after("198.51.100.9") == 0
        (one if n % 2 else two).fail("198.51.100.9")
        local.fail("198.51.100.9")
    assert not one.untouched("198.51.100.9")
    # Empty: a refill of 0.001 per second is 1000 s away, as in process.
    assert one.retry_after("198.51.100.9") == pytest.approx(local.retry_after("198.51.100.9"),
                                                            abs=1.0)
    assert two.retry_after("198.51.100.9") == pytest.approx(1000, abs=1.0)
    assert two.untouched("198.51.100.10")  # per key
    # A tarpit's wait refills nothing, wherever the wait was served.
    one.hold("198.51.100.9", 30.0)
    assert two.retry_after("198.51.100.9") == pytest.approx(1030, abs=1.0)
    # Another namespace on the same store is another set of buckets.
    assert FailureBuckets(3, 0.001, store=stores[1], namespace="lookup").untouched(
        "198.51.100.9"
    )


# Redis faults: never an error, per-process counters meanwhile, back by itself.


@pytest.fixture
def fragile(own_redis: RedisServer) -> Iterator[tuple[RedisServer, RedisStore, list[bool]]]:
    changes: list[bool] = []
    store = RedisStore(own_redis.url(), timeout_s=0.1, retry_after_s=0.05,
                       on_health_change=changes.append)
    yield own_redis, store, changes
    store.close()


def _wait_healthy(store: RedisStore, limiter: RateLimiter, key: str) -> None:
    deadline = time.monotonic() + 10
    while not store.healthy and time.monotonic() < deadline:
        time.sleep(0.06)
        limiter.check(key, 1, 3600.0, cost=0)


def test_redis_stopped_falls_back_to_this_process_and_restarted_recovers(
    fragile: tuple[RedisServer, RedisStore, list[bool]],
) -> None:
    server, store, changes = fragile
    limiter = RateLimiter(store)
    buckets = FailureBuckets(1, 0.001, store=store, namespace="client")
    assert limiter.check("t", 1, 3600.0).allowed
    assert not limiter.check("t", 1, 3600.0).allowed  # the budget lives in Redis
    server.stop()
    # Down: the same call is answered, from this process's own counters, which start
    # afresh (fail open) but still count: a second call is refused.
    assert limiter.check("t", 1, 3600.0).allowed
    assert not store.healthy and changes == [False]
    assert not limiter.check("t", 1, 3600.0).allowed
    buckets.fail("203.0.113.7")
    assert buckets.retry_after("203.0.113.7") > 0
    assert not store.probe()
    server.start()
    _wait_healthy(store, limiter, "probe")
    assert store.healthy and changes == [False, True]
    # Back on Redis (empty after its restart): the budget is shared again.
    assert limiter.check("t", 1, 3600.0).allowed
    with redis.Redis.from_url(server.url()) as r:
        assert r.exists(*[k for k in r.scan_iter(f"{KEY_PREFIX}token:*")]) == 1
    other = RedisStore(server.url())
    assert not RateLimiter(other).check("t", 1, 3600.0).allowed
    other.close()


def test_a_stalled_redis_times_out_into_the_fallback_and_recovers(
    fragile: tuple[RedisServer, RedisStore, list[bool]],
) -> None:
    server, store, changes = fragile
    limiter = RateLimiter(store)
    assert limiter.check("t", 100, 3600.0).remaining == 99
    server.freeze()
    try:
        decision = limiter.check("t", 100, 3600.0)  # answered after the 100 ms timeout
        assert decision.allowed and not store.healthy and changes == [False]
        assert not store.probe()
    finally:
        server.thaw()
    _wait_healthy(store, limiter, "probe")
    assert changes == [False, True]
    # The budget in Redis was never lost: its count goes on where it was (the
    # call that timed out may have reached Redis after all).
    assert limiter.check("t", 100, 3600.0).remaining in (98, 97)


def test_a_black_holed_redis_costs_one_timeout_per_back_off_not_one_per_call() -> None:
    # A listener that accepts and never answers: a Redis behind a dead network path.
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.05, retry_after_s=3600)
    limiter = RateLimiter(store)
    try:
        decisions = [limiter.check("t", 5, 3600.0) for _ in range(20)]
        # Answered from this process's counters: the limit, then refused.
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 15
        assert not store.healthy
        # Redis was tried once (no retries inside the call, none until the back-off
        # ends). The listener's thread may accept a little later than the connect.
        deadline = time.monotonic() + 5
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # room for any second connection to show up
        assert len(accepted) == 1
    finally:
        store.close()
        listener.close()
        for conn in accepted:
            conn.close()


def test_checks_never_fail_while_redis_goes_down_and_comes_back_under_load(
    fragile: tuple[RedisServer, RedisStore, list[bool]],
) -> None:
    server, store, changes = fragile
    limiter = RateLimiter(store)
    buckets = FailureBuckets(50, 5.0, store=store, namespace="client")
    errors: list[BaseException] = []
    answered = [0] * 4
    stop = threading.Event()

    def load(n: int) -> None:
        while not stop.is_set():
            try:
                limiter.check(f"t{n}", 1000, 1.0)
                buckets.retry_after(f"c{n}")
                buckets.fail(f"c{n}")
                answered[n] += 1
            except BaseException as error:  # noqa: BLE001 - any escape is the failure
                errors.append(error)
                return

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        server.stop()
        during = sum(answered)
        time.sleep(0.5)
        during = sum(answered) - during
        server.start()
        _wait_healthy(store, limiter, "probe")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert during > 0  # calls kept being answered while Redis was down
    # Every change reported once and in order, ending on the truth.
    assert store.healthy and changes[0] is False and changes[-1] is True
    assert all(before != after for before, after in zip(changes, changes[1:], strict=False))


# From an event loop: batched, and never on the loop's thread.


class CountingRedisStore(RedisStore):
    """A real RedisStore that remembers the size of each batch it was sent."""

    def __init__(self, url: str, **kwargs) -> None:
        super().__init__(url, **kwargs)
        self.batches: list[int] = []

    async def awindow_many(self, steps, executor=None):  # type: ignore[no-untyped-def]
        self.batches.append(len(steps))
        return await super().awindow_many(steps, executor)


def test_checks_from_an_event_loop_reach_redis_in_one_round_trip_a_turn(redis_url: str) -> None:
    store = CountingRedisStore(redis_url)
    limiter = RateLimiter(store)

    async def callers() -> list[Decision]:
        first = await asyncio.gather(*(limiter.acheck("t", 10, 3600.0) for _ in range(30)))
        second = await asyncio.gather(limiter.acheck("u", 10, 3600.0),
                                      limiter.acheck("t", 10, 3600.0, cost=0))
        return [*first, *second]

    try:
        decisions = asyncio.run(callers())
    finally:
        store.close()
    # Thirty calls in one turn of the loop: one script run, in the order asked.
    assert store.batches == [30, 2]
    assert [d.allowed for d in decisions[:30]] == [True] * 10 + [False] * 20
    assert [d.remaining for d in decisions[:10]] == list(range(9, -1, -1))
    assert decisions[30].allowed and decisions[30].remaining == 9  # another key
    assert decisions[31].remaining == 0


def test_a_stalled_redis_never_stalls_the_event_loop(
    fragile: tuple[RedisServer, RedisStore, list[bool]],
) -> None:
    server, store, _ = fragile
    limiter = RateLimiter(store)

    async def check_beside_a_ticker() -> tuple[Decision, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.005)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        decision = await limiter.acheck("t", 100, 3600.0)  # waits out the 100 ms timeout
        seen = ticks  # the ticker's turns while the check waited
        done.set()
        await ticking
        return decision, seen

    server.freeze()
    try:
        decision, ticks = asyncio.run(check_beside_a_ticker())
    finally:
        server.thaw()
    # Answered by the fallback, and the loop went on running while Redis was waited for.
    assert decision.allowed and not store.healthy
    assert ticks > 0


def test_the_event_loop_s_connection_shares_the_budget_and_recovers_by_itself(
    fragile: tuple[RedisServer, RedisStore, list[bool]],
) -> None:
    """Checks from a loop and from threads count in one place; Redis lost and back."""
    server, store, changes = fragile
    limiter = RateLimiter(store)

    async def burst(n: int) -> list[Decision]:
        return await asyncio.gather(*(limiter.acheck("t", 100, 3600.0) for _ in range(n)))

    assert [d.remaining for d in asyncio.run(burst(4))] == [99, 98, 97, 96]
    assert limiter.check("t", 100, 3600.0).remaining == 95  # the same key, from a thread
    server.stop()
    # Down: answered by this process's counters, which start rested.
    assert [d.allowed for d in asyncio.run(burst(3))] == [True] * 3
    assert not store.healthy and changes == [False]
    server.start()  # empty, as after a crash

    async def until_shared() -> Decision:
        while True:
            decision = (await burst(1))[0]
            if store.healthy:
                return decision
            await asyncio.sleep(0.06)  # the store tries Redis again after its back-off

    assert asyncio.run(until_shared()).allowed and changes == [False, True]
    with redis.Redis.from_url(server.url()) as client:
        assert client.keys(f"{KEY_PREFIX}token:*")  # counted in Redis again


def test_a_changed_limit_holds_from_the_next_call_in_either_store(redis_url: str) -> None:
    """The calls counted stay counted; the limit they are held against is the one of the call."""
    store = RedisStore(redis_url)
    try:
        for limiter in (RateLimiter(LocalStore(clock=Clock())), RateLimiter(store)):
            assert limiter.check("t", 1, 3600.0).allowed
            assert not limiter.check("t", 1, 3600.0).allowed
            raised = limiter.check("t", 1000, 3600.0)
            assert raised.allowed and raised.remaining == 998
            # Lowered again: the two calls counted are over the new limit until they
            # leave the window, an hour (and at most a slice) from the first.
            lowered = limiter.check("t", 1, 3600.0)
            assert not lowered.allowed
            assert 3600 - 10 <= lowered.retry_after_s <= 3600 + 360
    finally:
        store.close()


# Uses a consumer answered from its cache: promised, then counted when reported.


def _cached_and_reported(limiter: RateLimiter) -> list[tuple[bool, int, int]]:
    """A 20/3600s key: calls from caches (each promised two uses), their reports."""
    out = []

    def check(cache: bool = True) -> None:
        d = limiter.check("t", 20, 3600.0, cache=cache)
        out.append((d.allowed, d.remaining, d.cache_budget))

    check()  # 1 counted, 2 promised: 17 left
    check()  # another cache: 2 counted, 4 promised
    limiter.charge("t", 20, 3600.0, 2)  # a cache spent its two: counted, off the promise
    check()  # 5 counted, 4 promised
    limiter.charge("t", 20, 3600.0, 40)  # more than promised: the four are counted
    check()  # 10 counted, 2 promised
    limiter.charge("t", 20, 3600.0, 40)  # the two
    limiter.charge("t", 20, 3600.0, 2)  # nothing promised any more: nothing counted
    check(cache=False)
    return out


def test_cached_uses_are_promised_per_call_and_counted_when_reported(
    stores: list[RedisStore],
) -> None:
    local = _cached_and_reported(RateLimiter(LocalStore(clock=Clock())))
    # A report counts at most what was promised: a watcher naming someone else's
    # token cannot drain its limit.
    assert local == [(True, 17, 2), (True, 14, 2), (True, 11, 2), (True, 8, 2), (True, 7, 0)]
    assert _cached_and_reported(RateLimiter(stores[0])) == local


def test_promised_uses_hold_their_room_until_reported_or_lapsed() -> None:
    clock = Clock()
    limiter = RateLimiter(LocalStore(clock=clock))
    for _ in range(95):
        limiter.check("t", 100, 10.0)
    last = limiter.check("t", 100, 10.0, cache=True)
    assert (last.remaining, last.cache_budget) == (0, 4)  # no more than the room left
    assert not limiter.check("t", 100, 10.0).allowed  # the room is promised
    # Never reported (the cache went away): the promise lapses in a few seconds.
    clock.advance(ratelimit.PROMISE_BUCKETS - 0.001)
    assert not limiter.check("t", 100, 10.0).allowed
    clock.advance(0.001)
    assert limiter.check("t", 100, 10.0).remaining == 3
    # Reported in time, the uses count like calls.
    assert limiter.check("u", 100, 10.0, cache=True).cache_budget == 10
    clock.advance(3.0)
    limiter.charge("u", 100, 10.0, 10)
    clock.advance(3.0)
    assert limiter.check("u", 100, 10.0).remaining == 88
