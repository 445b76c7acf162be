"""The example consumer (examples/consumer) run the way its README says, as separate
processes, against a real tokenservice: allowed, wrong scope, revoked token."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenservice_client import TokenServiceClient

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "consumer"


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    # The example behaves the same whatever store tokenservice uses.
    return sqlite_database_url


@pytest.fixture(params=["sync", "aio", "sync-lease-cache", "aio-lease-cache"])
def consumer(request: pytest.FixtureRequest, ts) -> Iterator[str]:
    """`python examples/consumer/server.py` on a free port; yields its target.

    The lease-cache variants answer repeated tokens from memory: the test's
    revocation must still be refused by the very next call."""
    args = [sys.executable, str(EXAMPLE / "server.py"), "--tokenservice", ts.target, "--port", "0"]
    if request.param.startswith("aio"):
        args.append("--aio")
    if request.param.endswith("lease-cache"):
        watcher = f"watcher-{uuid.uuid4().hex[:8]}@example.com"
        ts.add_user(watcher, "acme", ["api_token:verify"])
        args += ["--lease-cache-token", ts.mint(watcher, ["api_token:verify"])]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"listening on (\S+)$", line.strip())
        assert match, f"the example did not start: {line}{proc.stdout.read()}"  # type: ignore[union-attr]
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_client(target: str, token: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE / "client.py"), "--target", target, *command],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={"TOKEN": token, "PATH": "/usr/bin:/bin"},
    )


def test_example_consumer_allows_denies_and_honours_revocation(consumer: str, ts) -> None:
    email = f"owner-{uuid.uuid4().hex[:8]}@example.com"
    ts.add_user(email, "acme", ["api_token:manage", "pass:read", "pass:create"])
    permissions = ["api_token:manage", "pass:read", "pass:create"]
    manager = TokenServiceClient(ts.target, token=ts.mint(email, permissions))
    writer = manager.create_token("writer", ["pass:read", "pass:create"])
    reader = manager.create_token("reader", ["pass:read"])

    made = run_client(consumer, writer.token, "create", "Gold card")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["createdBy"] == email and created["orgId"] == "acme"

    got = run_client(consumer, reader.token, "get", created["id"])
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["title"] == "Gold card"
    listed = run_client(consumer, reader.token, "list")
    assert [json.loads(line)["title"] for line in listed.stdout.splitlines()] == ["Gold card"]
    me = json.loads(run_client(consumer, reader.token, "whoami").stdout)
    assert me["scopes"] == ["pass:read"] and me["tokenId"] == reader.api_token.id

    wrong_scope = run_client(consumer, reader.token, "create", "Silver card")
    assert wrong_scope.returncode == 1
    assert wrong_scope.stderr.startswith("PERMISSION_DENIED")

    manager.revoke_token(reader.api_token.id)
    revoked = run_client(consumer, reader.token, "get", created["id"])
    assert revoked.returncode == 1
    assert revoked.stderr.startswith("UNAUTHENTICATED")

    bogus = run_client(consumer, "tks_" + "A" * 40, "whoami")
    assert bogus.stderr.startswith("UNAUTHENTICATED")


def test_example_stubs_match_the_example_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    args = ["protoc", f"-I{EXAMPLE}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(EXAMPLE / "passes.proto")]
    assert protoc.main(args) == 0
    for name in ("passes_pb2.py", "passes_pb2.pyi", "passes_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (EXAMPLE / name).read_text(), (
            f"{name} is stale: regenerate it (see examples/consumer/README.md)"
        )
