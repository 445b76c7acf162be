"""Assembling and running the gRPC server: health, reflection, graceful stop."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

from .config import Config
from .db import connection, open_database
from .grpc_api import SERVICE_NAME, RpcInterceptor, TokenServiceServicer
from .migrations import migrate
from .scopes import ScopeCatalog
from .service import TokenService
from .store import Store
from .usage import UsageRecorder

log = logging.getLogger("tokenservice.server")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class HealthProbe:
    """Reports SERVING only while the database answers a query."""

    def __init__(self, servicer: health.HealthServicer, store: Store, interval: float) -> None:
        self._servicer = servicer
        self._store = store
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self.serving = False

    def probe(self) -> bool:
        try:
            with connection(self._store.db):
                self._store.ping()
            ok = True
        except Exception:
            ok = False
        if ok != self.serving:
            log.log(logging.INFO if ok else logging.WARNING, "database %s",
                    "answers" if ok else "does not answer")
        self.serving = ok
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self._servicer.set(name, status)
        return ok

    def start(self) -> None:
        self.probe()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.probe()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for name in ("", SERVICE_NAME):
            self._servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


class TokenServer:
    """The gRPC server with everything it needs; start() binds, stop() drains."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.catalog = ScopeCatalog.load(config.scopes_file)
        self.db = open_database(config.database_url, max_connections=config.grpc_workers + 4)
        migrate(self.db)
        self.store = Store(self.db)
        self.usage = UsageRecorder(self.store_last_used, config.last_used_flush_seconds)
        self.service = TokenService(config, self.store, self.catalog, self.usage)
        self.health = health.HealthServicer()
        self.probe = HealthProbe(self.health, self.store, config.health_probe_seconds)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=config.grpc_workers, thread_name_prefix="grpc-worker"
            ),
            interceptors=[RpcInterceptor(self.service, config.trusted_proxies)],
            # Refuse to share a port with another process by accident; only the
            # workers of `serve --workers N` share it, on purpose.
            options=[("grpc.so_reuseport", 1 if config.reuse_port else 0)],
        )
        pb_grpc.add_TokenServiceServicer_to_server(
            TokenServiceServicer(self.service, config.trusted_proxies), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = 0

    def store_last_used(self, batch: dict[str, int]) -> None:
        with connection(self.db):
            self.store.write_last_used(batch)

    def start(self) -> int:
        """Binds and starts serving; returns the real port (the config may say 0)."""
        address = _address(self.config.host, self.config.grpc_port)
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises this when the port is taken
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: address in use or not available")
        self._server.start()
        self.usage.start()
        self.probe.start()
        log.info("serving gRPC", extra={"address": _address(self.config.host, self.port)})
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Stops accepting, drains in-flight calls, flushes last_used_at, closes the database."""
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        self.probe.stop()
        self._server.stop(grace).wait()
        self.usage.close()
        self.db.close_all() if hasattr(self.db, "close_all") else self.db.close()
        log.info("stopped")

    def wait(self) -> None:
        self._server.wait_for_termination()
