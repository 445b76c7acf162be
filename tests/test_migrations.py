"""Numbered migrations: a database made by the first schema upgrades and keeps its tokens."""

from __future__ import annotations

import os
import subprocess

import grpc
import pytest
from conftest import TOKENSERVICE, cli, make_config, start_server

from tokenservice_server.config import Config
from tokenservice_server.crypto import hasher_for
from tokenservice_server.db import close_all, connection, open_database
from tokenservice_server.migrations import LATEST, MIGRATIONS, current_version, migrate
from tokenservice_server.scopes import ScopeCatalog
from tokenservice_server.service import TokenService
from tokenservice_server.store import Store


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    assert [number for number, _ in MIGRATIONS] == list(range(1, LATEST + 1))
    assert LATEST >= 2


def test_a_version_1_database_upgrades_and_its_tokens_keep_working(database_url: str) -> None:
    db = open_database(database_url)
    assert migrate(db, target=1) == [1]
    with db.connection_context():
        assert current_version(db) == 1
    config = Config(bcrypt_rounds=4)
    service = TokenService(config, Store(db), ScopeCatalog.load(None), hasher_for(config))
    with connection(db):
        service.add_user("old@acme.test", "acme", ["api_token:manage", "pass:read"])
        old = [service.mint_for_email("old@acme.test", f"old{i}", ["pass:read"], None)
               for i in range(3)]
        revoked = service.mint_for_email("old@acme.test", "gone", ["pass:read"], None)
        manager = service.mint_for_email("old@acme.test", "mgr", ["api_token:manage"], None)
        service.revoke_token(service.authenticate(manager.raw), revoked.info.id)
    close_all(db)

    # The server upgrades on start, and the old tokens behave as before.
    ts = start_server(make_config(database_url))
    try:
        with connection(ts.server.store.db):
            assert current_version(ts.server.store.db) == LATEST
        for created in old:
            answer = ts.authenticate(created.raw)
            assert answer.token_id == created.info.id
            assert list(answer.scopes) == ["pass:read"]
        with pytest.raises(grpc.RpcError) as caught:
            ts.authenticate(revoked.raw)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # And new tokens can be made beside them.
        assert ts.authenticate(ts.mint("old@acme.test", ["pass:read"])).user_email
    finally:
        ts.channel.close()
        ts.server.stop(grace=1)


def test_migrate_twice_changes_nothing(database_url: str) -> None:
    first = cli("migrate", "--database-url", database_url, check=True)
    assert f"applied {', '.join(str(n) for n, _ in MIGRATIONS)}" in first.stdout
    again = cli("migrate", "--database-url", database_url, check=True)
    assert "applied" not in again.stdout


def test_replicas_migrating_at_once_apply_each_migration_once(database_url: str) -> None:
    env = {"TOKENSERVICE_BCRYPT_ROUNDS": "4"}
    procs = [
        subprocess.Popen([TOKENSERVICE, "migrate", "--database-url", database_url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **env})
        for _ in range(3)
    ]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert all(code == 0 for code, _, _ in results), results
    applied = [out for _, out, _ in results if "applied" in out]
    assert len(applied) == 1, f"exactly one process applies the migrations: {results}"
    db = open_database(database_url)
    with db.connection_context():
        rows = db.execute_sql("SELECT version FROM schema_version ORDER BY version").fetchall()
    close_all(db)
    assert [r[0] for r in rows] == list(range(1, LATEST + 1))
