"""GET /metrics: the Prometheus page, its counts, and that it holds no secret."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import cli, free_port
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

AUTHENTICATE = "/tokenservice.v1.TokenService/Authenticate"


def scrape(url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    page = httpx.get(url, timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(page.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return page.text, samples


def authenticate(target: str, token: str) -> grpc.StatusCode:
    """One call on a channel of its own, so `--workers` spreads calls over processes."""
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.TokenServiceStub(channel).Authenticate(
                pb.AuthenticateRequest(token=token), timeout=10
            )
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def setup_user(url: str, email: str) -> str:
    env = {"TOKENSERVICE_DATABASE_URL": url}
    cli("user", "add", "--email", email, "--org", "acme", "--permissions",
        "api_token:manage,pass:read", env=env, check=True)
    return cli("token", "create", "--email", email, "--name", "m", "--scopes", "pass:read",
               env=env, check=True).stdout.strip().splitlines()[-1]


def test_metrics_count_rpcs_and_outcomes_and_hold_no_secret(tmp_path, spawn) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    email = "metrics-person@example.com"
    token = setup_user(url, email)
    server = spawn(url, rest=True)
    for _ in range(3):
        assert authenticate(server.target, token) == grpc.StatusCode.OK
    bad = token[:-8] + "AAAAAAAA"
    assert authenticate(server.target, bad) == grpc.StatusCode.UNAUTHENTICATED
    cli("user", "disable", "--email", email, env={"TOKENSERVICE_DATABASE_URL": url}, check=True)
    assert authenticate(server.target, token) == grpc.StatusCode.UNAUTHENTICATED

    text, samples = scrape(f"http://127.0.0.1:{server.http_port}/metrics")
    ok = (("code", "OK"), ("method", AUTHENTICATE))
    refused = (("code", "UNAUTHENTICATED"), ("method", AUTHENTICATE))
    assert samples[("tokenservice_rpc_requests_total", ok)] == 3
    assert samples[("tokenservice_rpc_requests_total", refused)] == 2
    assert samples[("tokenservice_rpc_duration_seconds_count", (("method", AUTHENTICATE),))] == 5
    outcome = {k[1][0][1]: v for k, v in samples.items()
               if k[0] == "tokenservice_authentications_total"}
    assert outcome == {"ok": 3, "invalid": 1, "disabled": 1, "revoked": 0, "expired": 0,
                       "throttled": 0, "rate_limited": 0}
    assert samples[("tokenservice_database_up", ())] == 1
    assert ("tokenservice_bcrypt_queue_depth", ()) in samples
    for secret in (token, token[4:], bad, email):
        assert secret not in text


def test_metric_port_of_its_own(tmp_path, spawn) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    token = setup_user(url, "p@example.com")
    port = free_port()
    server = spawn(url, "--metrics-port", str(port))
    assert authenticate(server.target, token) == grpc.StatusCode.OK
    _, samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert samples[("tokenservice_authentications_total", (("outcome", "ok"),))] == 1


def test_metrics_off_count_nothing_and_have_no_page(tmp_path, spawn) -> None:
    """TOKENSERVICE_METRICS=0: the server serves as ever, /metrics is no route, and a
    metrics port of its own is a contradiction refused before anything starts."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    token = setup_user(url, "off@example.com")
    server = spawn(url, rest=True, env={"TOKENSERVICE_METRICS": "0"})
    assert authenticate(server.target, token) == grpc.StatusCode.OK
    page = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10)
    assert page.status_code == 404
    assert page.json()["error"]["code"] == "not_found"
    refused = cli("serve", "--database-url", url, "--grpc-port", str(free_port()),
                  "--metrics-port", str(free_port()), "--no-rest",
                  env={"TOKENSERVICE_METRICS": "0"})
    assert refused.returncode != 0
    assert "--metrics-port needs metrics on" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def _per_process_counts(metrics_dir: Path) -> list[float]:
    """Authenticate OK counts of each process, read from its own file of the shared directory."""
    counts = []
    for path in sorted(metrics_dir.glob("counter_*.db")):
        alone = metrics_dir.parent / f"alone-{path.stem}"
        alone.mkdir()
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))
        value = registry.get_sample_value(
            "tokenservice_rpc_requests_total", {"method": AUTHENTICATE, "code": "OK"}
        )
        counts.append(value or 0.0)
    return counts


@pytest.mark.slow
def test_metrics_are_summed_across_workers(tmp_path, spawn) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    token = setup_user(url, "w@example.com")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    server = spawn(url, "--workers", "2", rest=True,
                   env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    calls = 40
    for _ in range(calls):
        assert authenticate(server.target, token) == grpc.StatusCode.OK
    _, samples = scrape(f"http://127.0.0.1:{server.http_port}/metrics")
    ok = (("code", "OK"), ("method", AUTHENTICATE))
    assert samples[("tokenservice_rpc_requests_total", ok)] == calls
    assert samples[("tokenservice_authentications_total", (("outcome", "ok"),))] == calls
    assert samples[("tokenservice_database_up", ())] == 1
    # The page summed two processes that each answered some of the calls (one
    # channel a call: SO_REUSEPORT spreads the connections).
    answered = [c for c in _per_process_counts(metrics_dir) if c > 0]
    assert len(answered) == 2 and sum(answered) == calls
