"""The command line (README, Command line), run as a real process."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from conftest import cli

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc


@pytest.fixture
def db(tmp_path: Path) -> dict[str, str]:
    return {"TOKENSERVICE_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}


def assert_one_line_error(result) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tokenservice: ")


def test_bootstrap_user_and_token_then_serve_and_authenticate(db, spawn) -> None:
    added = cli("user", "add", "--email", "Ops@Acme.test", "--org", "acme",
                "--permissions", "api_token:manage,pass:read", env=db)
    assert added.returncode == 0, added.stderr
    created = cli("token", "create", "--email", "ops@acme.test", "--name", "first",
                  "--scopes", "api_token:manage,pass:read", "--expires-at", "2099-01-01T00:00:00Z",
                  env=db)
    assert created.returncode == 0, created.stderr
    raw = created.stdout.strip().splitlines()[-1]
    assert raw.startswith("tks_") and raw == raw.strip()
    server = spawn(db["TOKENSERVICE_DATABASE_URL"])
    with grpc.insecure_channel(server.target) as channel:
        who = pb_grpc.TokenServiceStub(channel).Authenticate(pb.AuthenticateRequest(token=raw))
    assert who.user_email == "ops@acme.test" and who.org_id == "acme"
    assert list(who.scopes) == ["api_token:manage", "pass:read"]
    assert who.expires_at.ToJsonString() == "2099-01-01T00:00:00Z"


def test_scopes_prints_the_catalog(tmp_path: Path) -> None:
    result = cli("scopes")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 11
    assert lines[0].split()[0] == "api_token:manage" and "api_only" in lines[0]
    assert "api_only" not in [ln for ln in lines if ln.startswith("pass:read")][0]


def test_a_scopes_file_replaces_the_catalog(tmp_path: Path, db) -> None:
    scopes = tmp_path / "scopes.toml"
    scopes.write_text('[scopes."pass:read"]\ndescription = "Read passes"\n\n'
                      '[scopes."api_token:manage"]\ndescription = "Manage"\napi_only = true\n')
    result = cli("scopes", "--scopes-file", str(scopes))
    assert [ln.split()[0] for ln in result.stdout.splitlines()] == ["pass:read", "api_token:manage"]
    env = {**db, "TOKENSERVICE_SCOPES_FILE": str(scopes)}
    assert cli("user", "add", "--email", "a@b.c", "--org", "o", "--permissions",
               "invoice.view", env=env).returncode != 0
    broken = tmp_path / "broken.toml"
    broken.write_text("[scopes\n")
    assert_one_line_error(cli("scopes", "--scopes-file", str(broken)))
    assert_one_line_error(cli("scopes", "--scopes-file", str(tmp_path / "missing.toml")))


def test_migrate_creates_and_is_idempotent(db) -> None:
    first = cli("migrate", env=db)
    assert first.returncode == 0 and "applied" in first.stdout
    again = cli("migrate", env=db)
    assert again.returncode == 0 and "applied" not in again.stdout


def test_flags_win_over_the_environment(tmp_path: Path, db) -> None:
    flag_url = f"sqlite:///{tmp_path / 'flag.db'}"
    cli("migrate", "--database-url", flag_url, env=db)
    assert (tmp_path / "flag.db").exists() and not (tmp_path / "cli.db").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("user", "add", "--email", "x@acme.test", "--org", "acme", "--permissions", "nope"),
        # Scope names as the catalog spells them, or not at all: no case folding, no trimming.
        ("user", "add", "--email", "x@acme.test", "--org", "acme", "--permissions", "PASS:READ"),
        ("user", "add", "--email", "x@acme.test", "--org", "acme", "--permissions",
         "pass:read,\tpass:create"),
        ("token", "create", "--email", "dup@acme.test", "--name", "n", "--scopes", "Pass:Read"),
        ("user", "add", "--email", "not-an-email", "--org", "acme", "--permissions", "pass:read"),
        ("user", "add", "--email", "x@acme.test", "--permissions", "pass:read"),
        ("user", "disable", "--email", "nobody@acme.test"),
        ("token", "create", "--email", "nobody@acme.test", "--name", "n", "--scopes", "pass:read"),
        ("token", "create", "--email", "dup@acme.test", "--name", "n", "--scopes", "invoice.view"),
        ("token", "create", "--email", "dup@acme.test", "--name", "", "--scopes", "pass:read"),
        ("token", "create", "--email", "dup@acme.test", "--name", "n", "--scopes", "pass:read",
         "--expires-at", "yesterday"),
        ("token", "create", "--email", "dup@acme.test", "--name", "n", "--scopes", "pass:read",
         "--expires-at", "2001-01-01T00:00:00Z"),
        ("user", "add", "--email", "dup@acme.test", "--org", "acme", "--permissions", "pass:read"),
        ("serve", "--grpc-port", "99999"),
        ("serve", "--grpc-port", "abc"),
        ("migrate", "--database-url", "mysql://nope"),
        ("frobnicate",),
        (),
    ],
)
def test_bad_input_gets_one_line_and_a_non_zero_exit(db, args) -> None:
    assert cli("user", "add", "--email", "dup@acme.test", "--org", "acme",
               "--permissions", "pass:read", env=db).returncode == 0
    assert_one_line_error(cli(*args, env=db))


def test_bad_environment_is_one_line(db) -> None:
    assert_one_line_error(cli("migrate", env={**db, "TOKENSERVICE_BCRYPT_ROUNDS": "many"}))


def test_serve_refuses_a_port_in_use(db, spawn, tmp_path) -> None:
    first = spawn(db["TOKENSERVICE_DATABASE_URL"])
    result = cli("serve", "--no-rest", "--grpc-port", str(first.grpc_port), env=db, timeout=30)
    assert_one_line_error(result)
    assert "Traceback" not in result.stderr


def test_user_disable_stops_tokens_of_a_running_server(db, spawn) -> None:
    cli("user", "add", "--email", "s@acme.test", "--org", "acme", "--permissions", "pass:read",
        env=db, check=True)
    raw = cli("token", "create", "--email", "s@acme.test", "--name", "n", "--scopes",
              "pass:read", env=db, check=True).stdout.splitlines()[-1]
    server = spawn(db["TOKENSERVICE_DATABASE_URL"])
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TokenServiceStub(channel)
        for _ in range(3):
            stub.Authenticate(pb.AuthenticateRequest(token=raw))
        assert cli("user", "disable", "--email", "s@acme.test", env=db).returncode == 0
        with pytest.raises(grpc.RpcError) as info:
            stub.Authenticate(pb.AuthenticateRequest(token=raw))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
