"""Shared fixtures: a real tokenservice on a free port, real stubs, real bcrypt (4 rounds)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import pgcluster
import pytest
import redis_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pgcluster import PgCluster
from redis_server import RedisServer

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc
from tokenservice_server.config import Config, grpc_address
from tokenservice_server.db import connection
from tokenservice_server.server import TokenServer

ROOT = Path(__file__).resolve().parents[1]
TOKENSERVICE = str(Path(sys.executable).with_name("tokenservice"))
MANAGER_PERMISSIONS = ("api_token:manage", "pass:read", "pass:create", "invoice.view")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class RunningServer:
    """An in-process tokenservice and a channel to it."""

    server: TokenServer
    target: str
    channel: grpc.Channel
    stub: pb_grpc.TokenServiceStub
    health: health_pb2_grpc.HealthStub
    _users: set[str] = field(default_factory=set)

    @property
    def config(self) -> Config:
        return self.server.config

    def add_user(self, email: str, org: str = "acme", permissions=MANAGER_PERMISSIONS) -> None:
        with connection(self.server.store.db):
            self.server.service.add_user(email, org, list(permissions))

    def disable_user(self, email: str) -> None:
        with connection(self.server.store.db):
            self.server.service.disable_user(email)

    def mint(
        self,
        email: str,
        scopes=("api_token:manage",),
        name: str = "bootstrap",
        expires_at: datetime | None = None,
    ) -> str:
        """Creates a token the way `tokenservice token create` does; returns the raw token."""
        with connection(self.server.store.db):
            return self.server.service.mint_for_email(email, name, list(scopes), expires_at).raw

    def manager(self, email: str = "manager@acme.test", org: str = "acme",
                permissions=MANAGER_PERMISSIONS, scopes=None) -> str:
        """A user plus a token holding api_token:manage (and the given scopes)."""
        self.add_user(email, org, permissions)
        return self.mint(email, scopes or permissions)

    def authenticate(self, token: str) -> pb.AuthenticateResponse:
        return self.stub.Authenticate(pb.AuthenticateRequest(token=token), timeout=10)

    def health_status(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status


def make_config(database_url: str, **overrides) -> Config:
    base = dict(
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        database_url=database_url,
        bcrypt_rounds=4,
        rest_enabled=False,
        shutdown_grace_seconds=2.0,
        health_probe_seconds=0.2,
    )
    base.update(overrides)
    return Config(**base)


# The store: every test that uses `database_url` (and so `ts`) runs on SQLite and
# on PostgreSQL. PostgreSQL is one throwaway cluster per session (tests/pgcluster.py)
# with a fresh database per test. Without the binaries those runs skip, or fail
# under CI=true so a broken CI image cannot pass by skipping half the suite.

BACKENDS = ("sqlite", pytest.param("postgres", marks=pytest.mark.postgres))


def _pg_missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but PostgreSQL cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL 15 cluster for the whole session, removed at the end."""
    reason = pgcluster.missing_reason()
    if reason:
        _pg_missing(reason)
    cluster = PgCluster()
    try:
        cluster.start()
    except Exception as error:
        cluster.remove()
        _pg_missing(f"could not start PostgreSQL: {error}")
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="module")
def own_pg_cluster(pg_cluster: PgCluster) -> Iterator[PgCluster]:
    """A cluster of this module's own, for tests that stop or restart PostgreSQL."""
    cluster = PgCluster()
    try:
        yield cluster.start()
    finally:
        cluster.remove()


@pytest.fixture
def pg_database_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    url = pg_cluster.take_database()
    yield url
    with contextlib.suppress(Exception):
        pg_cluster.drop_database(pgcluster.dbname_of(url))


# Redis: one throwaway server per session (tests/redis_server.py), emptied before
# each test that takes `redis_url`; tests that stop or stall Redis get their own.
# Like PostgreSQL: skipped without redis-server, a failure under CI=true.


def _redis_missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but Redis cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _start_redis() -> RedisServer:
    reason = redis_server.missing_reason()
    if reason:
        _redis_missing(reason)
    server = RedisServer()
    try:
        return server.start()
    except Exception as error:
        server.remove()
        _redis_missing(f"could not start redis-server: {error}")
        raise


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One Redis server for the whole session, removed at the end."""
    server = _start_redis()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def redis_url(shared_redis: RedisServer) -> str:
    """The session's Redis, emptied: no test sees another's counters."""
    import redis

    with redis.Redis.from_url(shared_redis.url()) as client:
        client.flushall()
    return shared_redis.url()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis server of this test's own, for tests that stop, restart or stall it."""
    server = _start_redis()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def sqlite_database_url(tmp_path: Path) -> str:
    """A fresh SQLite file, for tests about SQLite itself (the file, kill -9, WAL)."""
    return f"sqlite:///{tmp_path / 'tokens.db'}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """"sqlite" or "postgres": the backend this run of the test is on."""
    return request.param


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    """The store each test gets: a fresh SQLite file, or a fresh PostgreSQL database."""
    if backend == "postgres":
        return request.getfixturevalue("pg_database_url")
    return request.getfixturevalue("sqlite_database_url")


@pytest.fixture
def server_config(database_url: str) -> Config:
    return make_config(database_url)


def start_server(config: Config) -> RunningServer:
    server = TokenServer(config)
    port = server.start()
    target = grpc_address("127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host, port)
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)
    return RunningServer(
        server, target, channel, pb_grpc.TokenServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )


@pytest.fixture
def ts(server_config: Config) -> Iterator[RunningServer]:
    """A real tokenservice gRPC server on a free port, stopped after the test."""
    running = start_server(server_config)
    try:
        yield running
    finally:
        running.channel.close()
        running.server.stop(grace=1)


# Servers in their own process, for the command line, signals and kill -9.


def cli(*args: str, env: dict[str, str] | None = None, check: bool = False,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "TOKENSERVICE_BCRYPT_ROUNDS": "4", **(env or {})}
    result = subprocess.run(
        [TOKENSERVICE, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"tokenservice {' '.join(args)} failed: {result.stderr}")
    return result


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def spawn_server(database_url: str, log_path: Path, *extra: str, rest: bool = False,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """Runs `tokenservice serve` and waits until its health service says SERVING."""
    grpc_port, http_port = free_port(), free_port()
    args = [TOKENSERVICE, "serve", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
            "--database-url", database_url, *extra]
    if not rest:
        args.append("--no-rest")
    full_env = {**os.environ, "TOKENSERVICE_BCRYPT_ROUNDS": "4", **(env or {})}
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=full_env,
                            stdin=subprocess.DEVNULL)
    log_file.close()
    running = ServerProcess(proc, grpc_port, http_port, log_path)
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(running.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{running.log()}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return running
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"server did not become healthy:\n{running.log()}")
            time.sleep(0.1)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """Starts `tokenservice serve` processes; kills what is left after the test."""
    started: list[ServerProcess] = []

    def _spawn(database_url: str, *extra: str, **kwargs) -> ServerProcess:
        running = spawn_server(database_url, tmp_path / f"server{len(started)}.log", *extra,
                               **kwargs)
        started.append(running)
        return running

    yield _spawn
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait()


@pytest.fixture
def ts_target(ts: RunningServer) -> str:
    return ts.target


@pytest.fixture
def mint(ts: RunningServer):
    """Adds a fresh user holding `permissions` (default: the scopes) in `org` and
    returns a raw token carrying `scopes`."""

    def mint(scopes, permissions=None, org: str = "acme") -> str:
        email = f"user-{uuid.uuid4().hex[:12]}@example.com"
        ts.add_user(email, org, list(permissions or scopes))
        return ts.mint(email, list(scopes))

    return mint
