"""Helpers for the REST shim's tests: the real shim (uvicorn) in front of a real server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from tokenservice_server.rest import RestServer

# Far enough ahead that no run of the suite sees it pass.
FUTURE = "2099-12-31T23:59:59Z"


def bearer_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Rest:
    """A running shim and an HTTP client pointed at it."""

    server: RestServer
    client: httpx.Client

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def create(
        self, token: str, name: str = "ci", scopes=("pass:read",), **extra
    ) -> httpx.Response:
        body = {"name": name, "scopes": list(scopes), **extra}
        return self.client.post("/api/v1/api-tokens", json=body, headers=bearer_header(token))


@contextmanager
def running_rest(grpc_target: str) -> Iterator[Rest]:
    """The shim on a free port in front of grpc_target, with a keep-alive client."""
    server = RestServer(grpc_target, "127.0.0.1", 0)
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            yield Rest(server, client)
    finally:
        server.stop(grace=1)
