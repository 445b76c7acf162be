"""A consumer's cache of Authenticate's answers, kept safe by a lease (WatchTokenEvents).

    cache = LeaseCache("tokens.internal:50051", token=VERIFY_TOKEN)   # api_token:verify
    server = grpc.server(pool, interceptors=[AuthInterceptor(TARGET, SCOPES, cache=cache)])

The cache answers a repeated token from memory, and still refuses it once a
RevokeToken (or any change narrowing it) has returned:

- it keeps one WatchTokenEvents stream open and renews a lease on it every
  third of the lease; a lease granted in reply to a Renew holds until the time
  the Renew was *sent* plus its duration, so it ends before the server's bound;
- it answers from memory only while the lease holds and the token's own
  expiry has not passed; otherwise the caller asks Authenticate, as without a
  cache;
- every narrowing change reaches it as an Invalidate, which it applies before
  it acknowledges it, and the change returns only after that ack (or after the
  lease ran out, for a consumer that stopped answering);
- an answer fetched before an Invalidate (or a lost stream, or a lapsed lease)
  is never stored after it: `ticket()` before the call, `put(..., ticket)`
  after;
- a lost stream drops everything, and so does a lease that lapsed before the
  next one came;
- uses answered from memory are reported in batches, so `last_used_at` and
  rate limits still see them; a token with a rate limit is answered from
  memory only within the cache budget its last Authenticate promised
  (`rate_limit.cache_budget`, spent within CACHE_BUDGET_SECONDS), then asked
  again, with the uses answered so far reported first.

`LeaseCache` runs the stream on a background thread (for `grpc.server` and
plain code); `AsyncLeaseCache` runs it as a task on the event loop (for
`grpc.aio.server`). Both share `_LeaseState`, which does no I/O.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2

from tokenservice.v1 import token_service_pb2 as pb

from .aio import AsyncTokenServiceClient
from .client import TokenServiceClient
from .principal import ASK_CACHE_BUDGET, Principal

__all__ = ["AsyncLeaseCache", "CacheStats", "LeaseCache"]

log = logging.getLogger("tokenservice_client.lease")

# Until the server's lease length is known, renew this often.
FIRST_RENEW_SECONDS = 0.5
MIN_RENEW_SECONDS = 0.05
USAGE_REPORT_SECONDS = 1.0
# A cache budget is spent within this long of its Authenticate, or asked for
# again: the server holds its promise a little longer, so the uses reported
# (every second) are counted while it holds.
CACHE_BUDGET_SECONDS = 2.0
BACKOFF_FIRST_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0
# The protocol's longest lease: a longer one from a broken (or impostor) server
# is cut to this, so no answer is kept past it without a renewal.
MAX_LEASE_SECONDS = 5.0
# Renews awaiting their Lease that are remembered: a server that answers none
# costs no more than this.
MAX_RENEWS_REMEMBERED = 64
# Entries in one UsageReport: a consumer answering more distinct tokens than
# this in a second sends several reports, each well under the server's 64 KiB
# request limit (an entry is about 60 bytes).
MAX_USES_PER_REPORT = 500


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made: what it answered and what it had to let through."""

    hits: int
    misses: int
    entries: int
    invalidations: int
    leased: bool


class _LeaseState:
    """The entries, the lease and the invalidation generation, behind one lock; no I/O.

    Every change that could make an answer unusable bumps `_generation`: an
    Invalidate applied, the stream lost, a lease that lapsed before the next.
    `put()` stores an answer only if the generation is the one its `ticket()`
    saw, and the lease held then and holds now.
    """

    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._clock = clock
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        # HMAC of the raw token -> [principal, expiry as a POSIX time or None,
        # uses it may still answer (its budget; None: no rate limit), until when
        # it may spend them (on `clock`)].
        self._entries: collections.OrderedDict[bytes, list[Any]] = collections.OrderedDict()
        self._by_token: dict[str, set[bytes]] = {}
        self._by_user: dict[str, set[bytes]] = {}
        self._lease_until = 0.0  # on `clock`; 0: no lease
        self._lease_seconds = 0.0  # the last duration granted
        self._generation = 0
        self._renew_ids = itertools.count(1)
        self._renews_sent: dict[int, float] = {}
        self._uses: dict[str, list[Any]] = {}  # token id -> [count, last POSIX time]
        self._hits = 0
        self._misses = 0
        self._invalidations = 0
        # Test hook: a frozen cache neither renews nor reads nor acks.
        self._thawed = threading.Event()
        self._thawed.set()

    # The request path.

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode(), hashlib.sha256).digest()

    def get(self, token: str) -> Principal | None:
        """The cached principal, while the lease holds, the token has not expired and
        its budget slice is not spent."""
        if self._clock() >= self._lease_until:
            self._misses += 1
            return None
        key = self._digest(token)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or self._clock() >= self._lease_until:
                self._misses += 1
                return None
            principal, expires, budget, budget_until = entry
            now = time.time()
            if expires is not None and now >= expires:
                self._remove(key)
                self._misses += 1
                return None
            if budget is not None and (budget <= 0 or self._clock() >= budget_until):
                # Its slice is spent: Authenticate decides again, once the uses
                # answered here are on their way to be counted.
                spent = True
                self._misses += 1
                principal = None
            else:
                if budget is not None:
                    entry[2] = budget - 1
                spent = budget == 1
                self._entries.move_to_end(key)
                self._hits += 1
                use = self._uses.get(principal.token_id)
                if use is None:
                    self._uses[principal.token_id] = [1, now]
                else:
                    use[0] += 1
                    use[1] = now
        if spent:
            self._report_soon()
        return principal

    def ticket(self) -> int | None:
        """Take before calling Authenticate; hand to put(). None: the answer may not be kept."""
        with self._lock:
            return self._generation if self._clock() < self._lease_until else None

    def put(self, token: str, principal: Principal, ticket: int | None = None) -> None:
        """Stores an answer unless something that could have changed it happened since ticket().

        `principal` is Authenticate's answer as it came, rate limit standing
        included: its budget slice is how many uses the entry may answer. The
        stored answer carries no standing (a cached use is no Authenticate call).
        """
        if ticket is None:
            return
        expires = None if principal.expires_at is None else principal.expires_at.timestamp()
        budget = None if principal.rate_limit is None else principal.rate_limit.cache_budget
        if budget is not None and budget <= 0:
            return  # nothing it could answer
        principal = dataclasses.replace(principal, rate_limit=None)
        key = self._digest(token)
        with self._lock:
            if ticket != self._generation or self._clock() >= self._lease_until:
                return
            self._remove(key)
            self._entries[key] = [principal, expires, budget,
                                  self._clock() + CACHE_BUDGET_SECONDS]
            self._by_token.setdefault(principal.token_id, set()).add(key)
            self._by_user.setdefault(principal.user_id, set()).add(key)
            while len(self._entries) > self._max_entries:
                self._remove(next(iter(self._entries)))

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        principal = entry[0]
        for index, owner in (
            (self._by_token, principal.token_id), (self._by_user, principal.user_id)
        ):
            keys = index.get(owner)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[owner]

    def _clear(self) -> None:
        self._entries.clear()
        self._by_token.clear()
        self._by_user.clear()
        self._generation += 1

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def stats(self) -> CacheStats:
        return CacheStats(
            self._hits, self._misses, len(self._entries), self._invalidations,
            self._clock() < self._lease_until,
        )

    @property
    def leased(self) -> bool:
        return self._clock() < self._lease_until

    def __len__(self) -> int:
        return len(self._entries)

    # The stream: what the drivers send and how they apply what they receive.

    def _renew(self) -> pb.WatchTokenEventsRequest:
        """A Renew; its send time is taken now, so the lease counts from no later than the send."""
        renew_id = next(self._renew_ids)
        with self._lock:
            self._renews_sent[renew_id] = self._clock()
            while len(self._renews_sent) > MAX_RENEWS_REMEMBERED:
                del self._renews_sent[next(iter(self._renews_sent))]
        return pb.WatchTokenEventsRequest(renew=pb.Renew(id=renew_id))

    def _renew_every(self) -> float:
        if self._lease_seconds <= 0:
            return FIRST_RENEW_SECONDS
        return max(MIN_RENEW_SECONDS, self._lease_seconds / 3)

    def _report_soon(self) -> None:
        """Sends the usage report now rather than at the next tick (a slice was spent)."""

    def _usage(self) -> list[pb.WatchTokenEventsRequest]:
        """The uses answered since the last call, as reports of at most MAX_USES_PER_REPORT."""
        with self._lock:
            uses, self._uses = self._uses, {}
        reports: list[pb.WatchTokenEventsRequest] = []
        for token_id, (count, last) in uses.items():
            if not reports or len(reports[-1].usage.uses) >= MAX_USES_PER_REPORT:
                reports.append(pb.WatchTokenEventsRequest(usage=pb.UsageReport()))
            use = reports[-1].usage.uses.add(token_id=token_id, count=count)
            use.last_used_at.CopyFrom(_timestamp(last))
        return reports

    def _apply(self, event: pb.TokenEvent) -> pb.WatchTokenEventsRequest | None:
        """Applies one event; returns the Ack to send after it, if any."""
        kind = event.WhichOneof("kind")
        if kind == "invalidate":
            with self._lock:
                for token_id in event.invalidate.token_ids:
                    for key in list(self._by_token.get(token_id, ())):
                        self._remove(key)
                for user_id in event.invalidate.user_ids:
                    for key in list(self._by_user.get(user_id, ())):
                        self._remove(key)
                self._generation += 1
                self._invalidations += 1
            return pb.WatchTokenEventsRequest(ack=pb.Ack(sequence=event.sequence))
        if kind == "lease":
            lease = event.lease
            duration = min(lease.duration.ToNanoseconds() / 1e9, MAX_LEASE_SECONDS)
            with self._lock:
                sent = self._renews_sent.pop(lease.renew_id, None)
                for older in [i for i in self._renews_sent if i < lease.renew_id]:
                    del self._renews_sent[older]
                if sent is None or duration <= 0:
                    return None
                if self._clock() >= self._lease_until:
                    # No lease since some moment: events may have been missed
                    # by nobody, but answers fetched then are not kept.
                    self._clear()
                self._lease_until = max(self._lease_until, sent + duration)
                self._lease_seconds = duration
        return None

    def _lost(self) -> None:
        """The stream is gone: nothing cached may be used, and nothing fetched so far kept."""
        with self._lock:
            self._lease_until = 0.0
            self._renews_sent.clear()
            self._clear()

    # Test hooks.

    def freeze(self) -> None:
        """Stops renewing, reading and acking, as if the process were stopped (for tests)."""
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()


def _timestamp(posix: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(posix * 1e9))
    return ts


def _backoff(previous: float) -> float:
    return BACKOFF_FIRST_SECONDS if previous <= 0 else min(previous * 2, BACKOFF_MAX_SECONDS)


class LeaseCache(_LeaseState):
    """The cache for threads: a background thread keeps the stream.

    `tokenservice` is a target or a `TokenServiceClient`; `token` a token
    holding `api_token:verify`, sent on the stream. The other keyword arguments
    are TokenServiceClient's (credentials, `insecure`, `channel`).
    """

    def __init__(
        self,
        tokenservice: str | TokenServiceClient,
        token: str | None = None,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        **client_options: Any,
    ) -> None:
        super().__init__(max_entries, clock)
        self._owns_client = isinstance(tokenservice, str)
        self._client = (
            TokenServiceClient(tokenservice, token, **client_options)
            if isinstance(tokenservice, str) else tokenservice
        )
        self._closed = threading.Event()
        self._call: Any = None
        self._outgoing: queue.SimpleQueue[pb.WatchTokenEventsRequest | None] | None = None
        self._thread = threading.Thread(target=self._run, name="tokenservice-lease", daemon=True)
        self._thread.start()

    def authenticate(self, token: str, *, timeout: float | None = None) -> Principal:
        """The cached answer, or Authenticate's (kept if allowed); raises like the client."""
        hit = self.get(token)
        if hit is not None:
            return hit
        ticket = self.ticket()
        principal = self._client.authenticate_principal(
            token, timeout=timeout, metadata=ASK_CACHE_BUDGET
        )
        self.put(token, principal, ticket)
        return principal

    def _report_soon(self) -> None:
        outgoing = self._outgoing
        if outgoing is not None:
            for usage in self._usage():
                outgoing.put(usage)

    def wait_leased(self, timeout: float) -> bool:
        """Blocks until a lease holds (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while not self.leased:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def disconnect(self) -> None:
        """Breaks the current stream, as a network fault would (for tests); it reconnects."""
        call = self._call
        if call is not None:
            call.cancel()

    def close(self) -> None:
        """Drops the cache, then ends the stream from this side: the server stops waiting
        for this consumer at once (it would wait out the lease after a mere disconnect)."""
        self._closed.set()
        self._thawed.set()
        self._lost()
        outgoing = self._outgoing
        if outgoing is not None:
            outgoing.put(None)  # the end of what we send: the server ends the stream
        self._thread.join(timeout=2)
        if self._thread.is_alive():
            self.disconnect()
            self._thread.join(timeout=10)
        if self._owns_client:
            self._client.close()

    def _run(self) -> None:
        backoff = 0.0
        while not self._closed.is_set():
            outgoing: queue.SimpleQueue[pb.WatchTokenEventsRequest | None] = queue.SimpleQueue()
            self._outgoing = outgoing
            try:
                self._call = self._client.watch_token_events(self._requests(outgoing))
                for event in self._call:
                    self._thawed.wait()
                    if self._closed.is_set():
                        break
                    ack = self._apply(event)
                    if ack is not None:
                        outgoing.put(ack)
                    if event.HasField("lease"):
                        backoff = 0.0
            except grpc.RpcError as err:
                if not self._closed.is_set():
                    log.info("token events stream lost: %s", _code(err))
            finally:
                self._lost()  # before our side ends: see close()
                outgoing.put(None)
                if self._call is not None:
                    self._call.cancel()
                self._call = None
            backoff = _backoff(backoff)
            self._closed.wait(backoff)

    def _requests(
        self, outgoing: queue.SimpleQueue[pb.WatchTokenEventsRequest | None]
    ) -> Iterator[pb.WatchTokenEventsRequest]:
        """What the stream sends: Renews on time, Acks as they come, usage every second."""
        next_renew = 0.0
        next_usage = time.monotonic() + USAGE_REPORT_SECONDS
        while True:
            now = time.monotonic()
            wait = max(0.0, min(next_renew, next_usage) - now)
            try:
                item = outgoing.get(timeout=wait) if wait > 0 else outgoing.get_nowait()
            except queue.Empty:
                item = None
                if not self._thawed.is_set():
                    self._thawed.wait()
                    continue
                now = time.monotonic()
                if now >= next_renew:
                    next_renew = now + self._renew_every()
                    yield self._renew()
                if now >= next_usage:
                    next_usage = now + USAGE_REPORT_SECONDS
                    yield from self._usage()
                continue
            if item is None:
                return
            self._thawed.wait()
            yield item


class AsyncLeaseCache(_LeaseState):
    """The cache for asyncio: a task on the running loop keeps the stream.

    Create it (or call `start()`) inside the loop that serves; the arguments
    are LeaseCache's, with an AsyncTokenServiceClient where that takes a client.
    """

    def __init__(
        self,
        tokenservice: str | AsyncTokenServiceClient,
        token: str | None = None,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        **client_options: Any,
    ) -> None:
        super().__init__(max_entries, clock)
        self._target = tokenservice if isinstance(tokenservice, str) else None
        self._token = token
        self._options = client_options
        self._client: AsyncTokenServiceClient | None = (
            None if isinstance(tokenservice, str) else tokenservice
        )
        self._task: asyncio.Task[None] | None = None
        self._call: Any = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._report_now = asyncio.Event()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started later, from the loop (the interceptor does it)
        self.start()

    def start(self) -> None:
        """Starts the stream's task on the running loop (once)."""
        if self._task is None:
            if self._client is None:
                assert self._target is not None
                self._client = AsyncTokenServiceClient(self._target, self._token, **self._options)
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run())

    async def authenticate(self, token: str, *, timeout: float | None = None) -> Principal:
        hit = self.get(token)
        if hit is not None:
            return hit
        self.start()
        assert self._client is not None
        ticket = self.ticket()
        principal = await self._client.authenticate_principal(
            token, timeout=timeout, metadata=ASK_CACHE_BUDGET
        )
        self.put(token, principal, ticket)
        return principal

    def _report_soon(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._report_now.set()
        else:
            loop.call_soon_threadsafe(self._report_now.set)

    async def wait_leased(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.leased:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def disconnect(self) -> None:
        call = self._call
        if call is not None:
            call.cancel()

    async def close(self) -> None:
        """Drops the cache, ends the stream from this side (see LeaseCache.close), stops."""
        self._closed = True
        self._thawed.set()
        self._lost()
        call = self._call
        if call is not None and self._task is not None:
            try:
                await asyncio.wait_for(call.done_writing(), 1)
                await asyncio.wait_for(asyncio.shield(self._task), 2)
            except (TimeoutError, grpc.RpcError, asyncio.CancelledError):
                pass
            except Exception:  # noqa: BLE001 - the stream may already be gone
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._client is not None and self._target is not None:
            await self._client.close()

    async def _frozen(self) -> None:
        while not self._thawed.is_set():
            await asyncio.sleep(0.01)

    async def _run(self) -> None:
        assert self._client is not None
        backoff = 0.0
        while not self._closed:
            call = self._call = self._client.watch_token_events()
            # One writer at a time on a call: acks from here, the rest from _tick.
            writing = asyncio.Lock()
            ticker = asyncio.create_task(self._tick(call, writing))
            try:
                while True:
                    event = await call.read()
                    if event is grpc.aio.EOF:
                        break
                    await self._frozen()
                    ack = self._apply(event)
                    if ack is not None:
                        async with writing:
                            await call.write(ack)
                    if event.HasField("lease"):
                        backoff = 0.0
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed or (task is not None and task.cancelling()):
                    raise
                # disconnect() cancelled the call, not us: reconnect.
            except grpc.RpcError as err:
                if not self._closed:
                    log.info("token events stream lost: %s", _code(err))
            except Exception:  # noqa: BLE001 - a write on a call that ended
                pass
            finally:
                ticker.cancel()
                self._lost()
                call.cancel()
                self._call = None
            backoff = _backoff(backoff)
            await asyncio.sleep(backoff)

    async def _tick(self, call: Any, writing: asyncio.Lock) -> None:
        """Renews on time and reports usage every second, or at once when a slice is spent."""
        loop = asyncio.get_running_loop()
        next_renew = 0.0
        next_usage = loop.time() + USAGE_REPORT_SECONDS
        try:
            while True:
                try:
                    await asyncio.wait_for(
                        self._report_now.wait(),
                        max(0.0, min(next_renew, next_usage) - loop.time()),
                    )
                except TimeoutError:
                    pass
                await self._frozen()
                now = loop.time()
                report_now = self._report_now.is_set()
                self._report_now.clear()
                if now >= next_renew:
                    next_renew = now + self._renew_every()
                    async with writing:
                        await call.write(self._renew())
                if now >= next_usage or report_now:
                    next_usage = now + USAGE_REPORT_SECONDS
                    for usage in self._usage():
                        async with writing:
                            await call.write(usage)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - any failure to write ends this stream
            call.cancel()  # the reader sees the stream end, and reconnects


def _code(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    return code.name if code is not None else type(err).__name__
