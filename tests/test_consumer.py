"""The example consumer (examples/consumer) run the way its README says, as separate
processes, against a real tokenservice: allowed, wrong scope, revoked token, and the
token's rate limit passed on as ratelimit-* metadata, over it refused."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_config, start_server

from tokenservice_client import TokenServiceClient
from tokenservice_server import metrics
from tokenservice_server.config import RateLimit

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "consumer"


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    # The example behaves the same whatever store tokenservice uses.
    return sqlite_database_url


@contextlib.contextmanager
def running_consumer(tokenservice: str, kind: str, lease_token: str | None = None
                     ) -> Iterator[str]:
    """`python examples/consumer/server.py` on a free port; yields its target.

    With `lease_token` it answers repeated tokens from its lease-kept cache."""
    args = [sys.executable, str(EXAMPLE / "server.py"), "--tokenservice", tokenservice,
            "--port", "0"]
    if kind == "aio":
        args.append("--aio")
    if lease_token:
        args += ["--lease-cache-token", lease_token]
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


@pytest.fixture(params=["sync", "aio", "sync-lease-cache", "aio-lease-cache"])
def consumer(request: pytest.FixtureRequest, ts) -> Iterator[str]:
    """The lease-cache variants answer repeated tokens from memory: the test's
    revocation must still be refused by the very next call."""
    kind, _, cached = request.param.partition("-")
    lease_token = None
    if cached:
        watcher = f"watcher-{uuid.uuid4().hex[:8]}@example.com"
        ts.add_user(watcher, "acme", ["api_token:verify"])
        lease_token = ts.mint(watcher, ["api_token:verify"])
    with running_consumer(ts.target, kind, lease_token) as target:
        yield target


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


def rate_limit_lines(stderr: str) -> dict[str, int]:
    found = re.findall(r"^(ratelimit-[a-z]+): ([0-9]+)$", stderr, re.MULTILINE)
    return {key: int(value) for key, value in found}


def rate_limited_count() -> float:
    """tokenservice's count of Authenticate calls refused for a token's rate limit."""
    page = metrics.render()[0].decode()
    match = re.search(r'^tokenservice_authentications_total\{outcome="rate_limited"\} (\S+)$',
                      page, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_the_consumer_passes_the_rate_limit_on_and_refuses_an_over_limit_caller(
    kind: str, sqlite_database_url: str
) -> None:
    # 2 per 10 hours, so nothing this test does is undone by the clock while it runs.
    ts = start_server(make_config(sqlite_database_url, rate_limit=RateLimit(2, 36_000.0)))
    try:
        email = f"owner-{uuid.uuid4().hex[:8]}@example.com"
        ts.add_user(email, "acme", ["pass:read"])
        token = ts.mint(email, ["pass:read"])
        with running_consumer(ts.target, kind) as target:
            first = run_client(target, token, "--rate-limit", "whoami")
            assert first.returncode == 0, first.stderr
            headers = rate_limit_lines(first.stderr)
            # Every call counted leaves the window 10 hours on, and at most a slice more.
            assert headers.pop("ratelimit-reset") in range(35_990, 39_601)
            assert headers == {"ratelimit-limit": 2, "ratelimit-remaining": 1}
            second = run_client(target, token, "--rate-limit", "list")
            assert second.returncode == 0, second.stderr
            headers = rate_limit_lines(second.stderr)
            assert headers.pop("ratelimit-reset") in range(35_990, 39_601)
            assert headers == {"ratelimit-limit": 2, "ratelimit-remaining": 0}

            before = rate_limited_count()
            over = run_client(target, token, "whoami")
            assert over.returncode == 1
            retry = re.fullmatch(r"RESOURCE_EXHAUSTED: .*rate limit.* \(retry after (\S+) s\)\n",
                                 over.stderr)
            assert retry, over.stderr
            assert 35_990 < float(retry.group(1)) <= 39_600
            assert rate_limited_count() == before + 1
            # Refused by the consumer itself until then: tokenservice is not asked again.
            again = run_client(target, token, "whoami")
            assert again.stderr.startswith("RESOURCE_EXHAUSTED") and "retry after" in again.stderr
            assert rate_limited_count() == before + 1
    finally:
        ts.channel.close()
        ts.server.stop(grace=1)
