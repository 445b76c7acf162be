"""Sharing a few hashing threads fairly: per-org, then per-client queues served in turn."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import RateLimited

T = TypeVar("T")

BUSY = "too many token verifications in progress"


@dataclass(frozen=True, slots=True)
class Claimant:
    """Whom a hash computation is for: the token's org and the client's address
    (or, for CreateToken, the calling token), and whether that client has failed
    to authenticate lately."""

    org: str
    client: str
    failing: bool = False


# Work with no one to charge it to (a command-line bootstrap, a test).
NOBODY = Claimant("", "")


@dataclass(eq=False, slots=True)
class _Job:
    claimant: Claimant
    work: Callable[[], Any]
    future: Future[Any]


class FairScheduler:
    """Runs jobs on `slots` threads, shared fairly between orgs and between clients.

    A flood from one client, or from many clients of one org, must not starve
    anyone else's first-time verifications, so:

    - jobs wait in a queue per client within a queue per org; a free thread
      takes the next job from the org served least recently, and within it from
      the client served least recently (an org with one job waiting is served as
      soon as one with a thousand, and a newcomer before a flood);
    - one client has at most `per_client` jobs waiting or running; more are
      refused at once (RateLimited), costing nobody else anything;
    - at most `max_waiting` jobs wait in all; when full, a newcomer takes the
      place of the last job of the org (then client) with the most waiting,
      which is refused instead: the flooder's, unless the newcomer is the flooder;
    - with two threads or more, the last free thread never goes to a client that
      has failed lately: however many wrong secrets are being checked, a client
      that has not failed starts at once rather than after somebody's bcrypt,
      while clients presenting good tokens may use every thread (a cold start
      after a restart runs at full speed).

    Orgs are served in turn but not capped or reserved for: an org is named by
    the token presented, and a lookup id is no secret, so a cap per org would
    let a stranger use up another org's share.
    """

    def __init__(
        self,
        slots: int,
        max_waiting: int,
        per_client: int,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.slots = slots
        # Told the jobs running or waiting whenever that changes (a metrics gauge).
        self._on_depth = on_depth
        self._max_waiting = max_waiting
        self._per_client = per_client
        self._reserve = 1 if slots >= 2 else 0
        self._lock = threading.Lock()
        # org -> client -> waiting jobs, in order of arrival at both levels.
        self._queues: OrderedDict[str, OrderedDict[str, deque[_Job]]] = OrderedDict()
        # When each org and each client in an org with jobs waiting or running was
        # last served (keys as in _keys()).
        self._served: dict[tuple[str, ...], int] = {}
        self._stamp = 0
        self._waiting = 0
        self._running = 0
        # Jobs waiting or running, per key of _keys().
        self._in_flight: dict[tuple[str, ...], int] = {}
        self._executor: ThreadPoolExecutor | None = None

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def submit(self, claimant: Claimant, work: Callable[[], T]) -> Future[T]:
        """Queues `work` for `claimant`; RateLimited when it may not wait.

        Cancelling the returned future before the work starts withdraws it.
        """
        job = _Job(claimant, work, Future())
        refused: _Job | None = None
        with self._lock:
            client = claimant.client
            if self._in_flight.get(("client", client), 0) >= self._per_client:
                raise RateLimited(BUSY, retry_after=1.0)
            if self._waiting >= self._max_waiting and not self._eligible(claimant):
                refused = self._longest_queue_tail(claimant)
                if refused is None:
                    raise RateLimited(BUSY, retry_after=1.0)
                self._withdraw(refused)
            self._enqueue(job)
            self._dispatch()
            self._report_depth()
        if refused is not None:
            with contextlib.suppress(InvalidStateError):  # its caller gave up meanwhile
                refused.future.set_exception(RateLimited(BUSY, retry_after=1.0))
        job.future.add_done_callback(lambda f: self._cancelled(job) if f.cancelled() else None)
        return job.future

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    # All below run with the lock held, except _run and _cancelled.

    def _enqueue(self, job: _Job) -> None:
        org = self._queues.setdefault(job.claimant.org, OrderedDict())
        org.setdefault(job.claimant.client, deque()).append(job)
        self._waiting += 1
        for key in self._keys(job.claimant):
            self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def _withdraw(self, job: _Job) -> None:
        """Takes a waiting job out of its queue (it will not run)."""
        org = self._queues[job.claimant.org]
        queue = org[job.claimant.client]
        queue.remove(job)
        if not queue:
            del org[job.claimant.client]
        if not org:
            del self._queues[job.claimant.org]
        self._waiting -= 1
        self._release(job.claimant)

    @staticmethod
    def _keys(claimant: Claimant) -> tuple[tuple[str, ...], ...]:
        """What a job counts against: its client (across orgs, for the cap), its org
        and its client within the org (for the turns)."""
        return (
            ("client", claimant.client),
            ("org", claimant.org),
            ("org-client", claimant.org, claimant.client),
        )

    def _release(self, claimant: Claimant) -> None:
        """A job is over (done, withdrawn or given up); an org or client with nothing
        left waiting or running loses its place in the turns."""
        for key in self._keys(claimant):
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]
                self._served.pop(key, None)

    def _longest_queue_tail(self, newcomer: Claimant) -> _Job | None:
        """The job to refuse so `newcomer` may wait: the last of the longest queue,
        org first, then client; None when the newcomer's own queue is that queue."""
        def size(org: OrderedDict[str, deque[_Job]]) -> int:
            return sum(len(q) for q in org.values())

        if not self._queues:
            return None
        org_name = max(self._queues, key=lambda name: size(self._queues[name]))
        org = self._queues[org_name]
        mine = self._queues.get(newcomer.org)
        if mine is not None and size(mine) >= size(org):
            org_name, org = newcomer.org, mine
        client = max(org, key=lambda name: len(org[name]))
        if org_name == newcomer.org and len(org.get(newcomer.client, ())) >= len(org[client]):
            return None
        return org[client][-1]

    def _eligible(self, claimant: Claimant) -> bool:
        """Whether a job of `claimant` may take a thread now."""
        free = self.slots - self._running
        return free > self._reserve or (free > 0 and not claimant.failing)

    def _next_job(self) -> _Job | None:
        """The next job in turn that may start now, taken out of its queue.

        In turn: the org served least recently, and in it the client served least
        recently; one not served since its queue last ran dry counts as never
        served, and ties go to the first to arrive. So a newcomer goes ahead of a
        flood, whose queue was served a moment ago.
        """
        served = self._served
        for org_name in sorted(self._queues, key=lambda o: served.get(("org", o), -1)):
            org = self._queues[org_name]
            for client in sorted(
                org, key=lambda c: served.get(("org-client", org_name, c), -1)
            ):
                queue = org[client]
                if not self._eligible(queue[0].claimant):
                    continue
                job = queue.popleft()
                self._stamp += 1
                served[("org", org_name)] = served[("org-client", org_name, client)] = self._stamp
                if not queue:
                    del org[client]
                if not org:
                    del self._queues[org_name]
                self._waiting -= 1
                return job
        return None

    def _dispatch(self) -> None:
        while self._running < self.slots:
            job = self._next_job()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                self._release(job.claimant)  # its caller gave up
                continue
            self._running += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.slots, thread_name_prefix="bcrypt")
            self._executor.submit(self._run, job)

    def _run(self, job: _Job) -> None:
        try:
            result = job.work()
        except BaseException as error:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
        finally:
            with self._lock:
                self._running -= 1
                self._release(job.claimant)
                self._dispatch()
                self._report_depth()

    def _cancelled(self, job: _Job) -> None:
        """A caller gave up before its job started: its place goes to someone else."""
        with self._lock:
            org = self._queues.get(job.claimant.org)
            if org is not None and job in org.get(job.claimant.client, ()):
                self._withdraw(job)
                self._report_depth()

    def _report_depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(self._running + self._waiting)
