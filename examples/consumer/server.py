"""An example consumer service protected by tokenservice.

    python examples/consumer/server.py --tokenservice localhost:50051 --port 50061

GetPass and ListPasses need `pass:read`, CreatePass needs `pass:create` (declared with
the decorator), WhoAmI needs any valid token. Passes live in memory, per organization.
`--aio` serves the same methods from a `grpc.aio` server.

`--lease-cache-token TOKEN` (a token holding `api_token:verify`) answers repeated
tokens from memory instead of calling Authenticate each time, and still refuses a
token as soon as its revocation has returned (see LeaseCache).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import grpc.aio

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the generated passes_pb2

import passes_pb2 as pb  # noqa: E402
import passes_pb2_grpc as pb_grpc  # noqa: E402
from tokenservice_client import (  # noqa: E402
    AsyncAuthInterceptor,
    AsyncLeaseCache,
    AuthInterceptor,
    LeaseCache,
    current_principal,
    requires_scopes,
)

SERVICE = "/example.passes.v1.PassService"

# Which scopes each method needs. CreatePass declares its own with @requires_scopes.
SCOPES: dict[str, tuple[str, ...]] = {
    f"{SERVICE}/GetPass": ("pass:read",),
    f"{SERVICE}/ListPasses": ("pass:read",),
    f"{SERVICE}/WhoAmI": (),  # any valid token
}


class PassStore:
    """Passes kept in memory, never visible across organizations."""

    def __init__(self) -> None:
        self._passes: dict[tuple[str, str], pb.Pass] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def create(self, title: str) -> pb.Pass:
        principal = current_principal()
        with self._lock:
            new = pb.Pass(
                id=str(next(self._ids)),
                title=title,
                org_id=principal.org_id,
                created_by=principal.email,
            )
            self._passes[(principal.org_id, new.id)] = new
        return new

    def get(self, pass_id: str) -> pb.Pass | None:
        with self._lock:
            return self._passes.get((current_principal().org_id, pass_id))

    def list(self) -> list[pb.Pass]:
        org = current_principal().org_id
        with self._lock:
            return [p for (o, _), p in sorted(self._passes.items()) if o == org]


def who_am_i() -> pb.WhoAmIResponse:
    principal = current_principal()
    return pb.WhoAmIResponse(
        email=principal.email,
        org_id=principal.org_id,
        scopes=sorted(principal.scopes),
        token_id=principal.token_id,
    )


class PassServicer(pb_grpc.PassServiceServicer):
    """Thin handlers: the principal comes from the interceptor, not from `context`."""

    def __init__(self, store: PassStore) -> None:
        self._store = store

    def GetPass(self, request: pb.GetPassRequest, context: grpc.ServicerContext) -> pb.Pass:
        found = self._store.get(request.id)
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such pass")
        return found

    @requires_scopes("pass:create")
    def CreatePass(self, request: pb.CreatePassRequest, context: grpc.ServicerContext) -> pb.Pass:
        return self._store.create(request.title)

    def ListPasses(
        self, request: pb.ListPassesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Pass]:
        yield from self._store.list()

    def WhoAmI(
        self, request: pb.WhoAmIRequest, context: grpc.ServicerContext
    ) -> pb.WhoAmIResponse:
        return who_am_i()


class AsyncPassServicer(pb_grpc.PassServiceServicer):
    """The same service for a `grpc.aio` server."""

    def __init__(self, store: PassStore) -> None:
        self._store = store

    async def GetPass(
        self, request: pb.GetPassRequest, context: grpc.aio.ServicerContext
    ) -> pb.Pass:
        found = self._store.get(request.id)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such pass")
        return found

    @requires_scopes("pass:create")
    async def CreatePass(
        self, request: pb.CreatePassRequest, context: grpc.aio.ServicerContext
    ) -> pb.Pass:
        return self._store.create(request.title)

    async def ListPasses(
        self, request: pb.ListPassesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Pass]:
        for p in self._store.list():
            yield p

    async def WhoAmI(
        self, request: pb.WhoAmIRequest, context: grpc.aio.ServicerContext
    ) -> pb.WhoAmIResponse:
        return who_am_i()


def build_server(
    tokenservice: str,
    host: str = "127.0.0.1",
    port: int = 0,
    cache_ttl: float = 0.0,
    lease_cache_token: str | None = None,
) -> tuple[grpc.Server, int]:
    """A started sync server and its bound port (port 0 picks a free one)."""
    # The lease-kept cache: opt-in, and revocation stays immediate.
    cache = LeaseCache(tokenservice, lease_cache_token) if lease_cache_token else None
    interceptor = AuthInterceptor(tokenservice, SCOPES, cache_ttl=cache_ttl, cache=cache)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[interceptor])
    pb_grpc.add_PassServiceServicer_to_server(PassServicer(PassStore()), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


async def build_aio_server(
    tokenservice: str,
    host: str = "127.0.0.1",
    port: int = 0,
    cache_ttl: float = 0.0,
    lease_cache_token: str | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A started asyncio server and its bound port."""
    cache = AsyncLeaseCache(tokenservice, lease_cache_token) if lease_cache_token else None
    interceptor = AsyncAuthInterceptor(tokenservice, SCOPES, cache_ttl=cache_ttl, cache=cache)
    server = grpc.aio.server(interceptors=[interceptor])
    pb_grpc.add_PassServiceServicer_to_server(AsyncPassServicer(PassStore()), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenservice",
        default=os.environ.get("TOKENSERVICE_TARGET", "localhost:50051"),
        help="tokenservice gRPC target (env TOKENSERVICE_TARGET)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--cache-ttl", type=float, default=0.0,
                        help="seconds to cache successful authentications; delays revocation")
    parser.add_argument(
        "--lease-cache-token",
        default=os.environ.get("TOKENSERVICE_VERIFY_TOKEN"),
        help="a token with api_token:verify: cache answers under a lease, revocation"
        " still immediate (env TOKENSERVICE_VERIFY_TOKEN)",
    )
    parser.add_argument("--aio", action="store_true", help="serve with grpc.aio")
    args = parser.parse_args(argv)

    if args.aio:
        async def run() -> None:
            server, port = await build_aio_server(
                args.tokenservice, args.host, args.port, args.cache_ttl, args.lease_cache_token
            )
            print(f"passes (aio) listening on {args.host}:{port}", flush=True)
            await server.wait_for_termination()

        asyncio.run(run())
        return
    server, port = build_server(
        args.tokenservice, args.host, args.port, args.cache_ttl, args.lease_cache_token
    )
    print(f"passes listening on {args.host}:{port}", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=5).wait()


if __name__ == "__main__":
    main()
