"""One frozen configuration, gathered once: flags win over environment over defaults."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "TOKENSERVICE_"


class ConfigError(ValueError):
    """A setting that cannot be used; the message is shown to the person as is."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `requests` calls in any `period_s` seconds: written `600/60s`."""

    requests: int
    period_s: float

    def __str__(self) -> str:
        period = f"{self.period_s:g}"
        if float(period) != self.period_s:
            period = repr(self.period_s)
        return f"{self.requests}/{period}s"


_RATE = re.compile(r"([0-9]+)/([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Limits count in whole microseconds (one timestamp per key), and a period past a
# day is no rate limit but a quota.
MAX_PERIOD_SECONDS = 86_400.0
# The longest lease WatchTokenEvents grants: the most a narrowing change waits
# for a consumer that stopped answering.
MAX_LEASE_SECONDS = 5.0


def parse_rate_limit(text: str, source: str = "rate limit") -> RateLimit | None:
    """`600/60s` (units ms, s, m, h) as a RateLimit; `off` as None (no default limit)."""
    text = text.strip()
    if text.lower() == "off":
        return None
    match = _RATE.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"{source}: expected REQUESTS/PERIOD such as 600/60s (units ms, s, m, h) "
            f"or off, got {text!r}"
        )
    limit = RateLimit(int(match[1]), float(match[2]) * _UNIT_SECONDS[match[3]])
    check_rate_limit(limit, source)
    return limit


def check_rate_limit(limit: RateLimit, source: str = "rate limit") -> None:
    """Refuses a limit the limiter cannot keep: no calls, no time, or finer than 1 µs."""
    if limit.requests < 1:
        raise ConfigError(f"{source}: a limit must allow at least 1 request")
    if not 0 < limit.period_s <= MAX_PERIOD_SECONDS or not math.isfinite(limit.period_s):
        raise ConfigError(f"{source}: the period must be more than 0 and at most 24h")
    if limit.period_s * 1_000_000 < limit.requests:
        raise ConfigError(f"{source}: at most one request per microsecond")


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8080
    database_url: str = "sqlite:///tokenservice.db"
    scopes_file: str | None = None
    bcrypt_rounds: int = 12
    # Tokens look like tks_<lookup id><secret><checksum>.
    token_prefix: str = "tks_"
    # last_used_at is written in batches at least this often (at most 60 s).
    last_used_flush_seconds: float = 15.0
    # Seconds in-flight calls get to finish on SIGTERM/SIGINT.
    shutdown_grace_seconds: float = 10.0
    # gRPC worker threads. Every bcrypt hash (CreateToken) and check (Authenticate)
    # runs on at most bcrypt_concurrency threads at once, and at most
    # bcrypt_max_waiting more wait for one; more runnable threads than this only
    # fight over the GIL: 32 served fewer calls with a p99 twice as long.
    grpc_workers: int = 12
    bcrypt_concurrency: int = 2
    bcrypt_max_waiting: int = 8
    # bcrypt work running or waiting for one client address (an IPv6 /64), or for
    # one calling user at CreateToken: one client's flood waits in its own queue.
    bcrypt_max_per_client: int = 4
    # Authenticate's database read (PostgreSQL) runs on the event loop through this
    # many asynchronous connections of its own (pgasync.py), and its other waits on
    # as many threads of its own, so management calls holding every worker never
    # hold it up.
    auth_read_workers: int = 4
    # Tokens one calling token may be creating at once (CreateToken); more are
    # refused with RESOURCE_EXHAUSTED and a RetryInfo.
    create_token_concurrency: int = 2
    # The REST shim's connections: how many may be open (TLS handshakes included),
    # and how long a client may take to send a request's headers, then its body,
    # or leave a connection idle before its first request or between two.
    rest_max_connections: int = 512
    rest_header_timeout_seconds: float = 10.0
    rest_body_timeout_seconds: float = 10.0
    rest_idle_timeout_seconds: float = 5.0
    # gRPC's HTTP/2 connections: streams (calls) in flight on one connection, a
    # connection with no call for this long is closed (GOAWAY), the server pings a
    # connection with calls in flight this often to find dead peers, and a client
    # pinging more often than the minimum interval (or pinging with no call in
    # flight) is sent GOAWAY after two such pings. The largest request accepted.
    grpc_max_concurrent_streams: int = 100
    grpc_max_connection_idle_seconds: float = 300.0
    grpc_keepalive_seconds: float = 60.0
    grpc_min_ping_interval_seconds: float = 10.0
    grpc_max_message_bytes: int = 65536
    # Verified-secret cache entries (keyed HMACs of secrets, never secrets).
    verified_cache_size: int = 100_000
    # Failed authentications: a token bucket per client address and per lookup id.
    auth_failure_burst: int = 50
    auth_failure_refill_per_second: float = 5.0
    lookup_failure_burst: int = 10
    lookup_failure_refill_per_second: float = 0.5
    # Successful authentications per token, unless the token has a limit of its own;
    # None (TOKENSERVICE_RATE_LIMIT=off) leaves such tokens unlimited.
    rate_limit: RateLimit | None = RateLimit(600, 60.0)
    # redis://host:port/db: rate limits and failure throttles shared by every replica
    # and worker process. None: each process counts on its own.
    redis_url: str | None = None
    # A Redis call slower than this counts as Redis down: the check falls back to the
    # process's own counters rather than hold up Authenticate.
    redis_timeout_seconds: float = 0.1
    # WatchTokenEvents: how long a consumer's lease holds (at most 5 s). Every
    # narrowing change waits at most this long for a consumer that stopped
    # answering; a shorter lease costs more renewals.
    lease_seconds: float = 2.0
    # WatchTokenEvents streams one caller token may hold open on one server
    # process (a consumer process holds one); more are refused with
    # RESOURCE_EXHAUSTED. Raise it for a fleet sharing one token.
    watch_streams_per_token: int = 1024
    # Peers allowed to name the real client in x-forwarded-for (the REST shim):
    # addresses or CIDR ranges.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # Start the REST/JSON shim beside the gRPC server.
    rest_enabled: bool = True
    log_level: str = "INFO"
    # Seconds between database probes for the health service.
    health_probe_seconds: float = 2.0
    # `serve --workers N`: N server processes sharing the gRPC port (SO_REUSEPORT),
    # so one Python process's GIL does not cap the service at one core.
    workers: int = 1
    # Prometheus metrics: counted on every RPC and served on /metrics. Off for a
    # server nobody scrapes: nothing is counted and /metrics answers 404.
    metrics: bool = True
    # /metrics on a port of its own as well (None: on the REST port only).
    metrics_port: int | None = None
    # Set by `serve --workers` for its worker processes only (in their environment):
    # share the port on purpose.
    reuse_port: bool = False
    # TLS: the certificate and key both faces serve; with a client CA, both require a
    # client certificate it signed (mTLS). Re-read on SIGHUP.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # `tokenservice rest`: the CA that signs the gRPC server's certificate (dial TLS).
    tls_ca: str | None = None
    # Serve without TLS on a non-loopback host: the network (a mesh, a sidecar) does TLS.
    plaintext: bool = False
    # A Unix socket the gRPC server also listens on, in a folder only this user can
    # enter, for the REST shim on this machine; set by `serve`, not by people.
    local_socket: str | None = None
    # Audit events older than this many days are deleted (0: kept forever),
    # checked every audit_prune_seconds, audit_prune_batch rows a transaction.
    audit_retention_days: int = 400
    audit_prune_seconds: float = 600.0
    audit_prune_batch: int = 500


_INT_FIELDS = {f.name for f in dataclasses.fields(Config) if f.type in ("int", "int | None")}
_FLOAT_FIELDS = {f.name for f in dataclasses.fields(Config) if f.type in ("float",)}
_BOOL_FIELDS = {f.name for f in dataclasses.fields(Config) if f.type in ("bool",)}
_TUPLE_FIELDS = {"trusted_proxies"}


def _coerce(name: str, raw: Any, source: str) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if name in _INT_FIELDS:
            return int(raw)
        if name in _FLOAT_FIELDS:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{source}: expected a number, got {raw!r}") from None
    if name in _BOOL_FIELDS:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: expected true or false, got {raw!r}")
    if name in _TUPLE_FIELDS:
        if raw.strip().lower() == "none":  # an empty value means the default
            return ()
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if name == "rate_limit":
        return parse_rate_limit(raw, source)
    return raw


def load_config(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Builds the Config: flags (None: not given) over TOKENSERVICE_* variables over defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Config):
        env_name = ENV_PREFIX + field.name.upper()
        if env_name in environ and environ[env_name] != "":
            values[field.name] = _coerce(field.name, environ[env_name], env_name)
        if flags and flags.get(field.name) is not None:
            flag = "--" + field.name.replace("_", "-")
            values[field.name] = _coerce(field.name, flags[field.name], flag)
    config = Config(**values)
    validate(config)
    return config


def validate(config: Config) -> None:
    for name in ("grpc_port", "http_port"):
        port = getattr(config, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"--{name.replace('_', '-')}: {port} is not a port number")
    if not 4 <= config.bcrypt_rounds <= 31:
        raise ConfigError("bcrypt rounds must be between 4 and 31")
    if config.last_used_flush_seconds <= 0 or config.last_used_flush_seconds > 60:
        raise ConfigError("last_used_at flush interval must be in (0, 60] seconds")
    if not config.token_prefix or not config.token_prefix.replace("_", "a").isalnum():
        raise ConfigError("the token prefix may hold only letters, digits and _")
    if config.grpc_workers < 2 or config.bcrypt_concurrency < 1:
        raise ConfigError("need at least 2 gRPC workers and 1 bcrypt slot")
    positive = (
        "rest_max_connections", "rest_header_timeout_seconds", "rest_body_timeout_seconds",
        "rest_idle_timeout_seconds", "grpc_max_concurrent_streams",
        "grpc_max_connection_idle_seconds", "grpc_keepalive_seconds",
        "grpc_min_ping_interval_seconds", "grpc_max_message_bytes",
        "watch_streams_per_token",
    )
    for name in positive:
        if not getattr(config, name) > 0:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be more than 0")
    if config.auth_read_workers < 1 or config.create_token_concurrency < 1:
        raise ConfigError("need at least 1 Authenticate read worker and 1 CreateToken a caller")
    if config.bcrypt_max_waiting < 0 or config.bcrypt_max_per_client < 1:
        raise ConfigError("bcrypt max waiting must be at least 0, and per client at least 1")
    if config.metrics_port is not None and not config.metrics:
        raise ConfigError("--metrics-port needs metrics on (TOKENSERVICE_METRICS=1)")
    if not 1 <= config.workers <= 64:
        raise ConfigError("--workers must be between 1 and 64")
    if not 0.05 <= config.lease_seconds <= MAX_LEASE_SECONDS:
        raise ConfigError(f"the lease must be between 0.05 and {MAX_LEASE_SECONDS:g} seconds")
    if config.rate_limit is not None:
        check_rate_limit(config.rate_limit)
    if config.redis_url is not None:
        check_redis_url(config.redis_url)
    if not 0 < config.redis_timeout_seconds <= 10:
        raise ConfigError("the Redis timeout must be in (0, 10] seconds")

    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if config.tls_client_ca and not config.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: mTLS is TLS first")
    if config.plaintext and config.tls_cert:
        raise ConfigError("--plaintext contradicts --tls-cert: choose one")
    if config.audit_retention_days < 0:
        raise ConfigError("the audit retention must be 0 (keep forever) or a number of days")
    if config.audit_prune_seconds <= 0 or config.audit_prune_batch < 1:
        raise ConfigError("the audit prune interval and batch must be positive")

    from .peers import parse_networks  # the one reading of an address or range

    try:
        parse_networks(config.trusted_proxies)
    except ValueError as e:
        raise ConfigError(f"trusted proxies: {e}") from None


def check_redis_url(url: str) -> None:
    """redis://host:port/db (rediss:// for TLS), refused early rather than at the first call."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"Redis URL: expected redis://host:port/db, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"Redis URL: bad port in {url!r}") from None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigError(f"Redis URL: the database must be a number, got {db!r}")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: addresses no other machine can reach."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport(config: Config) -> None:
    """Refuses to serve a non-loopback host in plaintext unless told the network does TLS."""
    if config.tls_cert or config.plaintext or is_loopback(config.host):
        return
    raise ConfigError(
        f"refusing to serve {config.host} without TLS: give --tls-cert and --tls-key,"
        " or --plaintext if a mesh or sidecar terminates TLS"
    )


# How a setting whose default is not None says None in the environment.
_NONE_SPELLING = {"rate_limit": "off"}


def to_environ(config: Config) -> dict[str, str]:
    """The TOKENSERVICE_* variables that make load_config() give back `config`.

    How `serve --workers N` hands its configuration to its worker processes: a
    process's environment is readable only by its own user (and root), while its
    command line is readable by everyone on the machine (`ps`, /proc/<pid>/cmdline),
    and the database URL may carry a password. Raises ConfigError for a value
    that would not read back the same.
    """
    environ: dict[str, str] = {}
    for field in dataclasses.fields(Config):
        value = getattr(config, field.name)
        if value is None:
            if field.name in _NONE_SPELLING:  # None is not the default there
                environ[ENV_PREFIX + field.name.upper()] = _NONE_SPELLING[field.name]
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(value)
        elif isinstance(value, float):
            text = repr(value)
        else:
            text = str(value)
        environ[ENV_PREFIX + field.name.upper()] = text
    if load_config({}, environ) != config:
        differ = [
            f.name for f in dataclasses.fields(Config)
            if getattr(load_config({}, environ), f.name) != getattr(config, f.name)
        ]
        raise ConfigError(f"cannot pass {', '.join(differ)} to another process")
    return environ


def grpc_address(host: str, port: int) -> str:
    """host:port as gRPC and the log spell it, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
