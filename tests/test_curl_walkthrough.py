"""clients/curl/walkthrough.sh against a real `tokenservice serve` with its REST shim."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import cli

pytest.importorskip("tokenservice_server.rest")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "clients" / "curl" / "walkthrough.sh"


@pytest.fixture
def rest_server(spawn, sqlite_database_url: str):
    if not shutil.which("curl"):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but curl is missing", pytrace=False)
        pytest.skip("curl is needed for the curl walkthrough")
    env = {"TOKENSERVICE_DATABASE_URL": sqlite_database_url}
    cli("user", "add", "--email", "ops@example.com", "--org", "acme",
        "--permissions", "api_token:manage,pass:read,invoice.view", env=env, check=True)
    minted = cli("token", "create", "--email", "ops@example.com", "--name", "bootstrap",
                 "--scopes", "api_token:manage,pass:read,invoice.view", env=env, check=True)
    token = minted.stdout.strip().splitlines()[-1]
    server = spawn(sqlite_database_url, rest=True)
    base_url = f"http://127.0.0.1:{server.http_port}"
    _wait_for_http(f"{base_url}/healthz")  # spawn waits for gRPC; the shim may lag
    return base_url, token


def _wait_for_http(url: str, attempts: int = 300) -> None:
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200")


def walk(base_url: str, token: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), base_url, token], capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("json_tool", ["jq", "python3"])
def test_walkthrough_passes_against_the_rest_shim(rest_server, json_tool: str) -> None:
    if json_tool == "jq" and not shutil.which("jq"):
        pytest.skip("jq is not installed; the python3 run covers the script")
    base_url, token = rest_server
    result = walk(base_url, token, JSON_TOOL=json_tool, SCOPES="pass:read,invoice.view")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith("0 failed")
    for step in ("201 POST /api/v1/api-tokens", "403 GET /api/v1/api-tokens",
                 "401 POST /api/v1/authenticate", "422 POST /api/v1/api-tokens"):
        assert step in result.stdout


def test_walkthrough_fails_on_a_mismatch(rest_server) -> None:
    base_url, _ = rest_server
    result = walk(base_url, "tks_" + "x" * 40)  # not a token: create answers 401, not 201
    assert result.returncode == 1
    assert "FAIL POST /api/v1/api-tokens: expected 201, got 401" in result.stderr

    base_url, token = rest_server
    too_strong = walk(base_url, token, SCOPES="loyalty:manage")  # not held by the user
    assert too_strong.returncode == 1
    assert "got 422" in too_strong.stderr
