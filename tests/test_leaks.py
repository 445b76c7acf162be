"""Leaked tokens: reported without credentials, revoked with their subtree, look-alikes dropped."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import RunningServer, bearer, make_config, start_server
from rest_helpers import bearer_header, running_rest

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice_client import TOKEN_REGEX, TokenServiceClient, find_tokens, is_token
from tokenservice_client.errors import error_from_rpc_error
from tokenservice_server import tokens
from tokenservice_server.config import Config
from tokenservice_server.crypto import BcryptHasher
from tokenservice_server.errors import RateLimited
from tokenservice_server.migrations import open_migrated
from tokenservice_server.scopes import ScopeCatalog
from tokenservice_server.service import TokenService
from tokenservice_server.store import Store

SOURCE = "https://gist.example.com/someone/abc123"


def look_alike(valid_checksum: bool) -> str:
    """A random token-shaped string: with a checksum that matches, or one that does not."""
    raw, _ = tokens.new_token("tks_")
    if valid_checksum:
        return raw  # a real shape whose lookup id the store has never seen
    return raw[:-1] + ("A" if raw[-1] != "A" else "B")


def report(ts: RunningServer, raws: list[str], source: str = SOURCE):
    return ts.stub.ReportLeakedTokens(
        pb.ReportLeakedTokensRequest(tokens=raws, source=source), timeout=30
    )


def works(ts: RunningServer, raw: str) -> bool:
    try:
        ts.authenticate(raw)
        return True
    except grpc.RpcError:
        return False


def test_a_reported_token_is_revoked_with_its_subtree(ts: RunningServer) -> None:
    admin = ts.manager("admin@acme.test", permissions=(
        "api_token:manage", "api_token:admin", "pass:read"))
    leaked = ts.stub.CreateToken(pb.CreateTokenRequest(
        name="leaked", scopes=["api_token:manage", "pass:read"]), metadata=bearer(admin))
    child = ts.stub.CreateToken(pb.CreateTokenRequest(name="child", scopes=["pass:read"]),
                                metadata=bearer(leaked.token))
    bystander = ts.stub.CreateToken(pb.CreateTokenRequest(name="b", scopes=["pass:read"]),
                                    metadata=bearer(admin))
    garbage, unknown = look_alike(False), look_alike(True)

    # No credentials: whoever found the secret may have it revoked.
    answer = report(ts, [garbage, leaked.token, unknown])
    assert [(r.token_prefix, r.revoked) for r in answer.results] == [
        (garbage[:12], False), (leaked.token[:12], True), (unknown[:12], False)]
    assert not works(ts, leaked.token) and not works(ts, child.token)
    assert works(ts, bystander.token) and works(ts, admin)

    audit = ts.stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=bearer(admin)).events
    reported = [e for e in audit if e.action == "token.leak_reported"]
    assert [e.token_id for e in reported] == [leaked.api_token.id]
    assert reported[0].details["source"] == SOURCE
    assert reported[0].client_address == "127.0.0.1" and reported[0].actor_email == ""
    cascade = [e for e in audit if e.action == "token.revoke"]
    assert [(e.token_id, e.details["revoked_with"]) for e in cascade] == [
        (child.api_token.id, leaked.api_token.id)]

    # Reported again (a second scanner): still revoked, and the owner sees where.
    again = report(ts, [leaked.token], source="https://other.example/paste")
    assert again.results[0].revoked
    audit = ts.stub.ListAuditEvents(pb.ListAuditEventsRequest(action="token.leak_reported"),
                                    metadata=bearer(admin)).events
    assert [e.details["source"] for e in audit] == ["https://other.example/paste", SOURCE]

    # A reporter repeating it, naming ever new places, cannot flood the owner's log:
    # a revoked token's report is recorded once a minute at most.
    for n in range(20):
        assert report(ts, [leaked.token] * 5, source=f"https://spam.example/{n}").results[0].revoked
    audit = ts.stub.ListAuditEvents(pb.ListAuditEventsRequest(action="token.leak_reported"),
                                    metadata=bearer(admin)).events
    assert len(audit) == 2


def test_at_most_100_tokens_and_a_sane_source(ts: RunningServer) -> None:
    for raws, source, field in (
        ([look_alike(False)] * 101, SOURCE, "tokens"),
        ([], SOURCE, "tokens"),
        ([look_alike(False)], "x" * 3000, "source"),
        ([look_alike(False)], "line\nbreak", "source"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            report(ts, raws, source)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_from_rpc_error(caught.value).fields == [field]
    assert len(report(ts, [look_alike(False)] * 100).results) == 100


def test_rest_reports_without_credentials(ts: RunningServer) -> None:
    ts.add_user("dev@acme.test", "acme", ["pass:read"])
    raw = ts.mint("dev@acme.test", ["pass:read"])
    with running_rest(ts.target) as rest:
        r = rest.client.post("/api/v1/leaked-tokens", json={"tokens": [raw], "source": SOURCE})
        assert r.status_code == 200, r.text
        assert r.json() == {"results": [{"tokenPrefix": raw[:12], "revoked": True}]}
        assert r.headers["cache-control"] == "no-store"
        r = rest.client.post("/api/v1/leaked-tokens", json={"tokens": [raw] * 101},
                             headers=bearer_header(raw))
        assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "tokens"
    assert not works(ts, raw)


@pytest.fixture
def strict(database_url: str) -> Iterator[RunningServer]:
    running = start_server(make_config(database_url, auth_failure_burst=3,
                                       auth_failure_refill_per_second=0.1))
    try:
        yield running
    finally:
        running.channel.close()
        running.server.stop(grace=1)


def test_reporting_unknown_tokens_is_throttled_like_authenticate(strict: RunningServer) -> None:
    # Look-alikes cost nothing and count for nothing: dropped by the checksum.
    for _ in range(3):
        report(strict, [look_alike(False) for _ in range(50)])
    # Checksum-valid strings the store does not know are failures, like at Authenticate.
    with pytest.raises(grpc.RpcError) as caught:
        for _ in range(5):
            report(strict, [look_alike(True) for _ in range(2)])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The same client's Authenticate is throttled too: one budget per address.
    with pytest.raises(grpc.RpcError) as caught:
        strict.authenticate(look_alike(True))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with running_rest(strict.target) as rest:
        r = rest.client.post("/api/v1/leaked-tokens", json={"tokens": [look_alike(True)]})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


class CountingStore(Store):
    """The real store, counting the token reads a leak report makes."""

    reads = 0

    def find_for_auth(self, lookup_id: str):
        CountingStore.reads += 1
        return super().find_for_auth(lookup_id)


def test_look_alikes_are_dropped_before_any_database_read(tmp_path: Path) -> None:
    store = CountingStore(open_migrated(f"sqlite:///{tmp_path}/leaks.db"))
    config = Config(bcrypt_rounds=4, auth_failure_burst=1000)
    service = TokenService(config, store, ScopeCatalog.default(),
                           BcryptHasher(rounds=4, slots=2, max_waiting=8))
    with store.connection():
        results = service.report_leaked_tokens([look_alike(False) for _ in range(100)], SOURCE)
        assert not any(r.revoked for r in results) and CountingStore.reads == 0
        service.report_leaked_tokens([look_alike(True)], SOURCE, "192.0.2.1")
        assert CountingStore.reads == 1
        # A throttled client is refused before reading anything.
        service.client_failures = type(service.client_failures)(burst=1, per_second=0.001)
        service.client_failures.fail("192.0.2.9")
        with pytest.raises(RateLimited):
            service.report_leaked_tokens([look_alike(True)], SOURCE, "192.0.2.9")
        assert CountingStore.reads == 1
    store.close()


# The scanner's half, in the client package.


def test_the_client_verifier_agrees_with_the_service() -> None:
    import re

    for _ in range(200):
        raw, _ = tokens.new_token("tks_")
        assert is_token(raw) and re.fullmatch(TOKEN_REGEX, raw)
        assert tokens.parse(raw, "tks_") is not None
        broken = raw[:20] + ("x" if raw[20] != "x" else "y") + raw[21:]
        assert not is_token(broken) and tokens.parse(broken, "tks_") is None
    raw, _ = tokens.new_token("acme_")
    assert is_token(raw, prefix="acme_") and not is_token(raw)


def test_find_tokens_in_text_keeps_only_real_shapes() -> None:
    real, _ = tokens.new_token("tks_")
    other, _ = tokens.new_token("tks_")
    text = (f'config = {{"key": "{real}"}}\nTOKEN={other} # twice: {real}\n'
            f"fake: {look_alike(False)}\nglued: x{other}y\n")
    assert find_tokens(text) == [real, other]


def test_the_scanner_command_reports_what_it_finds(ts: RunningServer, tmp_path: Path) -> None:
    ts.add_user("dev@acme.test", "acme", ["pass:read"])
    leaked = ts.mint("dev@acme.test", ["pass:read"])
    dump = tmp_path / "commit.diff"
    dump.write_text(f"+API_TOKEN={leaked}\n+OTHER={look_alike(False)}\n")
    command = [sys.executable, "-m", "tokenservice_client.scanning"]
    found = subprocess.run([*command, str(dump)], capture_output=True, text=True, timeout=60)
    assert found.returncode == 1 and found.stdout.split() == [leaked]
    reported = subprocess.run(
        [*command, "--report", ts.target, "--insecure", "--source", SOURCE, str(dump)],
        capture_output=True, text=True, timeout=60)
    assert reported.returncode == 1, reported.stderr
    assert reported.stdout.split() == [leaked[:12], "revoked"]
    assert not works(ts, leaked)
    with TokenServiceClient(ts.target, insecure=True) as client:
        again = client.report_leaked_tokens([leaked], SOURCE)
    assert again.results[0].revoked
    clean = subprocess.run(command, input="nothing here", capture_output=True, text=True,
                           timeout=60)
    assert clean.returncode == 0 and clean.stdout == ""
