"""Faults survived, nothing lost.

- PostgreSQL restarted (cleanly, then as a crash) under a load of Authenticate
  and CreateToken: no call reports success for a write that did not commit, the
  service recovers by itself, every token reported created is there and works.
- SQLite: the server killed with kill -9 in the middle of a create/revoke loop,
  several times: the file is intact, every acknowledged create and revoke holds.

Both print their figures (run with -s to see them).
"""

from __future__ import annotations

import collections
import random
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest
from conftest import bearer, cli
from pgcluster import PgCluster, dbname_of

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc
from tokenservice_server.db import UNAVAILABLE_MESSAGE

pytestmark = pytest.mark.slow

CALL_TIMEOUT = 10


@dataclass
class Tally:
    """What the load saw, shared by its threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    leaked: list[str] = field(default_factory=list)
    created: dict[str, str] = field(default_factory=dict)  # id -> raw token, acknowledged
    revoked: set[str] = field(default_factory=set)  # acknowledged revokes
    revoke_tried: set[str] = field(default_factory=set)
    last_error_at: float = 0.0

    def ok(self) -> None:
        with self.lock:
            self.calls += 1

    def create(self, stub, meta, name: str) -> bool:
        """One CreateToken; an acknowledged token is recorded with its raw value."""
        try:
            made = stub.CreateToken(pb.CreateTokenRequest(name=name, scopes=["pass:read"]),
                                    metadata=meta, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            self.error("CreateToken", error)
            return False
        with self.lock:
            self.created[made.api_token.id] = made.token
        self.ok()
        return True

    def error(self, method: str, error: grpc.RpcError) -> None:
        with self.lock:
            self.calls += 1
            self.errors[f"{method} {error.code().name}"] += 1
            self.last_error_at = time.monotonic()
            details = error.details() or ""
            # What the service itself says on a database fault is fixed; a
            # connection refused by a killed server is grpc's own words.
            if error.code() == grpc.StatusCode.UNAVAILABLE and details not in (
                UNAVAILABLE_MESSAGE,
            ) and not _transport_failure(details):
                self.leaked.append(details)
            if error.code() not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED):
                self.leaked.append(f"{error.code().name}: {details}")


def _transport_failure(details: str) -> bool:
    lowered = details.lower()
    return any(words in lowered for words in (
        "failed to connect", "connection refused", "socket closed", "connection reset",
        "broken pipe", "connections to all backends failing", "recvmsg", "end of tcp stream",
    ))


def _boot(url: str) -> str:
    cli("user", "add", "--email", "load@acme.test", "--org", "acme",
        "--permissions", "api_token:manage,pass:read", "--database-url", url, check=True)
    result = cli("token", "create", "--email", "load@acme.test", "--name", "boot",
                 "--scopes", "api_token:manage,pass:read", "--database-url", url, check=True)
    return result.stdout.strip().splitlines()[-1]


def _until(predicate, what: str, deadline: float = 30.0) -> float:
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except grpc.RpcError:
            pass
        assert time.monotonic() - start < deadline, f"still waiting for {what}"
        time.sleep(0.05)


# PostgreSQL restarted under load.


def test_postgres_restarted_under_load_loses_no_acknowledged_write(
    own_pg_cluster: PgCluster, spawn
) -> None:
    url = own_pg_cluster.create_database()
    boot = _boot(url)
    # Limits off: thousands of calls on eight tokens are about the database, not a
    # token's rate limit.
    server = spawn(url, env={"TOKENSERVICE_HEALTH_PROBE_SECONDS": "0.2",
                             "TOKENSERVICE_RATE_LIMIT": "off"})
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.TokenServiceStub(channel)
    meta = bearer(boot)
    warm = [
        stub.CreateToken(pb.CreateTokenRequest(name=f"warm{i}", scopes=["pass:read"]),
                         metadata=meta, timeout=CALL_TIMEOUT).token
        for i in range(8)
    ]
    tally = Tally()
    stop = threading.Event()
    threads_n, max_calls_per_thread, max_seconds = 8, 4000, 30.0

    def load(seed: int) -> None:
        rng = random.Random(seed)
        for n in range(max_calls_per_thread):
            if stop.is_set():
                return
            if n % 3 == 0:
                tally.create(stub, meta, f"load{seed}-{n}")
            else:
                try:
                    stub.Authenticate(pb.AuthenticateRequest(token=rng.choice(warm)),
                                      timeout=CALL_TIMEOUT)
                except grpc.RpcError as error:
                    tally.error("Authenticate", error)
                    continue
                tally.ok()

    workers = [threading.Thread(target=load, args=(i,)) for i in range(threads_n)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    restarts = []
    try:
        for mode in ("fast", "immediate"):
            time.sleep(1.5)
            calls_before = tally.calls
            began = time.monotonic()
            own_pg_cluster.restart(mode=mode)
            back = time.monotonic()

            # Recovered: a call that began after PostgreSQL was back succeeds.
            def fresh_call_works() -> bool:
                stub.Authenticate(pb.AuthenticateRequest(token=warm[0]), timeout=CALL_TIMEOUT)
                return True

            _until(fresh_call_works, f"recovery after a {mode} restart")
            recovered = time.monotonic()
            restarts.append((mode, back - began, recovered - back, calls_before))
            assert time.monotonic() - started < max_seconds
        time.sleep(1.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)

    # No restart of tokenservice: the same process serves, healthy.
    assert server.proc.poll() is None
    last_error_after = (tally.last_error_at - started) if tally.last_error_at else 0.0

    # Every acknowledged CreateToken is in the database and authenticates.
    stored = {
        str(row[0]) for row in own_pg_cluster.execute(
            "SELECT id::text FROM api_tokens", dbname=dbname_of(url))
    }
    lost = [tid for tid in tally.created if tid not in stored]
    unacknowledged_but_committed = len(stored) - len(tally.created) - len(warm) - 1
    failing = []
    for tid, raw in tally.created.items():
        try:
            assert stub.Authenticate(pb.AuthenticateRequest(token=raw),
                                     timeout=CALL_TIMEOUT).token_id == tid
        except grpc.RpcError as error:
            failing.append((tid, error.code().name))
    channel.close()

    print(f"\nPostgreSQL restarts under load: {threads_n} threads, {tally.calls} calls "
          f"in {time.monotonic() - started:.1f}s")
    for mode, down, recover, calls_before in restarts:
        print(f"  {mode} restart: PostgreSQL back after {down:.2f}s, service answering "
              f"{recover:.2f}s later (after call #{calls_before})")
    print(f"  errors by kind: {dict(tally.errors) or 'none'}")
    print(f"  last error {last_error_after:.2f}s into the run")
    print(f"  tokens acknowledged: {len(tally.created)}, writes lost: {len(lost)}, "
          f"acknowledged but not authenticating: {len(failing)}, "
          f"failed calls whose write committed anyway: {max(0, unacknowledged_but_committed)}")
    assert not tally.leaked, f"callers saw something other than UNAVAILABLE: {tally.leaked[:5]}"
    assert not lost, f"acknowledged CreateToken calls lost: {lost}"
    assert not failing, f"acknowledged tokens that do not authenticate: {failing[:5]}"
    assert server.stop() == 0


# SQLite killed with kill -9 in the middle of a create/revoke loop.


def _sqlite_state(path: str) -> tuple[str, dict[str, bool]]:
    """integrity_check's answer, and {token id: revoked?} as the file holds it."""
    conn = sqlite3.connect(path)
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        rows = conn.execute("SELECT id, revoked_at FROM api_tokens").fetchall()
    finally:
        conn.close()
    return verdict, {str(uuid.UUID(str(tid))): revoked is not None for tid, revoked in rows}


def test_sqlite_killed_repeatedly_mid_loop_keeps_every_acknowledged_write(
    sqlite_database_url: str, spawn
) -> None:
    path = sqlite_database_url[len("sqlite:///"):]
    boot = _boot(sqlite_database_url)
    meta = bearer(boot)
    tally = Tally()
    rng = random.Random(5)
    rounds, threads_n, max_calls_per_thread = 4, 4, 2000
    verdicts = []
    for round_number in range(rounds):
        server = spawn(sqlite_database_url)
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.TokenServiceStub(channel)
        stop = threading.Event()

        def loop(seed: int, stub=stub, stop=stop) -> None:
            local = random.Random(seed)
            for n in range(max_calls_per_thread):
                if stop.is_set():
                    return
                if not tally.create(stub, meta, f"r{seed}-{n}"):
                    continue
                with tally.lock:
                    candidates = [t for t in tally.created if t not in tally.revoke_tried]
                    victim = local.choice(candidates) if n % 2 else None
                    if victim:
                        tally.revoke_tried.add(victim)
                if victim is None:
                    continue
                try:
                    stub.RevokeToken(pb.RevokeTokenRequest(id=victim), metadata=meta,
                                     timeout=CALL_TIMEOUT)
                except grpc.RpcError as error:
                    tally.error("RevokeToken", error)
                    continue
                with tally.lock:
                    tally.revoked.add(victim)
                tally.ok()

        workers = [threading.Thread(target=loop, args=(round_number * 100 + i,))
                   for i in range(threads_n)]
        for worker in workers:
            worker.start()
        time.sleep(rng.uniform(0.8, 1.6))
        server.proc.kill()  # SIGKILL, mid-write
        server.proc.wait()
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
        channel.close()

        verdict, stored = _sqlite_state(path)
        verdicts.append(verdict)
        missing = [t for t in tally.created if t not in stored]
        unrevoked = [t for t in tally.revoked if not stored.get(t, False)]
        assert verdict == "ok", f"round {round_number}: integrity_check says {verdict}"
        assert not missing, f"round {round_number}: acknowledged creates lost: {missing[:5]}"
        assert not unrevoked, f"round {round_number}: acknowledged revokes lost: {unrevoked[:5]}"

    # Restarted once more: every acknowledged token behaves as acknowledged.
    server = spawn(sqlite_database_url)
    wrong = []
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TokenServiceStub(channel)
        for tid, raw in tally.created.items():
            if tid in tally.revoke_tried and tid not in tally.revoked:
                continue  # the revoke's outcome was never reported: either is right
            try:
                stub.Authenticate(pb.AuthenticateRequest(token=raw), timeout=CALL_TIMEOUT)
                works = True
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
                works = False
            if works == (tid in tally.revoked):
                wrong.append(tid)
    assert server.stop() == 0
    print(f"\nSQLite kill -9 x{rounds} mid create/revoke loop ({threads_n} threads): "
          f"{tally.calls} calls, {len(tally.created)} creates and {len(tally.revoked)} "
          f"revokes acknowledged; errors by kind: {dict(tally.errors) or 'none'}; "
          f"integrity_check: {verdicts}; writes lost: 0")
    assert not wrong, f"tokens not in their acknowledged state: {wrong[:5]}"
    assert not [e for e in tally.leaked if "database is locked" in e.lower()]
