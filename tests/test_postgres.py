"""PostgreSQL connection handling: dropped connections, a stopped server, a stuck query.

Every failure a caller sees here must be UNAVAILABLE with the one fixed
message (never OK, never a driver's words), and the service must come back
by itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import RunningServer, bearer, make_config, start_server
from grpc_health.v1 import health_pb2
from pgcluster import PgCluster, dbname_of
from rest_helpers import running_rest

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice_server import db as dbmod

pytestmark = pytest.mark.postgres

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check_unavailable(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert error.details() == dbmod.UNAVAILABLE_MESSAGE


def _until(predicate, what: str, deadline: float = 30.0) -> float:
    """Polls `predicate` until true; returns the seconds it took (the deadline is a bound)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < deadline, f"still waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def _health(ts: RunningServer) -> int:
    try:
        return ts.health_status()
    except grpc.RpcError:
        return -1


def _create(ts: RunningServer, boot: str) -> pb.CreateTokenResponse:
    return ts.stub.CreateToken(
        pb.CreateTokenRequest(name="t", scopes=["pass:read"]), metadata=bearer(boot), timeout=10
    )


@pytest.fixture
def pg_ts(pg_database_url: str) -> Iterator[RunningServer]:
    running = start_server(make_config(pg_database_url))
    yield running
    running.channel.close()
    running.server.stop(grace=1)


def test_killed_backends_are_replaced_and_callers_see_at_most_one_unavailable(
    pg_cluster: PgCluster, pg_database_url: str, pg_ts: RunningServer
) -> None:
    boot = pg_ts.manager()
    token = _create(pg_ts, boot).token
    for _ in range(5):
        pg_ts.authenticate(token)

    # A DBA (or a failover) kills every connection the service holds, while it is busy.
    assert pg_cluster.terminate_connections(dbname_of(pg_database_url)) >= 1
    failures = 0
    for _ in range(20):
        try:
            assert pg_ts.authenticate(token).token_id
        except grpc.RpcError as error:
            _check_unavailable(error)
            failures += 1
    print(f"\nAuthenticate calls failing after every backend was killed: {failures} of 20")
    assert failures <= 1, "one dead connection fails one call; the rest of the pool goes with it"
    assert _create(pg_ts, boot).token

    # After a quiet second, idle connections are checked before use: no caller sees it.
    pg_cluster.terminate_connections(dbname_of(pg_database_url))
    time.sleep(dbmod.PING_AFTER_IDLE_SECONDS + 0.5)
    for _ in range(5):
        assert pg_ts.authenticate(token).token_id


def test_a_connection_another_thread_held_through_the_kill_is_not_reused(
    pg_cluster: PgCluster, pg_database_url: str
) -> None:
    """The pool drops idle connections after a loss, but one that another thread
    (a background reader, a slow request) had checked out at that moment comes
    back later, just as dead: it must be closed, not handed to the next request."""
    db = dbmod.open_database(pg_database_url, max_connections=4, bind=False)
    held, release, returned = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        db.connect(reuse_if_open=True)
        db.execute_sql("SELECT 1")
        held.set()
        release.wait(10)
        db.close()  # back to the pool, as any request does
        returned.set()

    try:
        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(10)
        with dbmod.connection(db):
            db.execute_sql("SELECT 1")  # a second connection, now idle in the pool
        assert pg_cluster.terminate_connections(dbname_of(pg_database_url)) >= 2

        with pytest.raises(dbmod.Unavailable):  # the first caller meets the loss
            with dbmod.connection(db):
                db.execute_sql("SELECT 1")
        release.set()
        assert returned.wait(10)
        holder.join(10)
        for _ in range(3):  # every later caller gets a live connection
            with dbmod.connection(db):
                assert db.execute_sql("SELECT 1").fetchone() == (1,)
    finally:
        release.set()
        dbmod.close_all(db)


def test_postgres_down_is_not_serving_and_unavailable_then_recovers_alone(
    own_pg_cluster: PgCluster,
) -> None:
    url = own_pg_cluster.create_database()
    ts = start_server(make_config(url))
    try:
        boot = ts.manager()
        token = _create(ts, boot).token
        assert ts.authenticate(token).token_id
        assert ts.health_status() == SERVING

        own_pg_cluster.stop(mode="fast")
        try:
            to_not_serving = _until(lambda: _health(ts) == NOT_SERVING, "NOT_SERVING")
            for call in (lambda: ts.authenticate(token), lambda: _create(ts, boot)):
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                _check_unavailable(caught.value)
            with running_rest(ts.target) as rest:
                down = rest.client.get("/healthz")
                assert down.status_code == 503
                assert down.json()["error"]["message"] == (
                    "The service is not serving: database down."
                )
        finally:
            own_pg_cluster.start()
        back = time.monotonic()
        to_serving = _until(lambda: _health(ts) == SERVING, "SERVING again")

        def works() -> bool:
            try:
                return bool(ts.authenticate(token).token_id)
            except grpc.RpcError as error:
                _check_unavailable(error)
                return False

        _until(works, "Authenticate to work again")
        to_working = time.monotonic() - back
        assert _create(ts, boot).token
        print(f"\nhealth NOT_SERVING {to_not_serving:.2f}s after PostgreSQL stopped; "
              f"SERVING {to_serving:.2f}s and Authenticate OK {to_working:.2f}s "
              "after it was back")
    finally:
        ts.channel.close()
        ts.server.stop(grace=1)


def test_a_stuck_query_times_out_as_unavailable_and_frees_its_worker(
    pg_cluster: PgCluster, pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dbmod, "STATEMENT_TIMEOUT_MS", 300)
    ts = start_server(make_config(pg_database_url))
    try:
        boot = ts.manager()
        token = _create(ts, boot).token
        assert ts.authenticate(token).token_id
        locker = pg_cluster.connect(dbname_of(pg_database_url))
        try:
            with locker.cursor() as cur:
                cur.execute("BEGIN")
                cur.execute("LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE")
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as caught:
                    ts.authenticate(token)
                _check_unavailable(caught.value)
        finally:
            with locker.cursor() as cur:
                cur.execute("ROLLBACK")
            locker.close()
        for _ in range(5):
            assert ts.authenticate(token).token_id
        assert _create(ts, boot).token
    finally:
        ts.channel.close()
        ts.server.stop(grace=1)


def test_authenticate_never_waits_behind_management_work(
    pg_cluster: PgCluster, pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock holds every INSERT of CreateToken (for up to a 60 s statement timeout)
    while one caller sends 48 at once, enough to take every management worker.
    Authenticate, warm and cold, answers meanwhile within a deadline shorter than
    that timeout, so it never queued behind them; the flooding caller gets a few
    creations at a time and RESOURCE_EXHAUSTED with a RetryInfo for the rest."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    monkeypatch.setattr(dbmod, "STATEMENT_TIMEOUT_MS", 60_000)
    ts = start_server(make_config(pg_database_url))
    owner = (("x-forwarded-for", "203.0.113.7"),)
    try:
        boot = ts.manager()
        warm, cold = _create(ts, boot).token, _create(ts, boot).token
        ts.authenticate(warm)
        flooder = ts.manager(email="flood@evil.test", org="evil")
        ts.authenticate(flooder)
        locker = pg_cluster.connect(dbname_of(pg_database_url))
        outcomes: list[grpc.RpcError | None] = []

        def create_one() -> None:
            try:
                _create(ts, flooder)
                outcomes.append(None)
            except grpc.RpcError as error:
                outcomes.append(error)

        threads = [threading.Thread(target=create_one) for _ in range(48)]
        try:
            with locker.cursor() as cur:
                cur.execute("BEGIN")
                cur.execute("LOCK TABLE api_tokens IN SHARE ROW EXCLUSIVE MODE")  # reads go on
            for thread in threads:
                thread.start()

            def settled() -> bool:
                waiting = pg_cluster.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = %s", (dbname_of(pg_database_url),))[0][0]
                wedged = waiting >= ts.config.grpc_workers
                return waiting >= 1 and (wedged or len(outcomes) + waiting == len(threads))

            _until(settled, "the flood to settle")
            for raw in (warm, cold):
                who = ts.stub.Authenticate(pb.AuthenticateRequest(token=raw), metadata=owner,
                                           timeout=15)
                assert who.user_email == "manager@acme.test"
        finally:
            with locker.cursor() as cur:
                cur.execute("ROLLBACK")
            locker.close()
            for thread in threads:
                thread.join()
        refused = [e for e in outcomes if e is not None]
        created = len(outcomes) - len(refused)
        assert created == ts.config.create_token_concurrency
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused), {
            (e.code(), e.details()) for e in refused}
        details = rpc_status.from_call(refused[0]).details
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)
    finally:
        ts.channel.close()
        ts.server.stop(grace=1)
