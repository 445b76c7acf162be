"""The health service's statuses: the database decides, other dependencies are listed."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health

from . import metrics
from .policy import SERVICE_NAME

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("tokenservice.health")

# gRPC health names of the dependencies, beside "" and the service's own name.
# The database decides the service's status; the others (Redis) only degrade it.
DEPENDENCY_PREFIX = "tokenservice.dependency."
DEPENDENCIES = ("database", "redis")


class HealthProbe:
    """Reports SERVING only while the database answers, and each dependency on its own name.

    The probe runs on a thread of its own (the checks are synchronous); the aio
    health servicer lives on the server's event loop, so statuses are set there.
    `dependencies` are further checks ("redis": is it answering?) reported as
    `tokenservice.dependency.<name>`, which /healthz lists; they never make the
    service itself NOT_SERVING, since it keeps working without them.
    """

    def __init__(
        self,
        servicer: health.HealthServicer,
        store: Store,
        interval: float,
        loop: asyncio.AbstractEventLoop,
        dependencies: dict[str, Callable[[], bool]] | None = None,
    ) -> None:
        self._servicer = servicer
        self._store = store
        self._interval = interval
        self._loop = loop
        self._dependencies = dependencies or {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self.serving = False
        self._last: dict[str, bool] = {}

    def _set(self, statuses: dict[str, bool]) -> None:
        async def set_all() -> None:
            for name, ok in statuses.items():
                await self._servicer.set(
                    name,
                    health_pb2.HealthCheckResponse.SERVING
                    if ok
                    else health_pb2.HealthCheckResponse.NOT_SERVING,
                )

        if self._loop.is_closed() or not self._loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(set_all(), self._loop).result(timeout=10)

    def _database(self) -> bool:
        try:
            with self._store.connection():
                self._store.ping()
            return True
        except Exception:
            return False

    def probe(self) -> bool:
        results = {"database": self._database()}
        for name, check in self._dependencies.items():
            try:
                results[name] = bool(check())
            except Exception:
                results[name] = False
        for name, ok in results.items():
            if ok != self._last.get(name, True):
                log.log(logging.INFO if ok else logging.WARNING, "%s %s", name,
                        "answers" if ok else "does not answer")
        self._last = results
        ok = results["database"]
        self.serving = ok
        metrics.set_database_up(ok)
        statuses = {"": ok, SERVICE_NAME: ok}
        statuses.update({DEPENDENCY_PREFIX + name: up for name, up in results.items()})
        self._set(statuses)
        return ok

    def start(self) -> None:
        self.probe()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.probe()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._set({"": False, SERVICE_NAME: False})


