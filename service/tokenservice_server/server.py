"""Assembling and running the gRPC server: health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health
from grpc_reflection.v1alpha import reflection

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

from . import metrics
from .config import Config, grpc_address
from .crypto import hasher_for
from .db import is_sqlite, open_database
from .fanout import Fanout
from .grpc_api import RpcInterceptor, TokenServiceServicer
from .health import HealthProbe
from .leases import LeaseHub
from .logs import rpc_log
from .migrations import open_migrated
from .policy import SERVICE_NAME
from .retention import AuditPruner
from .scopes import ScopeCatalog
from .service import TokenService
from .store import Store
from .tls import ServerTls
from .usage import UsageRecorder
from .wakeups import RedisWakeups

log = logging.getLogger("tokenservice.server")

HEALTH_CHECK = f"/{HEALTH_SERVICE_NAME}/Check"


def grpc_limits(config: Config) -> list[tuple[str, int]]:
    """What an idle or abusive HTTP/2 client may hold of the gRPC server.

    grpc's defaults let one connection open 2**31 streams, stay forever without a
    call, and ping as often as the server tolerates (5 minutes between pings
    without data before it complains).
    """
    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    return [
        ("grpc.max_concurrent_streams", config.grpc_max_concurrent_streams),
        ("grpc.max_connection_idle_ms", ms(config.grpc_max_connection_idle_seconds)),
        ("grpc.keepalive_time_ms", ms(config.grpc_keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Client pings: no more often than this without data, none with no call in
        # flight, and GOAWAY (too_many_pings) at the second offence.
        ("grpc.http2.min_ping_interval_without_data_ms", ms(config.grpc_min_ping_interval_seconds)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms",
         ms(config.grpc_min_ping_interval_seconds)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_receive_message_length", config.grpc_max_message_bytes),
    ]


class TokenServer:
    """The gRPC server with everything it needs; start() binds, stop() drains.

    The server is a grpc.aio server on an event loop of its own, in a background
    thread; the methods here are synchronous, for the command line and the tests.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        # Read first: a bad certificate should stop the start before anything opens.
        self.tls = ServerTls.from_config(config)
        self.catalog = ScopeCatalog.load(config.scopes_file)
        # Connections: one per worker thread (management calls, and Authenticate's
        # read on PostgreSQL), the event loop's thread and the health probe.
        self.store = Store(
            open_migrated(config.database_url, max_connections=config.grpc_workers + 4)
        )
        self.usage = UsageRecorder(self.store_last_used, config.last_used_flush_seconds)
        # Synchronous methods (management calls, with their transactions and bcrypt
        # hashes) run here; Authenticate runs on the loop.
        self._blocking = futures.ThreadPoolExecutor(
            max_workers=config.grpc_workers, thread_name_prefix="grpc-worker"
        )
        # Authenticate's read, where it may not run on the loop (PostgreSQL): threads
        # and connections of its own, so it never queues behind management calls.
        self._auth_reads = futures.ThreadPoolExecutor(
            max_workers=config.auth_read_workers, thread_name_prefix="auth-read"
        )
        self.auth_store = self.store
        if not self.store.inline_reads:
            self.auth_store = Store(open_database(
                config.database_url, max_connections=config.auth_read_workers + 1, bind=False
            ))
            # Authenticate's read itself runs on the loop, with as many connections.
            self.auth_store.read_on_loop(
                config.database_url, config.auth_read_workers, others=[self.store]
            )
        self.service = TokenService(
            config,
            self.store,
            self.catalog,
            hasher_for(config, metrics.set_bcrypt_queue_depth),
            self.usage,
            blocking=self._auth_reads,
            auth_store=self.auth_store,
        )
        # Consumers watching token events, and the narrowing changes of every
        # process and replica brought to them (leases.py, fanout.py).
        self.hub = LeaseHub(
            config.lease_seconds,
            needs_grant=lambda: self.fanout.wake(),
            on_count=metrics.set_token_watchers,
            max_per_owner=config.watch_streams_per_token,
        )
        self.fanout = Fanout(
            self.store, self.hub, config.lease_seconds, self._blocking,
            RedisWakeups(config.redis_url, config.redis_timeout_seconds)
            if config.redis_url else None,
        )
        self.pruner = AuditPruner(
            self.prune_audit, config.audit_prune_seconds, config.audit_prune_batch,
            on_exit=self._close_thread_connection,
        )
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._run_loop, name="grpc-loop", daemon=True
        )
        self._loop_thread.start()
        self._stopped = threading.Event()
        self.health = health.HealthServicer()
        # Redis (rate limits and throttles shared by every replica) is listed as a
        # dependency: without it the service keeps serving on per-process counters.
        dependencies = {"redis": self.service.limits.probe} if config.redis_url else None
        self.probe = HealthProbe(
            self.health, self.store, config.health_probe_seconds, self._loop, dependencies
        )
        self._server = self._call(self._build())
        self.port = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (running on its own thread until stop())."""
        return self._loop

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coroutine: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _build(self) -> grpc.aio.Server:
        config = self.config
        interceptor = RpcInterceptor(
            self.service,
            self.store.connection,
            config.trusted_proxies,
            self._blocking,
            metrics.RpcMetrics() if config.metrics else None,
            settle=self.fanout.settle,
            claim=self.fanout.claim,
        )
        servicer = TokenServiceServicer(self.service, config.trusted_proxies, self.hub)
        # Every unary method's wrapped handler, made here before the server takes any
        # call: the server runs these very closures, and so does the REST shim when it
        # runs in this process (`serve`), calling them without a gRPC hop.
        self.unary_handlers: dict[str, Callable[..., Awaitable[Any]]] = {
            f"/{SERVICE_NAME}/{method.name}": interceptor.unary(
                f"/{SERVICE_NAME}/{method.name}", getattr(servicer, method.name)
            )
            for method in pb.DESCRIPTOR.services_by_name["TokenService"].methods
            if not (method.client_streaming or method.server_streaming)
        }
        self.unary_handlers[HEALTH_CHECK] = interceptor.unary(HEALTH_CHECK, self.health.Check)
        server = grpc.aio.server(
            interceptors=[interceptor],
            # Refuse to share a port with another process by accident; only the
            # workers of `serve --workers N` share it, on purpose.
            options=[("grpc.so_reuseport", 1 if config.reuse_port else 0), *grpc_limits(config)],
        )
        pb_grpc.add_TokenServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    def store_last_used(self, batch: dict[str, int]) -> None:
        with self.store.connection():
            self.store.write_last_used(batch)

    def _close_thread_connection(self) -> None:
        """SQLite keeps a connection per thread: a thread that ends closes its own."""
        if is_sqlite(self.store.db) and not self.store.db.is_closed():
            self.store.db.close()

    def prune_audit(self) -> int:
        """One batch of audit retention, in a connection of its own."""
        if not self.config.audit_retention_days:
            return 0
        with self.store.connection():
            return self.service.prune_audit(
                self.config.audit_retention_days, self.config.audit_prune_batch
            )

    def start(self) -> int:
        """Binds and starts serving; returns the real port (the config may say 0)."""
        address = grpc_address(self.config.host, self.config.grpc_port)
        try:
            if self.tls is not None:
                self.port = self._server.add_secure_port(address, self.tls.grpc_credentials())
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises this when the port is taken
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: address in use or not available")
        if self.config.local_socket:
            # Plaintext, for the REST shim of this machine: the socket's folder is
            # private to this user, so the port above is the only way in from outside.
            self._server.add_insecure_port("unix:" + self.config.local_socket)
        self._call(self._server.start())
        self._call(self.fanout.start())
        self.usage.start()
        self.pruner.start()
        self.probe.start()
        log.info("serving gRPC", extra={
            "address": grpc_address(self.config.host, self.port),
            "tls": "off" if self.tls is None else "mutual" if self.tls.mutual else "on",
        })
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Stops accepting, drains in-flight calls, flushes last_used_at, closes the database."""
        if self._stopped.is_set():
            return
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        self.probe.stop()

        async def end_streams() -> None:
            # Watch streams never end by themselves: end them so the drain does
            # not wait for them (their consumers reconnect to another replica).
            self.hub.close_all()

        self._call(end_streams())
        self._call(self._server.stop(grace))
        self._call(self.fanout.stop())
        self._blocking.shutdown(wait=True)
        self._auth_reads.shutdown(wait=True)
        self.service.close()
        self.usage.close()
        rpc_log.flush()
        self.pruner.close()

        async def close_loop_connection() -> None:
            # SQLite keeps a connection per thread: the loop's thread has one too.
            self.store.close()

        self._call(close_loop_connection())
        self._call(self.auth_store.aclose_loop_reads())
        self.store.close()
        if self.auth_store is not self.store:
            self.auth_store.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)
        self._loop.close()
        self._stopped.set()
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()
