"""The Node example (clients/node) against a real tokenservice: `npm ci`, then
`node index.js` calls ListScopes, CreateToken, Authenticate and RevokeToken, and
`node lease.js` caches verifications under a lease and still honours a revocation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import google.api
import pytest

from tokenservice_client import TokenServiceClient

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "clients" / "node"
GOOGLEAPIS = Path(next(iter(google.api.__path__))).parents[1]


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the Node example cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node_example() -> Path:
    """clients/node with its pinned dependencies installed by `npm ci`."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        _missing("node and npm are needed for the Node example (apt-get install nodejs npm)")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        _missing(f"npm ci failed: {result.stderr[-2000:]}")
    return NODE_DIR


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    return sqlite_database_url


def run_node(target: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TOKENSERVICE_TARGET": target,
        "TOKENSERVICE_TOKEN": token,
        "GOOGLEAPIS_PROTO_DIR": str(GOOGLEAPIS),
    }
    return subprocess.run(
        ["node", "index.js", *args], cwd=NODE_DIR, env=env, capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL,
    )


def test_node_example_lists_scopes_creates_authenticates_and_revokes(
    node_example: Path, ts
) -> None:
    email = f"node-{uuid.uuid4().hex[:8]}@example.com"
    ts.add_user(email, "acme", ["api_token:manage", "pass:read", "invoice.view"])
    bootstrap = ts.mint(email, ["api_token:manage", "pass:read", "invoice.view"])

    result = run_node(ts.target, bootstrap, "--scopes", "pass:read,invoice.view")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "api_token:manage" in report["scopes"] and "invoice.view" in report["scopes"]
    assert report["authenticated"]["tokenId"] == report["created"]["id"]
    assert report["authenticated"]["userEmail"] == email
    assert report["created"]["tokenPrefix"].startswith("tks_")
    assert "tks_" not in json.dumps(report["authenticated"])  # no raw token printed
    assert report["revoked"] == {"id": report["created"]["id"], "revoked": True}

    # The token Node created is real: the Python client sees it, with its scopes, and
    # revoked, so a run of the example leaves no working token behind.
    with TokenServiceClient(ts.target, token=bootstrap) as client:
        made = client.get_token(report["created"]["id"])
    assert made.name == "node example"
    assert sorted(made.scopes) == ["invoice.view", "pass:read"]
    assert made.HasField("revoked_at")


def test_node_example_reports_grpc_errors(node_example: Path, ts) -> None:
    email = f"node-{uuid.uuid4().hex[:8]}@example.com"
    ts.add_user(email, "acme", ["api_token:manage", "pass:read"])
    bootstrap = ts.mint(email, ["api_token:manage", "pass:read"])

    bad = run_node(ts.target, "tks_" + "x" * 40)
    assert bad.returncode == 1
    assert bad.stderr.startswith("UNAUTHENTICATED")

    too_strong = run_node(ts.target, bootstrap, "--scopes", "loyalty:manage")
    assert too_strong.returncode == 1
    assert too_strong.stderr.startswith("INVALID_ARGUMENT")


def test_node_lease_cache_answers_from_memory_and_refuses_once_revoke_returns(
    node_example: Path, ts
) -> None:
    email = f"node-{uuid.uuid4().hex[:8]}@example.com"
    ts.add_user(email, "acme", ["api_token:manage", "api_token:verify", "pass:read"])
    manager = TokenServiceClient(ts.target, token=ts.mint(email, ["api_token:manage", "pass:read"]))
    made = manager.create_token("watched", ["pass:read"])
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TOKENSERVICE_TARGET": ts.target,
        "TOKENSERVICE_VERIFY_TOKEN": ts.mint(email, ["api_token:verify"]),
        "GOOGLEAPIS_PROTO_DIR": str(GOOGLEAPIS),
    }
    node = subprocess.Popen(["node", "lease.js"], cwd=NODE_DIR, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert node.stdin is not None and node.stdout is not None

    def check(raw: str) -> dict:
        node.stdin.write(raw + "\n")
        node.stdin.flush()
        line = node.stdout.readline()
        assert line, node.stderr.read() if node.stderr else ""
        return json.loads(line)

    try:
        assert json.loads(node.stdout.readline()) == {"ready": True}
        assert check(made.token) == {"ok": True, "tokenId": made.api_token.id, "cached": False}
        assert check(made.token) == {"ok": True, "tokenId": made.api_token.id, "cached": True}
        manager.revoke_token(made.api_token.id, timeout=30)
        assert check(made.token) == {"ok": False, "code": "UNAUTHENTICATED"}

        # 3 a minute: a cache is promised one use at a time.
        limited = manager.create_token("limited", ["pass:read"], rate_limit=(3, 60))
        answers = [check(limited.token) for _ in range(8)]
        ok = [a for a in answers if a["ok"]]
        assert answers[0] == {"ok": True, "tokenId": limited.api_token.id, "cached": False}
        assert answers[1] == {"ok": True, "tokenId": limited.api_token.id, "cached": True}
        # The limit and the one use promised at a time, then refused for good.
        assert 3 <= len(ok) <= 4 and answers[-1] == {"ok": False, "code": "RESOURCE_EXHAUSTED"}
    finally:
        node.stdin.close()
        node.wait(timeout=30)
        manager.close()
