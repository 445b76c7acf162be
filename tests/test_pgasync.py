"""Authenticate's read on the event loop (PostgreSQL): its pool through kills, stalls and load.

The pool itself is driven on a loop of the test's own with a few statements
of its own (a sleep stands in for a slow query); the service is driven over
gRPC. Every failure must be Unavailable with db.py's one fixed message, the
loop must keep serving other calls meanwhile, and the pool must come back by
itself and never hold more connections than it was given.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from conftest import RunningServer, bearer, make_config, start_server
from pgcluster import PgCluster, dbname_of

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice_server import db as dbmod
from tokenservice_server import pgasync
from tokenservice_server.errors import Unavailable

pytestmark = pytest.mark.postgres

STATEMENTS = {"one": "SELECT %s::int", "nap": "SELECT pg_sleep(%s::float8), 7"}
POOL_APP = "tokenservice" + pgasync.APPLICATION_SUFFIX


def _pool(url: str, size: int, on_lost: Callable[[], None] | None = None) -> pgasync.ReadPool:
    return pgasync.ReadPool(dbmod.postgres_params(url), size, STATEMENTS, on_lost)


def _pool_backends(cluster: PgCluster, url: str) -> list[int]:
    """Process ids of the pool's server connections, from PostgreSQL's own view."""
    rows = cluster.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
        (dbname_of(url), POOL_APP),
    )
    return [pid for (pid,) in rows]


def _kill_pool_backends(cluster: PgCluster, url: str) -> int:
    rows = cluster.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND application_name = %s", (dbname_of(url), POOL_APP),
    )
    return sum(1 for (ok,) in rows if ok)


async def _off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs the test's own blocking helper (psycopg2 to inspect the cluster) off the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _check(error: BaseException) -> None:
    assert isinstance(error, Unavailable), repr(error)
    assert str(error) == dbmod.UNAVAILABLE_MESSAGE


# The pool on its own.


def test_a_backend_killed_mid_query_fails_that_call_only_and_the_pool_reconnects(
    pg_cluster: PgCluster, pg_database_url: str
) -> None:
    lost: list[bool] = []

    async def scenario() -> None:
        pool = _pool(pg_database_url, 2, on_lost=lambda: lost.append(True))
        try:
            assert await pool.fetchone("one", (1,)) == (1,)
            slow = asyncio.ensure_future(pool.fetchone("nap", (30,)))
            await asyncio.sleep(0.05)  # the nap is sent
            assert await _off_loop(_kill_pool_backends, pg_cluster, pg_database_url) == 1
            with pytest.raises(Unavailable) as caught:
                await slow
            _check(caught.value)
            for i in range(5):  # a fresh connection each time it is needed: no more failures
                assert await pool.fetchone("one", (i,)) == (i,)
            assert pool.connections <= 2
        finally:
            await pool.aclose()

    asyncio.run(scenario())
    assert lost, "the service's other pools were told the server went away"


def test_postgres_stopped_fails_fast_and_the_pool_recovers_alone(
    own_pg_cluster: PgCluster,
) -> None:
    url = own_pg_cluster.create_database()

    async def scenario() -> None:
        pool = _pool(url, 2)
        try:
            assert await pool.fetchone("one", (1,)) == (1,)
            await _off_loop(own_pg_cluster.stop, "fast")
            try:
                for _ in range(3):  # refused at once, every time: nobody waits on a dead server
                    with pytest.raises(Unavailable) as caught:
                        await pool.fetchone("one", (2,))
                    _check(caught.value)
                assert pool.connections == 0
            finally:
                await _off_loop(own_pg_cluster.start)
            assert await pool.fetchone("one", (3,)) == (3,)  # nothing to do but ask again
        finally:
            await pool.aclose()

    asyncio.run(scenario())


def test_a_server_that_stops_answering_is_given_up_after_the_statement_timeout(
    pg_cluster: PgCluster, pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend frozen (SIGSTOP: a hung host, a partition) cannot apply its own
    statement timeout: the client's timer ends the call, and the loop runs on."""
    monkeypatch.setattr(dbmod, "STATEMENT_TIMEOUT_MS", 200)

    async def scenario() -> None:
        pool = _pool(pg_database_url, 1)
        try:
            assert await pool.fetchone("one", (1,)) == (1,)
            (pid,) = await _off_loop(_pool_backends, pg_cluster, pg_database_url)
            os.kill(pid, signal.SIGSTOP)
            try:
                stuck = asyncio.ensure_future(pool.fetchone("one", (2,)))
                ticks = 0
                while not stuck.done():  # the loop keeps turning meanwhile
                    await asyncio.sleep(0.01)
                    ticks += 1
                with pytest.raises(Unavailable) as caught:
                    await stuck
                _check(caught.value)
                assert ticks > 10
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await pool.fetchone("one", (3,)) == (3,)  # on a new connection
        finally:
            await pool.aclose()

    asyncio.run(scenario())


def test_a_caller_that_gives_up_leaves_no_connection_behind(pg_database_url: str) -> None:
    async def scenario() -> None:
        pool = _pool(pg_database_url, 1)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.fetchone("nap", (5,)), 0.2)
            # The one slot is free again: the next caller is answered at once.
            assert await asyncio.wait_for(pool.fetchone("one", (4,)), 5) == (4,)
            assert pool.connections == 1
        finally:
            await pool.aclose()

    asyncio.run(scenario())


def test_many_concurrent_reads_share_a_bounded_pool_and_a_host_name_is_looked_up(
    pg_cluster: PgCluster, pg_database_url: str
) -> None:
    url = pg_database_url.replace("@127.0.0.1:", "@localhost:")
    assert url != pg_database_url
    seen: list[int] = []

    async def scenario() -> None:
        pool = _pool(url, 3)
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                seen.append(len(await _off_loop(_pool_backends, pg_cluster, url)))

        watcher = asyncio.ensure_future(watch())
        try:
            rows = await asyncio.gather(
                *(pool.fetchone("nap", (0.005,)) for _ in range(150)),
                *(pool.fetchone("one", (i,)) for i in range(150)),
            )
            assert rows[:150] == [("", 7)] * 150
            assert rows[150:] == [(i,) for i in range(150)]
        finally:
            done.set()
            await watcher
            await pool.aclose()

    asyncio.run(scenario())
    assert max(seen) == 3, seen  # every slot used, and never one more


# The service.


def _create(ts: RunningServer, boot: str) -> str:
    return ts.stub.CreateToken(
        pb.CreateTokenRequest(name="t", scopes=["pass:read"]), metadata=bearer(boot), timeout=10
    ).token


@pytest.fixture
def pg_ts(pg_database_url: str) -> Iterator[RunningServer]:
    running = start_server(make_config(pg_database_url, auth_read_workers=2, rate_limit=None))
    yield running
    running.channel.close()
    running.server.stop(grace=1)


def test_authenticate_under_load_uses_at_most_its_connections(
    pg_cluster: PgCluster, pg_database_url: str, pg_ts: RunningServer
) -> None:
    boot = pg_ts.manager()
    token = _create(pg_ts, boot)
    seen: list[int] = []
    done = threading.Event()
    answers: list[str] = []

    def caller() -> None:
        for _ in range(25):
            answers.append(pg_ts.authenticate(token).user_email)

    def watch() -> None:
        while not done.is_set():
            seen.append(len(_pool_backends(pg_cluster, pg_database_url)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    callers = [threading.Thread(target=caller) for _ in range(32)]
    try:
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join()
    finally:
        done.set()
        watcher.join()
    assert answers == ["manager@acme.test"] * 800
    assert 1 <= max(seen) <= 2, seen


def test_killed_read_connections_under_load_fail_a_call_each_at_most_then_recover(
    pg_cluster: PgCluster, pg_database_url: str, pg_ts: RunningServer
) -> None:
    boot = pg_ts.manager()
    token = _create(pg_ts, boot)
    pg_ts.authenticate(token)
    failures: list[grpc.RpcError] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                pg_ts.authenticate(token)
            except grpc.RpcError as error:
                failures.append(error)

    callers = [threading.Thread(target=caller) for _ in range(8)]
    for thread in callers:
        thread.start()
    try:
        for _ in range(3):
            while not _pool_backends(pg_cluster, pg_database_url):
                pass
            assert pg_cluster.terminate_connections(dbname_of(pg_database_url)) >= 1
    finally:
        stop.set()
        for thread in callers:
            thread.join()
    assert all(e.code() == grpc.StatusCode.UNAVAILABLE for e in failures)
    assert all(e.details() == dbmod.UNAVAILABLE_MESSAGE for e in failures)
    # Each kill fails at most the calls in flight on the two connections it closed.
    assert len(failures) <= 3 * 2, len(failures)
    for _ in range(5):
        assert pg_ts.authenticate(token).user_email == "manager@acme.test"
    assert _create(pg_ts, boot)


def test_a_stuck_read_times_out_as_unavailable_while_the_loop_serves_other_calls(
    pg_cluster: PgCluster, pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock another session holds on the tokens stalls every token read until
    the statement timeout; meanwhile the same loop answers calls that need no
    read (a malformed token, the health check), and then the stuck calls fail
    as UNAVAILABLE."""
    monkeypatch.setattr(dbmod, "STATEMENT_TIMEOUT_MS", 3_000)
    ts = start_server(make_config(pg_database_url, auth_read_workers=2))
    try:
        boot = ts.manager()
        token = _create(ts, boot)
        assert ts.authenticate(token).user_email == "manager@acme.test"
        locker = pg_cluster.connect(dbname_of(pg_database_url))
        outcomes: list[grpc.RpcError | None] = []

        def stuck_call() -> None:
            try:
                ts.authenticate(token)
                outcomes.append(None)
            except grpc.RpcError as error:
                outcomes.append(error)

        stuck = [threading.Thread(target=stuck_call) for _ in range(4)]
        try:
            with locker.cursor() as cur:
                cur.execute("BEGIN")
                cur.execute("LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE")
            for thread in stuck:
                thread.start()
            while not pg_cluster.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = %s", (dbname_of(pg_database_url),)):
                pass
            answered = 0
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as caught:
                    ts.authenticate("not-a-token")
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert ts.health_status() == 1  # SERVING
                answered += 1
            assert not outcomes, "the other calls were answered while the reads were stuck"
            for thread in stuck:
                thread.join()
        finally:
            with locker.cursor() as cur:
                cur.execute("ROLLBACK")
            locker.close()
        assert answered == 5
        assert len(outcomes) == 4
        for error in outcomes:
            assert error is not None
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details() == dbmod.UNAVAILABLE_MESSAGE
        for _ in range(3):
            assert ts.authenticate(token).user_email == "manager@acme.test"
    finally:
        ts.channel.close()
        ts.server.stop(grace=1)
