"""Numbered migrations: a database made by the first schema upgrades and keeps its tokens."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import bcrypt
import grpc
import pytest
from conftest import TOKENSERVICE, bearer, cli, make_config, start_server

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice_server import tokens
from tokenservice_server.db import close_all, connection, is_sqlite, open_database
from tokenservice_server.migrations import LATEST, MIGRATIONS, current_version, migrate

DAY = 86_400_000_000


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    assert [number for number, _ in MIGRATIONS] == list(range(1, LATEST + 1))
    assert LATEST >= 3


def _insert_v1_rows(db, rounds: int = 4) -> dict[str, str]:
    """Users and tokens written as the first schema knew them, in its own SQL.

    Returns raw tokens by what they are: the current store writes columns an
    old schema lacks, so old data is made the way old code made it.
    """
    p = "?" if is_sqlite(db) else "%s"
    now = time.time_ns() // 1000
    user_id = uuid.uuid4()
    uid = user_id.hex if is_sqlite(db) else str(user_id)
    db.execute_sql(
        f"INSERT INTO users (id, email, org_id, permissions, disabled, created_at)"
        f" VALUES ({p}, {p}, {p}, {p}, {p}, {p})",
        (uid, "old@acme.test", "acme", json.dumps(["api_token:manage", "pass:read"]), False,
         now),
    )
    raws: dict[str, str] = {}
    for i, (kind, scopes, revoked, last_used) in enumerate([
        ("used", ["pass:read"], None, now - 10 * DAY),
        ("unused", ["pass:read"], None, None),
        ("revoked", ["pass:read"], now, None),
        ("manager", ["api_token:manage", "pass:read"], None, None),
    ]):
        raw, parts = tokens.new_token("tks_")
        hashed = bcrypt.hashpw(parts.secret.encode(), bcrypt.gensalt(rounds)).decode()
        token_id = uuid.uuid4()
        db.execute_sql(
            "INSERT INTO api_tokens (id, lookup_id, token_prefix, secret_hash, name, scopes,"
            " expires_at, last_used_at, revoked_at, created_at, user_id, org_id)"
            f" VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})",
            (token_id.hex if is_sqlite(db) else str(token_id), parts.lookup_id, raw[:12],
             hashed, kind, json.dumps(scopes), None, last_used, revoked, now + i, uid, "acme"),
        )
        raws[kind] = raw
    return raws


@pytest.mark.parametrize("version", range(1, LATEST))
def test_every_earlier_version_upgrades_and_its_tokens_keep_working(
    database_url: str, version: int
) -> None:
    # Rows made by the first schema's code, then carried to `version` by its migrations.
    db = open_database(database_url)
    assert migrate(db, target=1) == [1]
    with db.connection_context():
        with db.atomic():
            raws = _insert_v1_rows(db)
    assert migrate(db, target=version) == list(range(2, version + 1))
    with db.connection_context():
        assert current_version(db) == version
    close_all(db)

    # The server upgrades on start, and the old tokens behave as before.
    ts = start_server(make_config(database_url))
    try:
        with connection(ts.server.store.db):
            assert current_version(ts.server.store.db) == LATEST
        for kind in ("used", "unused", "manager"):
            assert ts.authenticate(raws[kind]).user_email == "old@acme.test"
        with pytest.raises(grpc.RpcError) as caught:
            ts.authenticate(raws["revoked"])
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Old rows carry the new columns: last use backfilled in days, no tree links.
        with connection(ts.server.store.db):
            rows = {name: (day, used) for name, day, used in ts.server.store.db.execute_sql(
                "SELECT name, last_used_day, last_used_at FROM api_tokens"
                " WHERE parent_id IS NULL AND replaced_by_id IS NULL").fetchall()}
        assert rows["unused"] == (0, None)
        assert rows["used"][0] == rows["used"][1] // DAY > 0
        # And new tokens can be made beside them.
        made = ts.stub.CreateToken(pb.CreateTokenRequest(name="new", scopes=["pass:read"]),
                                   metadata=bearer(raws["manager"]))
        assert ts.authenticate(made.token).user_email == "old@acme.test"
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
