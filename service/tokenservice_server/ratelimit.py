"""Rate limits and failure throttles: one algorithm, kept in process or shared through Redis.

The algorithm is GCRA, the generic cell rate algorithm (ATM networks' policer,
redis-cell's and Stripe's limiter). A limit of `requests` per `period` spaces
calls `T = period / requests` apart; each key keeps one number, its theoretical
arrival time (TAT): when it would next be fully rested. A call is let through
when it lands no more than `burst * T` ahead of now, and moves the TAT on by T.

Why GCRA rather than the alternatives:

* a sliding-window log is exact but keeps one timestamp per call (600 for a
  600/60s limit) in every key;
* fixed windows let 2 x `requests` through around a window's edge, and the
  two-counter sliding-window estimate still lets up to 1.5 x through;
* a token bucket gives the same answers as GCRA but keeps two numbers (level
  and time), so its Redis script has more to read, write and get wrong.

GCRA keeps one integer per key, answers every question a caller needs (allowed,
how many calls are left right now, when to retry, when fully rested) from it,
and its bound is exact: in any window of `period` seconds (half-open) a key is
let through at most `requests + burst - 1` calls. The slack is `burst - 1`. By
default `burst = ceil(requests / 10)`, so a 600/60s limit allows 60 calls at
once, then one every 100 ms, and never more than 659 in any 60 s; 100/10s
never more than 109 in any 10 s. A caller that keeps calling faster than the
limit gets `requests` calls per period once its burst is spent.

What a caller is told. GCRA has no fixed window: each call it lets through
is counted against the key until the key has paid it back at the limit's
pace, T later (the TAT runs ahead of now by T per call still counted). So:

* `remaining` is the calls left in the window after this one, as near as
  GCRA has a window: `requests` less the calls still counted, ceil(ahead / T),
  and 0 whenever a call made at once would be refused (the burst is spent).
  A rested 100/10s key answers 99, 98, ... for a burst, and 0 on its tenth
  call at once; a caller keeping to one call per T sees 99 every time, which
  is true: it may go on like that forever. A caller that sees 0 and waits
  until `reset_after_s` finds the key rested and its whole burst back.
* `burst_left` is the calls that would be let through right now, after this
  one (at most `burst - 1`): the answer to "may I send another at once?".
* `reset_after_s` is when the key is fully rested (every call paid back,
  `remaining` at `requests`); `retry_after_s`, for a refused call, is when
  the same call would be let through.

Two stores run the same step: LocalStore in this process (a bounded LRU
behind a lock, timed by an injectable clock) and RedisStore, one Lua script
per check (EVALSHA, EVAL on NOSCRIPT) timed by Redis's own clock so replicas
with skewed clocks agree. Redis keys start with `tokenservice:rl:`, hold a
hash of the caller's id (never a token secret, never a client address in
clear) and expire by themselves once the key is fully rested. Redis failing
or slower than its timeout never reaches the caller: the check runs on the
RedisStore's own LocalStore instead (per-process counters: fail open for the
shared budget, never unlimited), the store reports itself unhealthy, and
Redis is tried again after a short back-off.

From an event loop, RateLimiter.acheck never waits on the loop's thread: a
GcraBatcher gathers the checks asked while a batch is out and sends them as
the next batch, one script run over all their keys, on the loop's own
pipelined connection (redis_pipe.py). A thread hand-off per check cost more
than the round trip itself (BENCHMARKS.md has both).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from functools import lru_cache
from typing import Any, NamedTuple

log = logging.getLogger("tokenservice.ratelimit")

KEY_PREFIX = "tokenservice:rl:"
# The burst is this fraction of `requests` (rounded up): the slack in any window.
BURST_DIVISOR = 10
MICROS = 1_000_000


def default_burst(requests: int) -> int:
    """Calls a rested key may make at once: a tenth of the limit, at least one."""
    return max(1, -(-requests // BURST_DIVISOR))


class Decision(NamedTuple):
    """One check's answer, in the terms of RetryInfo and the RateLimit-* headers.

    A NamedTuple, not a frozen dataclass: it is built on every Authenticate, and
    a tuple costs a third as much to build.
    """

    allowed: bool
    # The configured `requests` per period.
    limit: int
    # The calls left in the window after this one: `limit` less the calls still
    # counted against the key, and 0 when a call made at once would be refused.
    remaining: int
    # Seconds until the key is fully rested (its whole burst available again).
    reset_after_s: float
    # Refused: seconds until the same call would be let through. Allowed: 0.
    retry_after_s: float
    # Calls that would be let through right now, after this one.
    burst_left: int


class GcraStep(NamedTuple):
    """One GCRA step asked of a store: gcra()'s arguments."""

    namespace: str
    key: str
    interval_us: int
    span_us: int
    cost: int


class GcraResult(NamedTuple):
    """A store's answer, in whole microseconds."""

    allowed: bool
    # How far the key's TAT lies ahead of now after the call (unchanged when refused).
    ahead_us: int
    # Refused: how long until the call would fit. Allowed: 0.
    retry_us: int


def gcra_step(
    tat: int, now: int, interval: int, span: int, cost: int
) -> tuple[GcraResult, int | None]:
    """One GCRA step: the result and the new TAT to store (None: leave it).

    The Lua script in RedisStore is this function, line for line. A TAT
    further ahead than `span` can only come from a stricter limit the key had
    before (a token's limit was raised): that debt is forgiven down to one
    full burst, so a new limit holds from the next call.
    """
    tat = max(tat, now)
    forgiven = tat - now > span
    if forgiven:
        tat = now + span
    new_tat = tat + interval * cost
    if new_tat - now > span:
        return GcraResult(False, tat - now, new_tat - span - now), (tat if forgiven else None)
    return GcraResult(True, new_tat - now, 0), (new_tat if cost > 0 or forgiven else None)


def gcra_charge(tat: int, now: int, interval: int, span: int, cost: int) -> int | None:
    """Counts `cost` calls already made (answered from a consumer's cache): the new
    TAT to store, or None to leave it.

    Never refused: the calls happened. The debt stops at one full burst
    (`span` ahead of now), the most a GCRA step ever leaves, so the next check
    refuses until the key has paid back a call and never mistakes this debt for
    a stricter old limit's. What a caching consumer may answer before it is
    counted is bounded by the budget slice it was granted (burst_left), so the
    cap loses nothing one consumer could have used.
    """
    tat = max(tat, now)
    new_tat = min(tat + interval * cost, now + span)
    return new_tat if new_tat > tat else None


class LimitStore(ABC):
    """Where limits and throttles keep their state: this process, or Redis.

    `namespace` separates the users of one store (per-token limits, per-client
    and per-lookup throttles); `key` is the caller's id within it.
    """

    # True when a call may wait on the network (Redis): an event loop must not
    # make it on its own thread.
    remote = False

    @abstractmethod
    def gcra(self, namespace: str, key: str, interval_us: int, span_us: int,
             cost: int) -> GcraResult:
        """One GCRA step for `key`: interval T and span burst*T in microseconds."""

    def gcra_many(self, steps: Sequence[GcraStep]) -> list[GcraResult]:
        """Several GCRA steps, in order, as one unit of work (one round trip to Redis)."""
        return [self.gcra(*step) for step in steps]

    @abstractmethod
    def charge(self, namespace: str, key: str, interval_us: int, span_us: int,
               cost: int) -> None:
        """Counts `cost` calls made without a check (gcra_charge)."""

    async def agcra_many(self, steps: Sequence[GcraStep],
                         executor: Executor | None = None) -> list[GcraResult]:
        """gcra_many() from an event loop: on `executor` when it may wait, else at once."""
        if not self.remote:
            return self.gcra_many(steps)
        return await asyncio.get_running_loop().run_in_executor(executor, self.gcra_many, steps)

    @abstractmethod
    def bucket_level(self, namespace: str, key: str, burst: float, rate: float) -> float:
        """Tokens in `key`'s failure bucket now (`burst` when it has none)."""

    @abstractmethod
    def bucket_fail(self, namespace: str, key: str, burst: float, rate: float) -> None:
        """Takes one token from `key`'s failure bucket (none left: stays empty)."""

    @abstractmethod
    def bucket_hold(self, namespace: str, key: str, seconds: float, burst: float,
                    rate: float) -> None:
        """Pushes `key`'s refill `seconds` later (a tarpit's wait refills nothing)."""

    @property
    def healthy(self) -> bool:
        """False while a shared store is out of reach and this process counts alone."""
        return True

    def probe(self) -> bool:
        """Checks the store now (for a health loop) and returns `healthy`."""
        return self.healthy

    def close(self) -> None:
        """Releases connections; the store may not be used afterwards."""
        return None  # this process's own counters hold none


class LocalStore(LimitStore):
    """This process's own counters: an LRU of at most `max_keys` keys per namespace.

    A flood of distinct keys evicts the least recently used ones, so memory
    stays bounded; an evicted key starts rested (the flood itself, not the
    evicted caller, is what the failure throttles catch).
    """

    def __init__(self, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max_keys = max_keys
        self._clock = clock
        self._tables: dict[str, OrderedDict[str, Any]] = {}
        self._lock = threading.Lock()

    def _table(self, namespace: str) -> OrderedDict[str, Any]:
        table = self._tables.get(namespace)
        if table is None:
            table = self._tables.setdefault(namespace, OrderedDict())
        return table

    def _trim(self, table: OrderedDict[str, Any]) -> None:
        while len(table) > self._max_keys:
            table.popitem(last=False)

    def gcra(self, namespace: str, key: str, interval_us: int, span_us: int,
             cost: int) -> GcraResult:
        with self._lock:
            now = round(self._clock() * MICROS)
            table = self._table(namespace)
            result, new_tat = gcra_step(table.get(key, 0), now, interval_us, span_us, cost)
            if new_tat is not None:
                table[key] = new_tat
                table.move_to_end(key)
                self._trim(table)
            return result

    def charge(self, namespace: str, key: str, interval_us: int, span_us: int,
               cost: int) -> None:
        with self._lock:
            now = round(self._clock() * MICROS)
            table = self._table(namespace)
            new_tat = gcra_charge(table.get(key, 0), now, interval_us, span_us, cost)
            if new_tat is not None:
                table[key] = new_tat
                table.move_to_end(key)
                self._trim(table)

    # The failure buckets: (tokens, time of the last change) per key, in seconds.

    @staticmethod
    def _level(entry: tuple[float, float] | None, burst: float, rate: float,
               now: float) -> float:
        if entry is None:
            return burst
        tokens, at = entry
        return min(burst, tokens + (now - at) * rate)

    def bucket_level(self, namespace: str, key: str, burst: float, rate: float) -> float:
        table = self._tables.get(namespace)
        if not table:  # fast path: nobody has failed lately
            return burst
        with self._lock:
            return self._level(table.get(key), burst, rate, self._clock())

    def bucket_fail(self, namespace: str, key: str, burst: float, rate: float) -> None:
        with self._lock:
            table = self._table(namespace)
            now = self._clock()
            level = self._level(table.get(key), burst, rate, now)
            table[key] = (max(0.0, level - 1.0), now)
            table.move_to_end(key)
            self._trim(table)

    def bucket_hold(self, namespace: str, key: str, seconds: float, burst: float,
                    rate: float) -> None:
        with self._lock:
            table = self._tables.get(namespace)
            entry = None if table is None else table.get(key)
            if table is None or entry is None:
                return
            now = self._clock()
            tokens, at = entry
            # At most one refill period of debt beyond the longest hold.
            table[key] = (tokens, min(at + seconds, now + seconds))


# The Redis scripts. Each is one round trip, reads Redis's clock (TIME), and
# gives every key it writes an expiry: the moment the key is as good as absent.
# The GCRA script takes any number of keys, each with its three arguments, and
# steps them in order (a key named twice sees its first step): one script for a
# single check and for a batch.
# Numbers leave Lua as strings ('%.17g', '%d'): Lua's default formatting keeps
# only 14 digits, too few for microseconds since 1970.

_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local span, cost = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', key) or 0)
  if tat < now then tat = now end
  local forgiven = tat - now > span
  if forgiven then tat = now + span end
  local new_tat = tat + interval * cost
  if new_tat - now > span then
    if forgiven then
      redis.call('SET', key, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
    end
    out[3 * i - 2], out[3 * i - 1], out[3 * i] = 0, tat - now, new_tat - span - now
  else
    if cost > 0 or forgiven then
      redis.call('SET', key, string.format('%d', new_tat),
                 'PX', math.ceil((new_tat - now) / 1000) + 1)
    end
    out[3 * i - 2], out[3 * i - 1], out[3 * i] = 1, new_tat - now, 0
  end
end
return out
"""

# gcra_charge, line for line.
_CHARGE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, span, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
local new_tat = math.min(tat + interval * cost, now + span)
if new_tat > tat then
  redis.call('SET', KEYS[1], string.format('%d', new_tat),
             'PX', math.ceil((new_tat - now) / 1000) + 1)
end
return 1
"""

_BUCKET_READ_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local burst, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local entry = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local level = burst
if entry[1] then
  level = math.min(burst, tonumber(entry[1]) + (now - tonumber(entry[2])) * rate)
end
"""

_BUCKET_LEVEL_LUA = _BUCKET_READ_LUA + """
return string.format('%.17g', level)
"""

_BUCKET_FAIL_LUA = _BUCKET_READ_LUA + """
local tokens = math.max(0, level - 1)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'at', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1)
return 1
"""

_BUCKET_HOLD_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local seconds, burst, rate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local entry = redis.call('HMGET', KEYS[1], 'tokens', 'at')
if not entry[1] then return 0 end
local tokens = tonumber(entry[1])
local at = math.min(tonumber(entry[2]) + seconds, now + seconds)
redis.call('HSET', KEYS[1], 'at', string.format('%.17g', at))
redis.call('PEXPIRE', KEYS[1], math.ceil((at + (burst - tokens) / rate - now) * 1000) + 1)
return 1
"""


class _Script:
    """A Lua script run by its SHA1, sent whole only when Redis does not have it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_GCRA = _Script(_GCRA_LUA)
_CHARGE = _Script(_CHARGE_LUA)
_BUCKET_LEVEL = _Script(_BUCKET_LEVEL_LUA)
_BUCKET_FAIL = _Script(_BUCKET_FAIL_LUA)
_BUCKET_HOLD = _Script(_BUCKET_HOLD_LUA)


def redis_key(namespace: str, key: str) -> str:
    """`tokenservice:rl:<namespace>:<hash of key>`: no id in clear, a bounded length."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    return f"{KEY_PREFIX}{namespace}:{digest}"


class RedisStore(LimitStore):
    """Limits shared by every process on one Redis, with this process's counters as fallback.

    `timeout_s` bounds every Redis call (connect and reply); a call that fails
    or times out is answered by `fallback` instead, and Redis is left alone for
    `retry_after_s` (one caller then tries it again while the others keep to
    the fallback), so a dead or stalled Redis costs at most one timeout per
    back-off, never an error. `on_health_change(healthy)` is called on every
    change of `healthy`, in order, from the thread that noticed it (under a
    lock: it should only hand the news on, not wait for anything).
    """

    remote = True

    def __init__(
        self,
        url: str,
        timeout_s: float = 0.1,
        fallback: LocalStore | None = None,
        retry_after_s: float = 1.0,
        on_health_change: Callable[[bool], None] | None = None,
    ) -> None:
        # Imported here: redis-py takes ~150 ms to import, which a process
        # without a Redis URL (the CLI, the default server) need not pay.
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from .redis_pipe import RedisPipe, RedisReplyError, RedisUnanswered

        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # No retries inside a call (redis.Redis() retries three times by default,
            # from_url() today none): each would add a timeout to the caller's wait
            # on a dead Redis. The fallback is the retry.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._noscript = redis.exceptions.NoScriptError
        # The event loop's own connection (agcra_many): pipelined, no thread.
        self._pipe = RedisPipe(url, timeout_s)
        self._aerrors: tuple[type[BaseException], ...] = (RedisUnanswered, RedisReplyError,
                                                          OSError)
        self._reply_error = RedisReplyError
        self.fallback = fallback if fallback is not None else LocalStore()
        self.retry_after_s = retry_after_s
        self.on_health_change = on_health_change
        self._healthy = True
        self._reported = True
        self._next_try = 0.0
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        return self._healthy

    # Health: down on any error, up again on the first call that succeeds.

    def _may_try(self) -> bool:
        if self._healthy:
            return True
        now = time.monotonic()
        with self._lock:
            if now < self._next_try:
                return False
            self._next_try = now + self.retry_after_s  # this caller probes; others wait
        return True

    def _up(self) -> None:
        if self._healthy:
            return
        with self._lock:
            self._healthy = True
        self._report()

    def _down(self, error: BaseException) -> None:
        with self._lock:
            self._healthy = False
            self._next_try = time.monotonic() + self.retry_after_s
        self._report(error)

    def _report(self, error: BaseException | None = None) -> None:
        """Logs and calls back each change once, in order, ending on the current state.

        Threads race to change `healthy` (a call that went out before Redis died
        may succeed after another saw it fail); each reports the state as it is
        when it holds the lock, so the last report is always the true one."""
        with self._report_lock:
            healthy = self._healthy
            if healthy == self._reported:
                return
            self._reported = healthy
            if healthy:
                log.info("Redis is back: rate limits are shared again")
            else:
                log.warning(
                    "Redis unavailable: rate limits fall back to this process's counters",
                    extra={"error": f"{type(error).__name__}: {error}" if error else None},
                )
            if self.on_health_change is not None:
                try:
                    self.on_health_change(healthy)
                except Exception:
                    log.exception("rate limit health callback failed")

    def _eval(self, script: _Script, key: str, *args: Any) -> Any:
        return self._eval_keys(script, (key,), args)

    def _eval_keys(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self._client.evalsha(script.sha, len(keys), *keys, *args)
        except self._noscript:
            # EVAL runs the script and caches it: the next EVALSHA finds it.
            return self._client.eval(script.source, len(keys), *keys, *args)

    def probe(self) -> bool:
        try:
            self._client.ping()
        except self._errors as error:
            self._down(error)
        else:
            self._up()
        return self._healthy

    # The store's operations: Redis when it answers, else the fallback.

    def gcra(self, namespace: str, key: str, interval_us: int, span_us: int,
             cost: int) -> GcraResult:
        if self._may_try():
            try:
                allowed, ahead, retry = self._eval(
                    _GCRA, redis_key(namespace, key), interval_us, span_us, cost
                )
            except self._errors as error:
                self._down(error)
            else:
                self._up()
                return GcraResult(bool(allowed), int(ahead), int(retry))
        return self.fallback.gcra(namespace, key, interval_us, span_us, cost)

    def charge(self, namespace: str, key: str, interval_us: int, span_us: int,
               cost: int) -> None:
        if self._may_try():
            try:
                self._eval(_CHARGE, redis_key(namespace, key), interval_us, span_us, cost)
            except self._errors as error:
                self._down(error)
            else:
                self._up()
                return
        self.fallback.charge(namespace, key, interval_us, span_us, cost)

    def gcra_many(self, steps: Sequence[GcraStep]) -> list[GcraResult]:
        if not steps:
            return []
        if self._may_try():
            keys = [redis_key(step.namespace, step.key) for step in steps]
            args = [n for step in steps for n in (step.interval_us, step.span_us, step.cost)]
            try:
                flat = self._eval_keys(_GCRA, keys, args)
            except self._errors as error:
                self._down(error)
            else:
                self._up()
                return [GcraResult(bool(flat[i]), int(flat[i + 1]), int(flat[i + 2]))
                        for i in range(0, len(flat), 3)]
        return self.fallback.gcra_many(steps)

    async def agcra_many(self, steps: Sequence[GcraStep],
                         executor: Executor | None = None) -> list[GcraResult]:
        """gcra_many() on the event loop's own pipelined connection: no thread, no wait
        on the loop's thread; a failure or a timeout is answered by the fallback."""
        if steps and self._may_try():
            keys = [redis_key(step.namespace, step.key) for step in steps]
            args = [n for step in steps for n in (step.interval_us, step.span_us, step.cost)]
            try:
                flat = await self._aeval_keys(_GCRA, keys, args)
            except self._aerrors as error:
                self._down(error)
            else:
                self._up()
                return [GcraResult(bool(flat[i]), flat[i + 1], flat[i + 2])
                        for i in range(0, len(flat), 3)]
        return self.fallback.gcra_many(steps)

    async def _aeval_keys(self, script: _Script, keys: Sequence[str],
                          args: Sequence[Any]) -> Any:
        try:
            return await self._pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._reply_error as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
            return await self._pipe.call("EVAL", script.source, len(keys), *keys, *args)

    def bucket_level(self, namespace: str, key: str, burst: float, rate: float) -> float:
        if self._may_try():
            try:
                level = self._eval(_BUCKET_LEVEL, redis_key(namespace, key), burst, rate)
            except self._errors as error:
                self._down(error)
            else:
                self._up()
                return float(level)
        return self.fallback.bucket_level(namespace, key, burst, rate)

    def bucket_fail(self, namespace: str, key: str, burst: float, rate: float) -> None:
        if self._may_try():
            try:
                self._eval(_BUCKET_FAIL, redis_key(namespace, key), burst, rate)
            except self._errors as error:
                self._down(error)
            else:
                self._up()
                return
        self.fallback.bucket_fail(namespace, key, burst, rate)

    def bucket_hold(self, namespace: str, key: str, seconds: float, burst: float,
                    rate: float) -> None:
        if self._may_try():
            try:
                self._eval(_BUCKET_HOLD, redis_key(namespace, key), seconds, burst, rate)
            except self._errors as error:
                self._down(error)
            else:
                self._up()
                return
        self.fallback.bucket_hold(namespace, key, seconds, burst, rate)

    def close(self) -> None:
        self._client.close()
        self._pipe.close()


class GcraBatcher:
    """A store's GCRA steps asked from an event loop, gathered into batches.

    One batch is out at a time: the steps asked while it is out go together
    in the next, sent the moment it comes back (and a step asked while none
    is out goes as the loop's turn ends, with any others of that turn). So
    a lone call waits for one round trip, no longer, and under load a round
    trip answers as many calls as arrived during the one before: the cost of
    a round trip (two system calls, a script run) is shared, and the more the
    busier the loop. Used from one event loop at a time.
    """

    def __init__(self, store: LimitStore, executor: Executor | None = None) -> None:
        self._store = store
        self._executor = executor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[GcraStep, asyncio.Future[GcraResult]]] = []
        self._busy = False  # a batch is out, or about to be sent
        self._sending: set[asyncio.Task[None]] = set()

    async def gcra(self, step: GcraStep) -> GcraResult:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests run several): start afresh
            self._loop, self._pending, self._busy = loop, [], False
        future: asyncio.Future[GcraResult] = loop.create_future()
        self._pending.append((step, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._send, loop)  # after every call ready this turn has asked
        return await future

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            return
        if not self._pending:
            self._busy = False
            return
        batch, self._pending = self._pending, []
        task = loop.create_task(self._answer(loop, batch))
        self._sending.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._sending.discard)

    async def _answer(self, loop: asyncio.AbstractEventLoop,
                      batch: list[tuple[GcraStep, asyncio.Future[GcraResult]]]) -> None:
        try:
            results = await self._store.agcra_many([step for step, _ in batch], self._executor)
        except Exception as error:  # a store answers failures itself; this is a bug
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # not cancelled meanwhile
                    future.set_result(result)
        finally:
            self._send(loop)  # the next batch: everything asked meanwhile


def open_store(
    redis_url: str | None,
    timeout_s: float = 0.1,
    on_health_change: Callable[[bool], None] | None = None,
) -> LimitStore:
    """The store a server uses: Redis when a URL is configured, else this process's."""
    if redis_url:
        return RedisStore(redis_url, timeout_s, on_health_change=on_health_change)
    return LocalStore()


@lru_cache(maxsize=1024)
def _steps(requests: int, period_s: float, burst: int) -> tuple[int, int]:
    """(T, burst*T) in whole microseconds; T rounded up, so never looser than asked."""
    if requests < 1 or burst < 1:
        raise ValueError("a rate limit needs at least 1 request and a burst of 1")
    period_us = round(period_s * MICROS)
    if period_us < requests:
        raise ValueError(f"cannot keep {requests} requests per {period_s} s: "
                         "at most one request per microsecond")
    interval = -(-period_us // requests)
    return interval, interval * burst


class RateLimiter:
    """Per-key limits (`requests` per `period_s`) over a LimitStore; one GCRA step a check.

    `check` runs the step where it is called; `acheck`, for an event loop, runs
    a remote store's steps in batches on `executor` (GcraBatcher) and a local
    store's at once.
    """

    def __init__(self, store: LimitStore | None = None, namespace: str = "token",
                 executor: Executor | None = None) -> None:
        self.store = store if store is not None else LocalStore()
        self.namespace = namespace
        self._batcher = GcraBatcher(self.store, executor) if self.store.remote else None

    @property
    def healthy(self) -> bool:
        return self.store.healthy

    def check(
        self,
        key: str,
        requests: int,
        period_s: float,
        cost: int = 1,
        burst: int | None = None,
    ) -> Decision:
        """Counts `cost` calls for `key` if they fit; a refused call counts nothing.

        `key` is an id, never a secret (a token id, a lookup id, an address).
        `burst` defaults to default_burst(requests); `cost=0` only asks.
        Never raises for a store that is out of reach.
        """
        step = self._step(key, requests, period_s, cost, burst)
        return _decision(requests, step, self.store.gcra(*step))

    async def acheck(
        self,
        key: str,
        requests: int,
        period_s: float,
        cost: int = 1,
        burst: int | None = None,
    ) -> Decision:
        """check() from an event loop: never waits on the network on the loop's thread."""
        step = self._step(key, requests, period_s, cost, burst)
        if self._batcher is None:
            return _decision(requests, step, self.store.gcra(*step))
        return _decision(requests, step, await self._batcher.gcra(step))

    def charge(self, key: str, requests: int, period_s: float, count: int,
               burst: int | None = None) -> None:
        """Counts `count` calls answered without a check (a consumer's cache), now.

        May wait on the network: from an event loop, call it on an executor.
        """
        if count > 0:
            self.store.charge(*self._step(key, requests, period_s, count, burst))

    def _step(self, key: str, requests: int, period_s: float, cost: int,
              burst: int | None) -> GcraStep:
        if cost < 0:
            raise ValueError("cost must not be negative")
        interval, span = _steps(requests, period_s, burst or default_burst(requests))
        return GcraStep(self.namespace, key, interval, span, cost)


def _decision(requests: int, step: GcraStep, result: GcraResult) -> Decision:
    allowed, ahead, retry = result
    interval, span = step.interval_us, step.span_us
    burst_left = max(0, (span - ahead) // interval)
    counted = -(-ahead // interval)  # calls not yet paid back, this one included
    return Decision(
        allowed,
        requests,
        max(0, requests - counted) if burst_left else 0,
        ahead / MICROS,
        retry / MICROS,
        burst_left,
    )
