"""TLS and mTLS on both faces, certificate reload on SIGHUP, and the plaintext refusal.

Every certificate comes from a throwaway CA made here (tests/certs.py); servers
are real `tokenservice serve` processes unless a test needs to look inside.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest
from certs import CertificateAuthority, Issued
from conftest import TOKENSERVICE, cli, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_cli import assert_one_line_error
from test_node_client import GOOGLEAPIS, node_example  # noqa: F401 - a fixture

import tokenservice_client as tsc
from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc
from tokenservice_server.config import Config, ConfigError, check_transport, load_config
from tokenservice_server.rest import RestServer
from tokenservice_server.tls import SUBJECT_METADATA, ServerTls, TlsFiles, peer_subject

# One connection per channel: gRPC would otherwise share a connection between
# channels to the same target, and a "new" channel would reuse an old handshake.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
WALKTHROUGH = Path(__file__).resolve().parents[1] / "clients" / "curl" / "walkthrough.sh"


@dataclass
class Pki:
    """Two unrelated CAs: `ca` signs the server and the good client, `other` a stranger."""

    ca: CertificateAuthority
    server: Issued
    client: Issued
    other: CertificateAuthority
    stranger: Issued
    folder: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority(tmp_path / "pki", "ca one")
    other = CertificateAuthority(tmp_path / "pki", "ca two")
    return Pki(
        ca=ca,
        server=ca.issue("tokens.test", server=True),
        client=ca.issue("billing service", client=True),
        other=other,
        stranger=other.issue("billing service", client=True),
        folder=tmp_path / "pki",
    )


def grpc_credentials(ca: CertificateAuthority, client: Issued | None = None):
    return grpc.ssl_channel_credentials(
        ca.cert_pem,
        client.key_pem if client else None,
        client.cert_pem if client else None,
    )


def https(ca: CertificateAuthority, client: Issued | None = None) -> ssl.SSLContext:
    """What httpx verifies the server with (and presents, given a client certificate)."""
    context = ssl.create_default_context(cafile=str(ca.cert))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def health_check(target: str, credentials: grpc.ChannelCredentials | None,
                 timeout: float = 5) -> int:
    """One health call on a connection of its own; raises grpc.RpcError when refused."""
    if credentials is None:
        channel = grpc.insecure_channel(target, OWN_CONNECTION)
    else:
        channel = grpc.secure_channel(target, credentials, OWN_CONNECTION)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout
        )
        return reply.status


@dataclass
class TlsServer:
    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tls.db'}"


@pytest.fixture
def token(db: str) -> str:
    """A manager's token in the database every server of a test uses."""
    env = {"TOKENSERVICE_DATABASE_URL": db}
    cli("user", "add", "--email", "ops@acme.test", "--org", "acme",
        "--permissions", "api_token:manage,pass:read", env=env, check=True)
    created = cli("token", "create", "--email", "ops@acme.test", "--name", "ops",
                  "--scopes", "api_token:manage,pass:read", env=env, check=True)
    return created.stdout.strip().splitlines()[-1]


@pytest.fixture
def serve_tls(tmp_path: Path, db: str) -> Iterator[Callable[..., TlsServer]]:
    """Starts `tokenservice serve` with the given flags; ready once TLS health answers."""
    started: list[subprocess.Popen] = []

    def start(*flags: str, ready: grpc.ChannelCredentials | None) -> TlsServer:
        grpc_port, http_port = free_port(), free_port()
        log_path = tmp_path / f"serve{len(started)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [TOKENSERVICE, "serve", "--grpc-port", str(grpc_port),
                 "--http-port", str(http_port), "--database-url", db, *flags],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "TOKENSERVICE_BCRYPT_ROUNDS": "4"},
            )
        started.append(proc)
        running = TlsServer(proc, grpc_port, http_port, log_path)
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{running.log()}")
            try:
                if health_check(running.target, ready, timeout=1) == 1:
                    return running
            except grpc.RpcError:
                time.sleep(0.1)
        raise AssertionError(f"server never became healthy:\n{running.log()}")

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_https(url: str, **client_options) -> httpx.Response:
    """The REST shim starts just after gRPC: GET until it answers."""
    last: Exception | None = None
    for _ in range(100):
        try:
            return httpx.get(url, timeout=5, **client_options)
        except httpx.ConnectError as exc:  # refused: not listening yet
            last = exc
            time.sleep(0.05)
    raise AssertionError(f"{url} never answered: {last!r}")


def tls_flags(pki: Pki, *, mutual: bool = False) -> tuple[str, ...]:
    flags = ("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    return flags + (("--tls-client-ca", str(pki.ca.cert)) if mutual else ())


# -- TLS ---------------------------------------------------------------------


def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(
    pki: Pki, token: str, serve_tls
) -> None:
    server = serve_tls(*tls_flags(pki), ready=grpc_credentials(pki.ca))
    # gRPC: the Python client with the CA, and a token.
    client = tsc.TokenServiceClient(
        server.target, token, channel_credentials=tsc.tls_channel_credentials(str(pki.ca.cert))
    )
    with client:
        assert client.authenticate(token).user_email == "ops@acme.test"
        assert [t.name for t in client.list_tokens().tokens] == ["ops"]
    # REST: https with the CA.
    r = wait_for_https(f"{server.base_url}/api/v1/api-tokens", verify=https(pki.ca),
                       headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and [t["name"] for t in r.json()["tokens"]] == ["ops"]
    # Plaintext on either face gets nowhere.
    with pytest.raises(grpc.RpcError) as refused:
        health_check(server.target, None, timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.http_port}/healthz", timeout=5)
    # A CA the server's certificate does not chain to is refused too.
    with pytest.raises(grpc.RpcError):
        health_check(server.target, grpc_credentials(pki.other), timeout=2)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server.base_url}/healthz", verify=https(pki.other), timeout=5)


def test_the_metrics_port_serves_https_only_and_asks_mtls_like_the_rest(
    pki: Pki, serve_tls
) -> None:
    port = free_port()
    server = serve_tls(*tls_flags(pki, mutual=True), "--metrics-port", str(port),
                       ready=grpc_credentials(pki.ca, pki.client))
    del server
    url = f"https://127.0.0.1:{port}/metrics"
    page = wait_for_https(url, verify=https(pki.ca, pki.client))
    assert page.status_code == 200 and "tokenservice_rpc_requests_total" in page.text
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    for wrong in (None, pki.stranger):
        with pytest.raises(httpx.TransportError):
            httpx.get(url, verify=https(pki.ca, wrong), timeout=5)


def test_mtls_requires_a_client_certificate_from_the_client_ca(
    pki: Pki, token: str, serve_tls
) -> None:
    server = serve_tls(*tls_flags(pki, mutual=True), ready=grpc_credentials(pki.ca, pki.client))
    request = pb.AuthenticateRequest(token=token)

    def authenticate(client: Issued | None) -> pb.AuthenticateResponse:
        channel = grpc.secure_channel(server.target, grpc_credentials(pki.ca, client),
                                      OWN_CONNECTION)
        with channel:
            return pb_grpc.TokenServiceStub(channel).Authenticate(request, timeout=5)

    assert authenticate(pki.client).user_email == "ops@acme.test"
    for wrong in (None, pki.stranger):
        with pytest.raises(grpc.RpcError) as refused:
            authenticate(wrong)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    url = f"{server.base_url}/api/v1/authenticate"
    good = wait_for_https(f"{server.base_url}/healthz", verify=https(pki.ca, pki.client))
    assert good.status_code == 200
    r = httpx.post(url, json={"token": token}, verify=https(pki.ca, pki.client), timeout=10)
    assert r.status_code == 200 and r.json()["userEmail"] == "ops@acme.test"
    for wrong in (None, pki.stranger):
        # TLS 1.3 finishes the client's side of the handshake before the server
        # judges its certificate: the refusal arrives as the first read fails.
        with pytest.raises(httpx.TransportError):
            httpx.post(url, json={"token": token}, verify=https(pki.ca, wrong), timeout=10)

    # The interceptor of a consumer service reaches an mTLS tokenservice too.
    interceptor = tsc.AuthInterceptor(
        server.target, {"/grpc.health.v1.Health/Check": ["pass:read"]}, public=(),
        channel_credentials=tsc.tls_channel_credentials(
            str(pki.ca.cert), str(pki.client.cert), str(pki.client.key)
        ),
    )
    consumer = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[interceptor])
    from grpc_health.v1.health import HealthServicer

    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), consumer)
    port = consumer.add_insecure_port("127.0.0.1:0")
    consumer.start()
    try:
        creds = tsc.token_credentials(token, grpc.local_channel_credentials())
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        consumer.stop(None)


# -- the caller's certificate subject ------------------------------------------


class _SubjectEcho(pb_grpc.TokenServiceServicer):
    """ListScopes answers with peer_subject(): what the rules would see."""

    async def ListScopes(self, request, context):  # noqa: N802 - gRPC's name
        subject = peer_subject(context)
        return pb.ListScopesResponse(
            scopes=[pb.Scope(name="subject", description=subject or "none")]
        )


def test_the_callers_subject_reaches_grpc_directly_and_through_the_shim(
    pki: Pki, tmp_path: Path
) -> None:
    """From the handshake on gRPC; from the shim over its Unix socket; never from a header."""
    tls = ServerTls(TlsFiles(str(pki.server.cert), str(pki.server.key), str(pki.ca.cert)))
    socket_path = tmp_path / "grpc.sock"
    loop = asyncio.new_event_loop()
    server: grpc.aio.Server = loop.run_until_complete(_start_echo(tls, str(socket_path)))
    port = server.port  # type: ignore[attr-defined]
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    rest = RestServer(f"unix:{socket_path}", "127.0.0.1", 0, tls=tls)
    rest.start(loop)
    try:
        creds = grpc_credentials(pki.ca, pki.client)
        with grpc.secure_channel(f"127.0.0.1:{port}", creds, OWN_CONNECTION) as channel:
            direct = pb_grpc.TokenServiceStub(channel).ListScopes(
                pb.ListScopesRequest(), metadata=[(SUBJECT_METADATA, "CN=forged")], timeout=5
            )
        assert direct.scopes[0].description == "CN=billing service,O=tokenservice tests"

        r = httpx.get(f"https://127.0.0.1:{rest.port}/api/v1/scopes",
                      headers={SUBJECT_METADATA: "CN=forged"}, verify=https(pki.ca, pki.client),
                      timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["scopes"][0]["description"] == "CN=billing service,O=tokenservice tests"

        # On the Unix socket without the shim's metadata there is no subject; on any
        # other connection (loopback TCP here) the metadata is not believed.
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            bare = pb_grpc.TokenServiceStub(channel).ListScopes(pb.ListScopesRequest(), timeout=5)
        assert bare.scopes[0].description == "none"
        plain_port = server.plain_port  # type: ignore[attr-defined]
        with grpc.insecure_channel(f"127.0.0.1:{plain_port}") as channel:
            forged = pb_grpc.TokenServiceStub(channel).ListScopes(
                pb.ListScopesRequest(), metadata=[(SUBJECT_METADATA, "CN=forged")], timeout=5
            )
        assert forged.scopes[0].description == "none"
    finally:
        rest.stop(grace=1)
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _start_echo(tls: ServerTls, socket_path: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_TokenServiceServicer_to_server(_SubjectEcho(), server)
    server.port = server.add_secure_port("127.0.0.1:0", tls.grpc_credentials())  # type: ignore[attr-defined]
    server.add_insecure_port(f"unix:{socket_path}")
    server.plain_port = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
    await server.start()
    return server


# -- reload on SIGHUP -------------------------------------------------------------


def _replace(target: Issued, source: Issued) -> None:
    """Writes source's files over target's, the way a certificate renewal does."""
    shutil.copyfile(source.cert, target.cert)
    shutil.copyfile(source.key, target.key)


def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def _serves(target: str, credentials: grpc.ChannelCredentials) -> bool:
    try:
        return health_check(target, credentials, timeout=2) == 1
    except grpc.RpcError:
        return False


def test_sighup_serves_a_new_certificate_to_new_connections_only(
    pki: Pki, token: str, serve_tls, tmp_path: Path
) -> None:
    live = Issued(tmp_path / "live.crt", tmp_path / "live.key", pki.server.subject)
    _replace(live, pki.server)
    server = serve_tls("--tls-cert", str(live.cert), "--tls-key", str(live.key),
                       ready=grpc_credentials(pki.ca))
    old_ca, new_ca = pki.ca, pki.other
    renewed = new_ca.issue("tokens.test", server=True)

    # Connections made before the reload, each with one call done.
    old_channel = grpc.secure_channel(server.target, grpc_credentials(old_ca), OWN_CONNECTION)
    old_stub = pb_grpc.TokenServiceStub(old_channel)
    request = pb.AuthenticateRequest(token=token)
    assert old_stub.Authenticate(request, timeout=5).user_email == "ops@acme.test"
    old_http = httpx.Client(base_url=server.base_url, verify=https(old_ca), timeout=10)
    assert wait_for_https(f"{server.base_url}/healthz", verify=https(old_ca)).status_code == 200
    assert old_http.get("/healthz").status_code == 200
    try:
        _replace(live, renewed)
        server.proc.send_signal(signal.SIGHUP)
        _until(lambda: _serves(server.target, grpc_credentials(new_ca)),
               "a new gRPC connection gets the new certificate")
        # New connections: the new certificate on both faces, the old one nowhere.
        assert not _serves(server.target, grpc_credentials(old_ca))
        assert httpx.get(f"{server.base_url}/healthz", verify=https(new_ca),
                         timeout=10).status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{server.base_url}/healthz", verify=https(old_ca), timeout=10)
        # Established connections carry on (a reconnect would fail: they trust old_ca only).
        assert old_stub.Authenticate(request, timeout=5).user_email == "ops@acme.test"
        assert old_http.get("/healthz").status_code == 200
        assert server.proc.poll() is None

        # A broken renewal keeps the certificate in use.
        live.cert.write_text("not a certificate\n")
        server.proc.send_signal(signal.SIGHUP)
        _until(lambda: "certificates not reloaded" in server.log(), "the warning is logged")
        assert _serves(server.target, grpc_credentials(new_ca))
        assert httpx.get(f"{server.base_url}/healthz", verify=https(new_ca),
                         timeout=10).status_code == 200
    finally:
        old_http.close()
        old_channel.close()


def test_workers_serve_mtls_and_pass_sighup_on(pki: Pki, token: str, serve_tls,
                                                 tmp_path: Path, db: str) -> None:
    live = Issued(tmp_path / "live.crt", tmp_path / "live.key", pki.server.subject)
    _replace(live, pki.server)
    server = serve_tls("--workers", "2", "--tls-cert", str(live.cert), "--tls-key",
                       str(live.key), "--tls-client-ca", str(pki.ca.cert),
                       ready=grpc_credentials(pki.ca, pki.client))
    r = wait_for_https(f"{server.base_url}/api/v1/api-tokens", verify=https(pki.ca, pki.client),
                       headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and len(r.json()["tokens"]) == 1
    # The supervisor's shim passes its HTTPS client's subject on to the worker.
    r = httpx.post(f"{server.base_url}/api/v1/api-tokens",
                   json={"name": "via a worker", "scopes": ["pass:read"]},
                   headers={"Authorization": f"Bearer {token}"},
                   verify=https(pki.ca, pki.client), timeout=10)
    assert r.status_code == 201, r.text
    events = [json.loads(line) for line in cli(
        "audit", "--database-url", db, check=True).stdout.splitlines() if line.strip()]
    made = [e for e in events if e["details"].get("name") == "via a worker"]
    assert made[0]["details"]["client_subject"] == "CN=billing service,O=tokenservice tests"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base_url}/healthz", verify=https(pki.ca), timeout=10)

    renewed = pki.other.issue("tokens.test", server=True)
    _replace(live, renewed)
    server.proc.send_signal(signal.SIGHUP)
    new = grpc_credentials(pki.other, pki.client)
    _until(lambda: _serves(server.target, new), "a worker serves the new certificate")
    # Eight new connections: the kernel spreads them over both workers; all see it.
    assert all(_serves(server.target, new) for _ in range(8))
    assert httpx.get(f"{server.base_url}/healthz", verify=https(pki.other, pki.client),
                     timeout=10).status_code == 200
    assert server.proc.poll() is None


# -- `tokenservice rest` in front of a TLS server ------------------------------------


def test_rest_command_dials_an_mtls_grpc_server(pki: Pki, token: str, serve_tls) -> None:
    server = serve_tls(*tls_flags(pki, mutual=True), "--no-rest",
                       ready=grpc_credentials(pki.ca, pki.client))
    shim_cert = pki.ca.issue("rest shim", server=True, client=True)
    port = free_port()
    proc = subprocess.Popen(
        [TOKENSERVICE, "rest", "--grpc-target", f"localhost:{server.grpc_port}",
         "--http-port", str(port), "--tls-ca", str(pki.ca.cert),
         "--tls-cert", str(shim_cert.cert), "--tls-key", str(shim_cert.key)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"https://127.0.0.1:{port}/api/v1/api-tokens"
    bearer = {"Authorization": f"Bearer {token}"}
    try:
        r = wait_for_https(url, verify=https(pki.ca), headers=bearer)
        assert r.status_code == 200 and len(r.json()["tokens"]) == 1
        # SIGHUP: the shim's HTTPS face takes a renewed certificate; its channel to
        # gRPC carries on with the client certificate it started with.
        _replace(shim_cert, pki.other.issue("rest shim", server=True))
        proc.send_signal(signal.SIGHUP)

        def renewed() -> bool:
            try:
                return httpx.get(url, verify=https(pki.other), headers=bearer,
                                 timeout=10).status_code == 200
            except httpx.ConnectError:
                return False

        _until(renewed, "the shim serves the renewed certificate")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# -- refusing plaintext, and bad flags ------------------------------------------------


def test_a_non_loopback_host_without_tls_is_refused_unless_plaintext(db: str, serve_tls) -> None:
    refused = cli("serve", "--host", "0.0.0.0", "--grpc-port", str(free_port()),
                  "--database-url", db, "--no-rest", timeout=30)
    assert_one_line_error(refused)
    assert "without TLS" in refused.stderr and "--plaintext" in refused.stderr
    # The flag and the environment variable both say the network does TLS.
    server = serve_tls("--host", "0.0.0.0", "--plaintext", "--no-rest", ready=None)
    assert health_check(server.target, None) == 1
    env = {"TOKENSERVICE_PLAINTEXT": "1", "TOKENSERVICE_HOST": "0.0.0.0"}
    assert load_config({}, env).plaintext is True
    check_transport(load_config({}, env))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "::1", "localhost", "[::1]"])
def test_loopback_hosts_need_no_tls(host: str) -> None:
    check_transport(Config(host=host))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "tokens.example.com"])
def test_other_hosts_need_tls(host: str) -> None:
    with pytest.raises(ConfigError, match="without TLS"):
        check_transport(Config(host=host))


def test_tls_flags_that_do_not_fit_are_one_line_errors(pki: Pki, db: str,
                                                        tmp_path: Path) -> None:
    cert, key, ca = str(pki.server.cert), str(pki.server.key), str(pki.ca.cert)
    base = ("serve", "--database-url", db, "--grpc-port", str(free_port()), "--no-rest")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nonsense\n")
    cases = [
        (("--tls-cert", cert), "go together"),
        (("--tls-key", key), "go together"),
        (("--tls-client-ca", ca), "needs --tls-cert"),
        (("--tls-cert", cert, "--tls-key", key, "--plaintext"), "contradicts"),
        (("--tls-cert", cert, "--tls-key", str(pki.client.key)), "cannot use"),
        (("--tls-cert", str(garbage), "--tls-key", key), "cannot use"),
        (("--tls-cert", cert, "--tls-key", str(tmp_path / "missing.key")), "cannot read"),
        (("--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(garbage)), "cannot use"),
    ]
    for flags, message in cases:
        result = cli(*base, *flags, timeout=30)
        assert_one_line_error(result)
        assert message in result.stderr, (flags, result.stderr)
    env_only = cli(*base, env={"TOKENSERVICE_TLS_CERT": cert}, timeout=30)
    assert_one_line_error(env_only)



# -- the in-process shim's private socket ------------------------------------------


def test_serve_shim_names_each_client_to_grpc_over_its_private_socket(
    serve_tls, monkeypatch
) -> None:
    """The failure throttle counts per HTTP client, not per shim, through the Unix socket."""
    monkeypatch.setenv("TOKENSERVICE_AUTH_FAILURE_BURST", "3")
    monkeypatch.setenv("TOKENSERVICE_AUTH_FAILURE_REFILL_PER_SECOND", "0.01")
    monkeypatch.setenv("TOKENSERVICE_LOOKUP_FAILURE_BURST", "1000")
    server = serve_tls(ready=None)
    base = f"http://127.0.0.1:{server.http_port}"

    def attempt(address: str) -> int:
        transport = httpx.HTTPTransport(local_address=address)
        with httpx.Client(base_url=base, transport=transport, timeout=10) as client:
            return client.post("/api/v1/authenticate", json={"token": "tks_bogus"}).status_code

    wait_for_https(f"{base}/healthz")
    statuses = [attempt("127.0.0.2") for _ in range(6)]
    assert statuses[0] == 401 and statuses[-1] == 429, statuses
    assert attempt("127.0.0.3") == 401


# -- the README's own CA -------------------------------------------------------------


def _readme_block(heading: str, marker: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1] for b in section.split("```sh\n")[1:]]
    return next(b.split("```", 1)[0] for b in blocks if marker in b)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_the_readme_openssl_commands_make_certificates_serve_accepts(
    tmp_path: Path, token: str, serve_tls
) -> None:
    folder = tmp_path / "readme-pki"
    folder.mkdir()
    script = _readme_block("TLS and mTLS", "openssl req")
    done = subprocess.run(["sh", "-e", "-c", script], cwd=folder, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ca, cert, key = (str(folder / n) for n in ("ca.crt", "client.crt", "client.key"))
    creds = tsc.tls_channel_credentials(ca, cert, key)
    server = serve_tls("--tls-cert", str(folder / "server.crt"), "--tls-key",
                       str(folder / "server.key"), "--tls-client-ca", ca, ready=creds)
    with tsc.TokenServiceClient(f"localhost:{server.grpc_port}", token=token,
                                channel_credentials=creds) as tokens:
        assert tokens.authenticate(token).user_email == "ops@acme.test"
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    r = wait_for_https(f"https://localhost:{server.http_port}/healthz", verify=context)
    assert r.status_code == 200


# -- the Node example and the curl walkthrough over mTLS ------------------------------


def _client_env(pki: Pki) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TOKENSERVICE_CA_FILE": str(pki.ca.cert),
        "TOKENSERVICE_CERT_FILE": str(pki.client.cert),
        "TOKENSERVICE_KEY_FILE": str(pki.client.key),
    }


def test_node_example_and_curl_walkthrough_over_mtls(
    pki: Pki, token: str, serve_tls, node_example: Path  # noqa: F811 - the fixture
) -> None:
    server = serve_tls(*tls_flags(pki, mutual=True), ready=grpc_credentials(pki.ca, pki.client))
    env = {**_client_env(pki), "TOKENSERVICE_TARGET": f"localhost:{server.grpc_port}",
           "TOKENSERVICE_TOKEN": token, "GOOGLEAPIS_PROTO_DIR": str(GOOGLEAPIS)}
    node = subprocess.run(["node", "index.js"], cwd=node_example, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert node.returncode == 0, node.stderr
    assert json.loads(node.stdout)["authenticated"]["userEmail"] == "ops@acme.test"
    no_cert = {k: v for k, v in env.items() if k not in ("TOKENSERVICE_CERT_FILE",
                                                         "TOKENSERVICE_KEY_FILE")}
    refused = subprocess.run(["node", "index.js"], cwd=node_example, env=no_cert,
                             capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
    assert refused.returncode == 1 and refused.stderr.startswith("UNAVAILABLE"), refused.stderr

    if not shutil.which("curl"):
        pytest.skip("curl is needed for the curl walkthrough")
    base = f"https://localhost:{server.http_port}"
    wait_for_https(f"{base}/healthz", verify=https(pki.ca, pki.client))
    walked = subprocess.run(["bash", str(WALKTHROUGH), base, token], env=_client_env(pki),
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert walked.returncode == 0, walked.stdout + walked.stderr
    assert "FAIL" not in walked.stderr


def test_the_audit_log_records_the_callers_verified_certificate_subject(
    pki: Pki, token: str, serve_tls, db: str
) -> None:
    """Who made a change, as mTLS proved it: on gRPC from the handshake, on REST from
    the HTTPS client's certificate; a header or metadata claiming one is ignored."""
    server = serve_tls(*tls_flags(pki, mutual=True), ready=grpc_credentials(pki.ca, pki.client))
    forged = (SUBJECT_METADATA, "CN=forged")
    with grpc.secure_channel(server.target, grpc_credentials(pki.ca, pki.client),
                             OWN_CONNECTION) as channel:
        pb_grpc.TokenServiceStub(channel).CreateToken(
            pb.CreateTokenRequest(name="over grpc", scopes=["pass:read"]),
            metadata=[("authorization", f"Bearer {token}"), forged], timeout=10,
        )
    verify = https(pki.ca, pki.client)
    assert wait_for_https(f"{server.base_url}/healthz", verify=verify).status_code == 200
    r = httpx.post(f"{server.base_url}/api/v1/api-tokens",
                   json={"name": "over rest", "scopes": ["pass:read"]},
                   headers={"Authorization": f"Bearer {token}", forged[0]: forged[1]},
                   verify=verify, timeout=10)
    assert r.status_code == 201, r.text
    lines = cli("audit", "--database-url", db, check=True).stdout.splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    subjects = {e["details"].get("name"): e["details"].get("client_subject")
                for e in events if e["action"] == "token.create"}
    expected = "CN=billing service,O=tokenservice tests"
    assert subjects == {"ops": None, "over grpc": expected, "over rest": expected}
