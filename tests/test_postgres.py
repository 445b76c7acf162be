"""PostgreSQL connection handling: dropped connections, a stopped server, a stuck query.

Every failure a caller sees here must be UNAVAILABLE with the one fixed
message (never OK, never a driver's words), and the service must come back
by itself.
"""

from __future__ import annotations

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
