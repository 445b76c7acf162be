"""Channel construction shared by the sync and asyncio clients.

Retries are gRPC's own: a `retryPolicy` in the service config handed to the channel
as the `grpc.service_config` option, so backoff, jitter, throttling and the
per-attempt bookkeeping are the library's, not a loop of ours.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT",
    "SERVICE_NAME",
    "ChannelOptions",
    "RetryPolicy",
    "bearer_call_credentials",
    "channel_options",
    "default_channel_credentials",
    "is_local_target",
    "service_config",
    "tls_channel_credentials",
]

SERVICE_NAME = "tokenservice.v1.TokenService"
DEFAULT_TIMEOUT = 10.0

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retry policy applied to every TokenService method on UNAVAILABLE.

    `max_attempts` counts the first attempt too (gRPC caps it at 5). Retries happen
    only within the call's deadline.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE",)

    def to_json(self) -> dict[str, Any]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff}s",
            "maxBackoff": f"{self.max_backoff}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_status_codes),
        }


DEFAULT_RETRY = RetryPolicy()


def service_config(retry: RetryPolicy | None) -> str:
    """The JSON service config for the TokenService methods."""
    method_config: dict[str, Any] = {"name": [{"service": SERVICE_NAME}]}
    if retry is not None:
        method_config["retryPolicy"] = retry.to_json()
    return json.dumps({"methodConfig": [method_config]})


def channel_options(retry: RetryPolicy | None, extra: ChannelOptions = ()) -> list[tuple[str, Any]]:
    """Channel options carrying the retry policy; `extra` options are appended."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(retry)),
        ("grpc.enable_retries", 1 if retry is not None else 0),
    ]
    options.extend(extra)
    return options


def is_local_target(target: str) -> bool:
    """True for Unix sockets and loopback hosts, where local credentials apply."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.split("///", 1)[-1]  # strip a scheme like dns:///
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_channel_credentials(target: str) -> grpc.ChannelCredentials:
    """Local credentials for loopback and Unix-socket targets, TLS for anything else.

    `grpc.local_channel_credentials()` encrypts nothing but lets call credentials
    (the bearer token) travel on a connection that never leaves the machine; gRPC
    refuses call credentials on a plain insecure channel.
    """
    if is_local_target(target):
        kind = (
            grpc.LocalConnectionType.UDS
            if target.startswith(("unix:", "unix-abstract:"))
            else grpc.LocalConnectionType.LOCAL_TCP
        )
        return grpc.local_channel_credentials(kind)
    return grpc.ssl_channel_credentials()


def tls_channel_credentials(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> grpc.ChannelCredentials:
    """TLS trusting `ca_file` (PEM; the system's roots when None), with a client certificate.

    Give `cert_file` and `key_file` together when tokenservice requires client
    certificates (mTLS); the files are read once, here.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("give cert_file and key_file together")

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


def bearer_call_credentials(token: str) -> grpc.CallCredentials:
    """Call credentials sending `authorization: Bearer <token>` on every call."""
    return grpc.access_token_call_credentials(token)
