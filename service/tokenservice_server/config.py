"""One frozen configuration, gathered once: flags win over environment over defaults."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "TOKENSERVICE_"


class ConfigError(ValueError):
    """A setting that cannot be used; the message is shown to the person as is."""


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
    # last_used_at is written in batches at least this often (contract: 60 s).
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
    # Verified-secret cache entries (keyed HMACs of secrets, never secrets).
    verified_cache_size: int = 100_000
    # Failed authentications: a token bucket per client address and per lookup id.
    auth_failure_burst: int = 50
    auth_failure_refill_per_second: float = 5.0
    lookup_failure_burst: int = 10
    lookup_failure_refill_per_second: float = 0.5
    # Peers allowed to name the real client in x-forwarded-for (the REST shim).
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # Start the REST/JSON shim beside the gRPC server.
    rest_enabled: bool = True
    log_level: str = "INFO"
    # Seconds between database probes for the health service.
    health_probe_seconds: float = 2.0
    # `serve --workers N`: N server processes sharing the gRPC port (SO_REUSEPORT),
    # so one Python process's GIL does not cap the service at one core.
    workers: int = 1
    # Set by `serve --workers` for its worker processes only: share the port on purpose.
    reuse_port: bool = False
    # Audit events older than this many days are deleted (0: kept forever),
    # checked every audit_prune_seconds, audit_prune_batch rows a transaction.
    audit_retention_days: int = 400
    audit_prune_seconds: float = 600.0
    audit_prune_batch: int = 500


_INT_FIELDS = {f.name for f in dataclasses.fields(Config) if f.type in ("int",)}
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
        return tuple(p.strip() for p in raw.split(",") if p.strip())
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
    if not 1 <= config.workers <= 64:
        raise ConfigError("--workers must be between 1 and 64")
    if config.audit_retention_days < 0:
        raise ConfigError("the audit retention must be 0 (keep forever) or a number of days")
    if config.audit_prune_seconds <= 0 or config.audit_prune_batch < 1:
        raise ConfigError("the audit prune interval and batch must be positive")


def grpc_address(host: str, port: int) -> str:
    """host:port as gRPC and the log spell it, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
