"""Prometheus metrics: what the service counts, and the /metrics page, across --workers too.

No label ever holds a token, a secret or an email: methods, status codes and
outcomes only, from fixed small sets. With `serve --workers N` the supervisor
points every worker at one PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode), and its /metrics sums them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# What Authenticate ended with; the label of tokenservice_authentications_total.
OUTCOMES = ("ok", "invalid", "revoked", "expired", "disabled", "throttled", "rate_limited")

class _Metrics:
    """The metric objects, made on first use: a process that only renders the page (the
    `--workers` supervisor) makes none, so it adds no zero gauges of its own to the sums."""

    def __init__(self) -> None:
        self.rpcs = Counter(
            "tokenservice_rpc_requests_total", "RPCs answered, by method and status code.",
            ["method", "code"],
        )
        self.duration = Histogram(
            "tokenservice_rpc_duration_seconds", "Time to answer an RPC, by method.", ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0),
        )
        self.authentications = Counter(
            "tokenservice_authentications_total", "Authenticate calls, by outcome.", ["outcome"],
        )
        self.bcrypt_queue = Gauge(
            "tokenservice_bcrypt_queue_depth",
            "bcrypt computations running or waiting for a slot.",
            multiprocess_mode="livesum",
        )
        self.database_up = Gauge(
            "tokenservice_database_up", "1 while the database answers the health probe, else 0.",
            multiprocess_mode="livemin",
        )
        self.token_watchers = Gauge(
            "tokenservice_token_watchers",
            "WatchTokenEvents streams open: consumer processes caching verifications.",
            multiprocess_mode="livesum",
        )
        self.narrowing_waits_capped = Counter(
            "tokenservice_narrowing_waits_capped_total",
            "Narrowing changes that stopped waiting for a replica that heartbeats but never"
            " acknowledges (a broken replica: see its log).",
        )
        for outcome in OUTCOMES:  # every outcome shows, at 0, from the first scrape
            self.authentications.labels(outcome)


@functools.cache
def _metrics() -> _Metrics:
    return _Metrics()


class RpcMetrics:
    """Pre-bound children per method, so an RPC costs two dictionary lookups and two updates."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], Callable[[], None]] = {}
        self._durations: dict[str, Callable[[float], None]] = {}
        self._m = _metrics()
        self._outcomes = {o: self._m.authentications.labels(o).inc for o in OUTCOMES}

    def rpc(self, method: str, code: str, seconds: float) -> None:
        count = self._counts.get((method, code))
        if count is None:
            count = self._counts[(method, code)] = self._m.rpcs.labels(method, code).inc
        count()
        observe = self._durations.get(method)
        if observe is None:
            observe = self._durations[method] = self._m.duration.labels(method).observe
        observe(seconds)

    def authentication(self, outcome: str) -> None:
        self._outcomes[outcome]()


def set_bcrypt_queue_depth(depth: int) -> None:
    _metrics().bcrypt_queue.set(depth)


def set_token_watchers(count: int) -> None:
    _metrics().token_watchers.set(count)


def narrowing_wait_capped() -> None:
    _metrics().narrowing_waits_capped.inc()


def set_database_up(up: bool) -> None:
    _metrics().database_up.set(1 if up else 0)


def _registry() -> CollectorRegistry:
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The page for GET /metrics: this process's metrics, or every worker's summed."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def serve_on_port(host: str, port: int, tls_cert: str | None = None,
                  tls_key: str | None = None, client_ca: str | None = None) -> int:
    """Serves /metrics alone on host:port from a daemon thread; returns the real port.

    With a certificate, HTTPS only, like the other faces (and a client
    certificate signed by `client_ca` required, when given). The certificate
    is read once: a SIGHUP renews the gRPC and REST faces, not this port.
    """
    server, _ = start_http_server(
        port, addr=host, registry=_registry(), certfile=tls_cert, keyfile=tls_key,
        client_cafile=client_ca, client_auth_required=bool(client_ca),
    )
    return server.server_port


def worker_exited(pid: int) -> None:
    """Drops a dead worker's live gauges (its counters stay in the sums)."""
    if os.environ.get(MULTIPROC_ENV):
        _multiprocess.mark_process_dead(pid)
