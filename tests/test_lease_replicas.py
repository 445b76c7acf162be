"""Cached answers across processes: PostgreSQL replicas, `serve --workers`, kill -9, restarts.

The consumer watches one server process; the change is made through another
(or the command line), so the invalidation has to cross the store.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import cli, make_config, start_server
from pgcluster import PgCluster
from test_lease_cache import LEASE, WITHIN, refused, warm

from tokenservice_client import LeaseCache, TokenServiceClient, Unauthenticated, Unavailable

ENV = {"TOKENSERVICE_LEASE_SECONDS": str(LEASE)}


def _boot(url: str) -> tuple[str, str]:
    """A user who may manage and verify; returns (manager token, verify token)."""
    email = f"ops-{uuid.uuid4().hex[:8]}@acme.test"
    cli("user", "add", "--email", email, "--org", "acme", "--permissions",
        "api_token:manage,api_token:verify,pass:read", "--database-url", url, check=True)

    def mint(scopes: str) -> str:
        out = cli("token", "create", "--email", email, "--name", "boot", "--scopes", scopes,
                  "--database-url", url, check=True)
        return out.stdout.strip().splitlines()[-1]

    return mint("api_token:manage,pass:read"), mint("api_token:verify")


@pytest.fixture
def pg_replicas(pg_database_url: str, spawn) -> Iterator[tuple[str, object, object]]:
    cli("migrate", "--database-url", pg_database_url, check=True)
    a = spawn(pg_database_url, env=ENV)
    b = spawn(pg_database_url, env=ENV)
    yield pg_database_url, a, b


@pytest.mark.postgres
def test_revoke_through_one_replica_reaches_a_consumer_watching_another(pg_replicas) -> None:
    url, a, b = pg_replicas
    manage, verify = _boot(url)
    through_b = TokenServiceClient(b.target, manage)
    cache = LeaseCache(a.target, verify)
    try:
        assert cache.wait_leased(WITHIN)
        tokens = [through_b.create_token(f"svc{i}", ["pass:read"]) for i in range(3)]
        for made in tokens:
            warm(cache, made.token)
        for made in tokens:
            through_b.revoke_token(made.api_token.id, timeout=WITHIN)
            assert refused(cache, made.token)
    finally:
        cache.close()
        through_b.close()


@pytest.mark.postgres
def test_a_frozen_consumer_of_one_replica_delays_a_revoke_through_another_by_its_lease(
    pg_replicas,
) -> None:
    url, a, b = pg_replicas
    manage, verify = _boot(url)
    through_b = TokenServiceClient(b.target, manage)
    cache = LeaseCache(a.target, verify)
    try:
        assert cache.wait_leased(WITHIN)
        made = through_b.create_token("svc", ["pass:read"])
        warm(cache, made.token)
        cache.freeze()
        through_b.revoke_token(made.api_token.id, timeout=WITHIN)
        assert not cache.leased
        assert refused(cache, made.token)
    finally:
        cache.thaw()
        cache.close()
        through_b.close()


@pytest.mark.postgres
def test_a_killed_replica_is_waited_for_at_most_its_lease(pg_replicas) -> None:
    url, a, b = pg_replicas
    manage, verify = _boot(url)
    through_b = TokenServiceClient(b.target, manage)
    cache = LeaseCache(a.target, verify)
    try:
        assert cache.wait_leased(WITHIN)
        made = through_b.create_token("svc", ["pass:read"])
        warm(cache, made.token)
        cache.freeze()  # it does not even notice its server die
        a.stop(signal.SIGKILL)
        through_b.revoke_token(made.api_token.id, timeout=WITHIN)
        assert not cache.leased
        # Its cache answers nothing; asking its (dead) tokenservice fails.
        assert cache.get(made.token) is None
        with pytest.raises((Unauthenticated, Unavailable)):
            cache.authenticate(made.token)
    finally:
        cache.thaw()
        cache.close()
        through_b.close()


@pytest.mark.postgres
def test_user_disable_on_the_command_line_reaches_consumers_of_every_replica(
    pg_replicas,
) -> None:
    url, a, b = pg_replicas
    manage, verify = _boot(url)
    leaver = f"leaver-{uuid.uuid4().hex[:8]}@acme.test"
    cli("user", "add", "--email", leaver, "--org", "acme", "--permissions", "pass:read",
        "--database-url", url, check=True)
    raw = cli("token", "create", "--email", leaver, "--name", "l", "--scopes", "pass:read",
              "--database-url", url, check=True).stdout.strip().splitlines()[-1]
    caches = [LeaseCache(server.target, verify) for server in (a, b)]
    try:
        for cache in caches:
            assert cache.wait_leased(WITHIN)
            warm(cache, raw)
        cli("user", "disable", "--email", leaver, "--database-url", url, check=True,
            timeout=WITHIN + 30)
        for cache in caches:
            assert refused(cache, raw)
    finally:
        for cache in caches:
            cache.close()


def test_workers_of_one_sqlite_file_tell_each_others_consumers(
    sqlite_database_url: str, spawn
) -> None:
    url = sqlite_database_url
    cli("migrate", "--database-url", url, check=True)
    server = spawn(url, "--workers", "2", env=ENV)
    manage, verify = _boot(url)
    # Several consumers, so the kernel spreads their streams over both workers;
    # each revoke goes through a channel of its own, to either worker.
    caches = [LeaseCache(server.target, verify) for _ in range(4)]
    try:
        for cache in caches:
            assert cache.wait_leased(WITHIN)
        for i in range(4):
            with TokenServiceClient(server.target, manage) as creator:
                made = creator.create_token(f"svc{i}", ["pass:read"])
            for cache in caches:
                warm(cache, made.token)
            with TokenServiceClient(server.target, manage) as revoker:
                revoker.revoke_token(made.api_token.id, timeout=WITHIN)
            for cache in caches:
                assert refused(cache, made.token)
    finally:
        for cache in caches:
            cache.close()


@pytest.mark.postgres
def test_a_postgresql_restart_never_lets_a_cached_answer_outlive_a_revoke(
    own_pg_cluster: PgCluster,
) -> None:
    url = own_pg_cluster.create_database()
    ts = start_server(make_config(url, lease_seconds=LEASE))
    manage, verify = _boot(url)
    manager = TokenServiceClient(ts.target, manage)
    cache = LeaseCache(ts.target, verify)
    try:
        assert cache.wait_leased(WITHIN)
        made = [manager.create_token(f"svc{i}", ["pass:read"]) for i in range(2)]
        for m in made:
            warm(cache, m.token)

        # Down: the server cannot record leases any more, so its consumers' lapse.
        own_pg_cluster.stop(mode="immediate")
        deadline = time.monotonic() + WITHIN
        while cache.leased:
            assert time.monotonic() < deadline, "a consumer kept its lease with the store down"
            time.sleep(0.02)
        own_pg_cluster.start()

        # Back: the first revoke that succeeds is honoured at once.
        _until_ok(lambda: manager.revoke_token(made[0].api_token.id, timeout=WITHIN))
        assert refused(cache, made[0].token)
        # And with the restart behind it, the cache works again under a new lease.
        assert cache.wait_leased(WITHIN)
        warm(cache, made[1].token)
        own_pg_cluster.restart(mode="immediate")
        _until_ok(lambda: manager.revoke_token(made[1].api_token.id, timeout=WITHIN))
        assert refused(cache, made[1].token)
    finally:
        cache.close()
        manager.close()
        ts.channel.close()
        ts.server.stop(grace=1)


def _until_ok(call) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            call()
            return
        except Unavailable:
            assert time.monotonic() < deadline, "the store never came back"
            time.sleep(0.1)
