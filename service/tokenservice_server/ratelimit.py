"""Rate limits and failure throttles: one algorithm each, kept in process or shared through Redis.

Per-token limits count calls in a sliding window cut into slices. A limit of
`requests` per `period` cuts the period into WINDOW_SLICES slices of width
`w = ceil(period / WINDOW_SLICES)`; each key keeps a count per slice, and a
call is let through when the calls counted in the slices the last `period`
touches (the current slice and the WINDOW_SLICES before it), plus this one,
come to at most `requests`. So:

* a token may make all of its `requests` at once (a rested 100/10s token
  answers 100 calls in a row, the 101st is refused);
* in any window of `period` a token gets at most `requests` calls: the limit
  is never exceeded, there is no slack above it. The price is on the other
  side: a call keeps counting until its slice has left the window, between
  `period` and `period + w` after it, so a refused caller may wait up to a
  tenth of the period longer than an exact log would make it;
* `remaining` is exactly the calls left in the window after this one
  (`requests` less the calls counted), `reset_after_s` when every counted call
  has left the window (remaining back at `requests`), and `retry_after_s`, for
  a refused call, when enough of the oldest have left for it to fit.

Why not the alternatives: a log of every call is exact but keeps up to
`requests` timestamps per key (600 for 600/60s, a million for the bench's
1000000/1s); fixed windows let twice the limit through around a window's
edge; a token bucket or GCRA (redis-cell's) either refuses a burst the limit
allows or lets through nearly twice `requests` in a window (a full bucket,
then its refill). Eleven small counters per key keep the bound exact at a
fixed cost.

A consumer that caches Authenticate's answers (a lease cache) may ask for a
cache budget: up to a tenth of the limit (CACHE_SLICE_DIVISOR) of uses it may
answer from memory before it asks again, spent within two seconds. The key
keeps the uses promised, per second, for PROMISE_BUCKETS seconds, and counts
them like calls: a call or a promise fits only when the calls counted and the
uses still promised leave room for it. The consumer's usage reports take the
uses off the oldest promises and count them in the window, and count no more
than was promised (a report naming someone else's token cannot drain its
limit). So the limit holds whatever the caches do, as long as they report in
time: every use is counted or promised, and a promise a cache leaves unspent
only holds its room for a few seconds. The slack: a cache that stalls for
more than about two seconds between answering uses and reporting them lets
its promise lapse first, and those uses (at most its budget) go uncounted.

The failure throttles (throttle.py) are token buckets: a level and a time.

Two stores run the same steps: LocalStore in this process (a bounded LRU
behind a lock, timed by an injectable clock) and RedisStore, one Lua script
per check (EVALSHA, EVAL on NOSCRIPT) timed by Redis's own clock so replicas
with skewed clocks agree. Redis keys start with `tokenservice:rl:`, hold a
hash of the caller's id (never a token secret, never a client address in
clear) and expire by themselves once the key is as good as absent. Redis
failing or slower than its timeout never reaches the caller: the check runs
on the RedisStore's own LocalStore instead (per-process counters: fail open
for the shared budget, never unlimited), the store reports itself unhealthy,
and Redis is tried again after a short back-off.

From an event loop, RateLimiter.acheck never waits on the loop's thread: a
WindowBatcher gathers the checks asked while a batch is out and sends them as
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
# A period is cut into this many slices: a call counts until its slice leaves
# the window, between one period and one period and a slice after it.
WINDOW_SLICES = 10
# A lease cache is promised at most this fraction of the limit (rounded up) a call.
CACHE_SLICE_DIVISOR = 10
# A promise holds for PROMISE_BUCKETS seconds (kept per second): a cache spends
# its budget within two seconds of getting it and reports every second, so its
# uses reach the server while the promise holds; one it abandons lapses soon.
PROMISE_BUCKET_US = 1_000_000
PROMISE_BUCKETS = 4
MICROS = 1_000_000


def cache_slice(requests: int) -> int:
    """The most uses a key promises to caching consumers at once: a tenth of its limit."""
    return max(1, -(-requests // CACHE_SLICE_DIVISOR))


class Decision(NamedTuple):
    """One check's answer, in the terms of RetryInfo and the RateLimit-* headers.

    A NamedTuple, not a frozen dataclass: it is built on every Authenticate, and
    a tuple costs a third as much to build.
    """

    allowed: bool
    # The configured `requests` per period.
    limit: int
    # The calls left in the window after this one: `limit` less the calls counted.
    remaining: int
    # Seconds until every counted call has left the window (remaining back at limit).
    reset_after_s: float
    # Refused: seconds until the same call would be let through. Allowed: 0.
    retry_after_s: float
    # The uses a caching consumer may answer from memory (asked for: else 0).
    cache_budget: int


class WindowStep(NamedTuple):
    """One check asked of a store: the key, its window and what the call asks."""

    namespace: str
    key: str
    width_us: int  # one slice of the window
    slices: int  # slices per period
    limit: int  # calls per period
    cost: int  # calls this check counts (0: only asks)
    promise_max: int  # the most uses to promise a caching consumer (0: none asked)


class WindowResult(NamedTuple):
    """A store's answer, in whole microseconds."""

    allowed: bool
    # Calls counted in the window: after this one if allowed, before it if refused.
    count: int
    # Refused: how long until the call would fit. Allowed: 0.
    retry_us: int
    # How long until every counted call has left the window (0: none counted).
    reset_us: int
    # Uses promised to the caller's cache by this check.
    promised: int


class WindowState(NamedTuple):
    """A key's state: calls per slice index, and uses promised to caches per second."""

    counts: dict[int, int]
    promises: dict[int, int]


EMPTY = WindowState({}, {})


def _live(state: WindowState, now: int, width: int, slices: int
          ) -> tuple[dict[int, int], dict[int, int]]:
    """The counts still in the window at `now`, and the promises still holding."""
    oldest = now // width - slices
    counts = {j: c for j, c in state.counts.items() if j >= oldest and c > 0}
    first = now // PROMISE_BUCKET_US - PROMISE_BUCKETS + 1
    promises = {k: p for k, p in state.promises.items() if k >= first and p > 0}
    return counts, promises


def _drops(counts: dict[int, int], promises: dict[int, int], width: int, slices: int
           ) -> list[tuple[int, int]]:
    """(when, how many): the moments counted calls leave the window and promises lapse."""
    events = [((j + slices + 1) * width, c) for j, c in counts.items()]
    events += [((k + PROMISE_BUCKETS) * PROMISE_BUCKET_US, p) for k, p in promises.items()]
    return sorted(events)


def _latest(counts: dict[int, int], promises: dict[int, int], width: int, slices: int) -> int:
    """When the last counted call leaves the window and the last promise lapses (0: none)."""
    latest = (max(counts) + slices + 1) * width if counts else 0
    if promises:
        latest = max(latest, (max(promises) + PROMISE_BUCKETS) * PROMISE_BUCKET_US)
    return latest


def window_step(state: WindowState, now: int, step: WindowStep
                ) -> tuple[WindowResult, WindowState]:
    """One check: the result and the key's new state.

    A call fits when the calls counted, the uses promised to caches and this
    one come to at most the limit. The Lua script in RedisStore is this
    function, line for line.
    """
    width, slices, limit, cost = step.width_us, step.slices, step.limit, step.cost
    counts, promises = _live(state, now, width, slices)
    total, promised = sum(counts.values()), sum(promises.values())
    if total + promised + cost > limit:
        need, dropped, retry = total + promised + cost - limit, 0, (slices + 1) * width
        drops = _drops(counts, promises, width, slices)
        for when, amount in drops:  # the oldest leave first
            dropped += amount
            if dropped >= need:
                retry = when - now
                break
        reset = drops[-1][0] - now if drops else 0
        return WindowResult(False, total + promised, retry, reset, 0), WindowState(counts, promises)
    if cost > 0:
        current = now // width
        counts[current] = counts.get(current, 0) + cost
        total += cost
    granted = 0
    if step.promise_max > 0:
        granted = max(0, min(step.promise_max, limit - total - promised))
        if granted:
            second = now // PROMISE_BUCKET_US
            promises[second] = promises.get(second, 0) + granted
            promised += granted
    latest = _latest(counts, promises, width, slices)  # no sort on the allowed path
    reset = latest - now if latest else 0
    return WindowResult(True, total + promised, 0, reset, granted), WindowState(counts, promises)


def window_charge(state: WindowState, now: int, width: int, slices: int, count: int
                  ) -> tuple[int, WindowState]:
    """Counts uses a consumer answered from its cache, now: at most the uses promised.

    Never refused: they happened. They come off the oldest promises and count
    in the current slice, so the window holds them for a period from the
    report. A report of more than was promised (a consumer that ignored its
    budget, or one naming another's token to drain its limit) counts only
    what was promised: a watcher cannot push a token over its limit.
    Returns the uses counted and the new state.
    """
    counts, promises = _live(state, now, width, slices)
    counted = 0
    for second in sorted(promises):
        take = min(promises[second], count - counted)
        promises[second] -= take
        counted += take
        if counted >= count:
            break
    promises = {k: p for k, p in promises.items() if p > 0}
    if counted:
        current = now // width
        counts[current] = counts.get(current, 0) + counted
    return counted, WindowState(counts, promises)


class LimitStore(ABC):
    """Where limits and throttles keep their state: this process, or Redis.

    `namespace` separates the users of one store (per-token limits, per-client
    and per-lookup throttles); `key` is the caller's id within it.
    """

    # True when a call may wait on the network (Redis): an event loop must not
    # make it on its own thread.
    remote = False

    @abstractmethod
    def window(self, step: WindowStep) -> WindowResult:
        """One sliding-window check (window_step)."""

    def window_many(self, steps: Sequence[WindowStep]) -> list[WindowResult]:
        """Several checks, in order, as one unit of work (one round trip to Redis)."""
        return [self.window(step) for step in steps]

    @abstractmethod
    def charge(self, namespace: str, key: str, width_us: int, slices: int,
               count: int) -> None:
        """Counts `count` calls made without a check (window_charge)."""

    async def awindow_many(self, steps: Sequence[WindowStep],
                           executor: Executor | None = None) -> list[WindowResult]:
        """window_many() from an event loop: on `executor` when it may wait, else at once."""
        if not self.remote:
            return self.window_many(steps)
        return await asyncio.get_running_loop().run_in_executor(
            executor, self.window_many, steps
        )

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

    def window(self, step: WindowStep) -> WindowResult:
        with self._lock:
            now = round(self._clock() * MICROS)
            table = self._table(step.namespace)
            result, state = window_step(table.get(step.key, EMPTY), now, step)
            if step.cost > 0 or result.promised:
                table[step.key] = state
                table.move_to_end(step.key)
                self._trim(table)
            return result

    def charge(self, namespace: str, key: str, width_us: int, slices: int,
               count: int) -> None:
        with self._lock:
            now = round(self._clock() * MICROS)
            table = self._table(namespace)
            _, table[key] = window_charge(table.get(key, EMPTY), now, width_us, slices, count)
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
# The window script takes any number of keys, each with its five arguments, and
# checks them in order (a key named twice sees its first check): one script for
# a single check and for a batch. A key is a hash: one field per slice index
# ('%d'), 'p' the uses promised, 'u' until when (microseconds).
# Numbers leave Lua as strings ('%.17g', '%d'): Lua's default formatting keeps
# only 14 digits, too few for microseconds since 1970.

_WINDOW_READ_LUA = """
local PBUCKET, PBUCKETS = 1000000, 4

local function read(key, now, width, slices)
  local oldest = math.floor(now / width) - slices
  local first = math.floor(now / PBUCKET) - PBUCKETS + 1
  local raw = redis.call('HGETALL', key)
  local counts, promises, stale, total, promised = {}, {}, {}, 0, 0
  for k = 1, #raw, 2 do
    local f, v = raw[k], tonumber(raw[k + 1])
    if string.sub(f, 1, 1) == 'p' then
      local b = tonumber(string.sub(f, 2))
      if b >= first and v > 0 then
        promises[b] = v
        promised = promised + v
      else
        stale[#stale + 1] = f
      end
    else
      local j = tonumber(f)
      if j >= oldest and v > 0 then
        counts[j] = v
        total = total + v
      else
        stale[#stale + 1] = f
      end
    end
  end
  -- Dropped now, before anything is written: a field written below may have the
  -- name of one that read as spent.
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return counts, promises, total, promised
end

local function drops(counts, promises, width, slices)
  local out = {}
  for j, c in pairs(counts) do
    if c > 0 then out[#out + 1] = {(j + slices + 1) * width, c} end
  end
  for b, p in pairs(promises) do
    if p > 0 then out[#out + 1] = {(b + PBUCKETS) * PBUCKET, p} end
  end
  table.sort(out, function(x, y) return x[1] < y[1] end)
  return out
end

local function latest(counts, promises, width, slices)
  local last = 0
  for j, c in pairs(counts) do
    if c > 0 then last = math.max(last, (j + slices + 1) * width) end
  end
  for b, p in pairs(promises) do
    if p > 0 then last = math.max(last, (b + PBUCKETS) * PBUCKET) end
  end
  return last
end

local function finish(key, now, last)
  if last > 0 then
    redis.call('PEXPIRE', key, math.ceil((last - now) / 1000) + 1)
  end
end
"""

_WINDOW_LUA = _WINDOW_READ_LUA + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local a = 5 * (i - 1)
  local width, slices = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local limit, cost, promise_max = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
                                   tonumber(ARGV[a + 5])
  local counts, promises, total, promised = read(key, now, width, slices)
  if total + promised + cost > limit then
    local need, dropped, retry = total + promised + cost - limit, 0, (slices + 1) * width
    local ds = drops(counts, promises, width, slices)
    for _, d in ipairs(ds) do
      dropped = dropped + d[2]
      if dropped >= need then
        retry = d[1] - now
        break
      end
    end
    local reset = 0
    if #ds > 0 then reset = ds[#ds][1] - now end
    out[#out + 1], out[#out + 2], out[#out + 3] = 0, total + promised, retry
    out[#out + 1], out[#out + 2] = reset, 0
  else
    local wrote = false
    if cost > 0 then
      local current = math.floor(now / width)
      redis.call('HINCRBY', key, string.format('%d', current), cost)
      counts[current] = (counts[current] or 0) + cost
      total = total + cost
      wrote = true
    end
    local granted = 0
    if promise_max > 0 then
      granted = math.max(0, math.min(promise_max, limit - total - promised))
      if granted > 0 then
        local b = math.floor(now / PBUCKET)
        redis.call('HINCRBY', key, 'p' .. string.format('%d', b), granted)
        promises[b] = (promises[b] or 0) + granted
        promised = promised + granted
        wrote = true
      end
    end
    local last = latest(counts, promises, width, slices)
    if wrote then finish(key, now, last) end
    local reset = 0
    if last > 0 then reset = last - now end
    out[#out + 1], out[#out + 2], out[#out + 3] = 1, total + promised, 0
    out[#out + 1], out[#out + 2] = reset, granted
  end
end
return out
"""

# window_charge, line for line.
_CHARGE_LUA = _WINDOW_READ_LUA + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local width, slices, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local counts, promises = read(KEYS[1], now, width, slices)
local order = {}
for b, _ in pairs(promises) do order[#order + 1] = b end
table.sort(order)
local counted = 0
for _, b in ipairs(order) do
  local take = math.min(promises[b], count - counted)
  if take > 0 then
    promises[b] = promises[b] - take
    counted = counted + take
    redis.call('HINCRBY', KEYS[1], 'p' .. string.format('%d', b), -take)
  end
  if counted >= count then break end
end
if counted == 0 then return 0 end
local current = math.floor(now / width)
redis.call('HINCRBY', KEYS[1], string.format('%d', current), counted)
counts[current] = (counts[current] or 0) + counted
finish(KEYS[1], now, latest(counts, promises, width, slices))
return counted
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


_WINDOW = _Script(_WINDOW_LUA)
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
        # The event loop's own connection (awindow_many): pipelined, no thread.
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

    def window(self, step: WindowStep) -> WindowResult:
        return self.window_many([step])[0]

    def charge(self, namespace: str, key: str, width_us: int, slices: int,
               count: int) -> None:
        if self._may_try():
            try:
                self._eval(_CHARGE, redis_key(namespace, key), width_us, slices, count)
            except self._errors as error:
                self._down(error)
            else:
                self._up()
                return
        self.fallback.charge(namespace, key, width_us, slices, count)

    def window_many(self, steps: Sequence[WindowStep]) -> list[WindowResult]:
        if not steps:
            return []
        if self._may_try():
            keys, args = _script_args(steps)
            try:
                flat = self._eval_keys(_WINDOW, keys, args)
            except self._errors as error:
                self._down(error)
            else:
                self._up()
                return _results(flat)
        return self.fallback.window_many(steps)

    async def awindow_many(self, steps: Sequence[WindowStep],
                           executor: Executor | None = None) -> list[WindowResult]:
        """window_many() on the event loop's own pipelined connection: no thread, no wait
        on the loop's thread; a failure or a timeout is answered by the fallback."""
        if steps and self._may_try():
            keys, args = _script_args(steps)
            try:
                flat = await self._aeval_keys(_WINDOW, keys, args)
            except self._aerrors as error:
                self._down(error)
            else:
                self._up()
                return _results(flat)
        return self.fallback.window_many(steps)

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


def _script_args(steps: Sequence[WindowStep]) -> tuple[list[str], list[int]]:
    keys = [redis_key(step.namespace, step.key) for step in steps]
    args = [n for s in steps for n in (s.width_us, s.slices, s.limit, s.cost, s.promise_max)]
    return keys, args


def _results(flat: Sequence[Any]) -> list[WindowResult]:
    return [
        WindowResult(bool(int(flat[i])), int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]),
                     int(flat[i + 4]))
        for i in range(0, len(flat), 5)
    ]


class WindowBatcher:
    """A store's window checks asked from an event loop, gathered into batches.

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
        self._pending: list[tuple[WindowStep, asyncio.Future[WindowResult]]] = []
        self._busy = False  # a batch is out, or about to be sent
        self._sending: set[asyncio.Task[None]] = set()

    async def window(self, step: WindowStep) -> WindowResult:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests run several): start afresh
            self._loop, self._pending, self._busy = loop, [], False
        future: asyncio.Future[WindowResult] = loop.create_future()
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
                      batch: list[tuple[WindowStep, asyncio.Future[WindowResult]]]) -> None:
        try:
            results = await self._store.awindow_many([step for step, _ in batch], self._executor)
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
def _width(requests: int, period_s: float) -> int:
    """One slice of the window in whole microseconds, rounded up: never looser than asked."""
    if requests < 1:
        raise ValueError("a rate limit needs at least 1 request")
    period_us = round(period_s * MICROS)
    if period_us < WINDOW_SLICES:
        raise ValueError(f"cannot keep a period of {period_s} s: at least "
                         f"{WINDOW_SLICES} microseconds")
    return -(-period_us // WINDOW_SLICES)


class RateLimiter:
    """Per-key limits (`requests` per `period_s`) over a LimitStore; one window check a call.

    `check` runs the check where it is called; `acheck`, for an event loop, runs
    a remote store's checks in batches on `executor` (WindowBatcher) and a local
    store's at once.
    """

    def __init__(self, store: LimitStore | None = None, namespace: str = "token",
                 executor: Executor | None = None) -> None:
        self.store = store if store is not None else LocalStore()
        self.namespace = namespace
        self._batcher = WindowBatcher(self.store, executor) if self.store.remote else None

    @property
    def healthy(self) -> bool:
        return self.store.healthy

    def check(
        self,
        key: str,
        requests: int,
        period_s: float,
        cost: int = 1,
        cache: bool = False,
    ) -> Decision:
        """Counts `cost` calls for `key` if they fit; a refused call counts nothing.

        `key` is an id, never a secret (a token id, a lookup id, an address).
        `cost=0` only asks. `cache`: the caller caches answers and asks for a
        cache budget (Decision.cache_budget). Never raises for a store that is
        out of reach.
        """
        step = self._step(key, requests, period_s, cost, cache)
        return _decision(requests, self.store.window(step))

    async def acheck(
        self,
        key: str,
        requests: int,
        period_s: float,
        cost: int = 1,
        cache: bool = False,
    ) -> Decision:
        """check() from an event loop: never waits on the network on the loop's thread."""
        step = self._step(key, requests, period_s, cost, cache)
        if self._batcher is None:
            return _decision(requests, self.store.window(step))
        return _decision(requests, await self._batcher.window(step))

    def charge(self, key: str, requests: int, period_s: float, count: int) -> None:
        """Counts `count` calls answered without a check (a consumer's cache), now.

        May wait on the network: from an event loop, call it on an executor.
        """
        if count > 0:
            self.store.charge(self.namespace, key, _width(requests, period_s),
                              WINDOW_SLICES, count)

    def _step(self, key: str, requests: int, period_s: float, cost: int,
              cache: bool) -> WindowStep:
        if cost < 0:
            raise ValueError("cost must not be negative")
        return WindowStep(self.namespace, key, _width(requests, period_s), WINDOW_SLICES,
                          requests, cost, cache_slice(requests) if cache else 0)


def _decision(requests: int, result: WindowResult) -> Decision:
    allowed, count, retry, reset, promised = result
    return Decision(
        allowed,
        requests,
        max(0, requests - count),
        reset / MICROS,
        retry / MICROS,
        promised,
    )
