"""TLS for both faces: reading the certificates, re-reading them on SIGHUP, the caller's subject.

gRPC serves through `grpc.dynamic_ssl_server_credentials`: gRPC asks a fetcher for
a new certificate configuration before every handshake, and the fetcher hands over
the one read by the last reload, once. The REST face serves through an
`ssl.SSLContext` owned here; a reload loads the new files into that same context on
the event loop that accepts its connections, so no handshake sees it half-loaded.
Either way an established connection keeps the certificate it was made with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import grpc

from .config import Config, ConfigError

log = logging.getLogger("tokenservice.tls")

# Metadata in which the REST shim names its caller's certificate subject.
# The gRPC server believes it only on the shim's private Unix socket (see peer_subject).
SUBJECT_METADATA = "x-tokenservice-client-subject"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the certificate, its key and (for mTLS) the client CA live."""

    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> TlsFiles | None:
        if not config.tls_cert or not config.tls_key:
            return None
        return cls(config.tls_cert, config.tls_key, config.tls_client_ca)


@dataclass(frozen=True, slots=True)
class _Material:
    cert: bytes
    key: bytes
    client_ca: bytes | None


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror or e}") from None


def _load_into(context: ssl.SSLContext, material: _Material) -> None:
    """Loads the material into a context; ssl reads a certificate chain only from files.

    The bytes are the ones already checked, copied to a private folder for the
    moment of loading, so a renewal that rewrites the real files meanwhile cannot
    leave a context with one file's new half and the other's old one.
    """
    with tempfile.TemporaryDirectory(prefix="tokenservice-tls-") as folder:
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(material.key)
        with open(cert, "wb") as f:
            f.write(material.cert)
        context.load_cert_chain(cert, key)
    if material.client_ca is not None:
        context.load_verify_locations(cadata=material.client_ca.decode("ascii", "replace"))


def _read(files: TlsFiles) -> _Material:
    """Reads the files and proves they work together (the key matches the certificate)."""
    material = _Material(
        _read_file(files.cert, "certificate"),
        _read_file(files.key, "private key"),
        _read_file(files.client_ca, "client CA") if files.client_ca else None,
    )
    try:
        _load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), material)
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(
            f"cannot use --tls-cert {files.cert} / --tls-key {files.key}"
            + (f" / --tls-client-ca {files.client_ca}" if files.client_ca else "")
            + f": {getattr(e, 'reason', None) or e}"
        ) from None
    return material


def _grpc_configuration(material: _Material) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca
    )


def _rest_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ServerTls:
    """The certificates both faces serve; reload() re-reads them (SIGHUP).

    A reload that fails (a missing file, a key that does not match) keeps the
    certificates in use and logs a warning. A reloaded client CA is added to the
    ones the REST face trusts (OpenSSL cannot forget one on a live context);
    gRPC trusts exactly the new one. Removing a client CA from REST takes a restart.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._material = _read(files)
        # Re-entrant: under `tokenservice rest` the SIGHUP handler runs on the thread
        # that may be inside rest_context() at start-up.
        self._lock = threading.RLock()
        self._pending: Any = None
        self._contexts: list[tuple[ssl.SSLContext, asyncio.AbstractEventLoop]] = []

    @classmethod
    def from_config(cls, config: Config) -> ServerTls | None:
        files = TlsFiles.from_config(config)
        return None if files is None else cls(files)

    @property
    def mutual(self) -> bool:
        """True when callers must present a certificate signed by the client CA."""
        return self.files.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _grpc_configuration(self._material),
            self._fetch,
            require_client_authentication=self.mutual,
        )

    def _fetch(self) -> Any:
        # Called by gRPC before every handshake: None keeps the configuration in use.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def rest_context(self, loop: asyncio.AbstractEventLoop) -> ssl.SSLContext:
        """A server context for uvicorn, reloaded on `loop` (the one accepting connections)."""
        context = _rest_context()
        with self._lock:
            _load_into(context, self._material)
            if self.mutual:
                context.verify_mode = ssl.CERT_REQUIRED
            self._contexts.append((context, loop))
        return context

    def reload(self) -> bool:
        """Re-reads the files; the next new connection on either face uses them."""
        try:
            material = _read(self.files)
        except ConfigError as e:
            log.warning("certificates not reloaded, the old ones stay in use: %s", e)
            return False
        with self._lock:
            self._material = material
            self._pending = _grpc_configuration(material)
            contexts = list(self._contexts)
        for context, loop in contexts:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._apply, context, material)
        log.info("certificates reloaded", extra={"cert": self.files.cert})
        return True

    @staticmethod
    def _apply(context: ssl.SSLContext, material: _Material) -> None:
        try:
            _load_into(context, material)
        except (OSError, ssl.SSLError, ValueError) as e:  # checked by _read: should not happen
            log.warning("REST certificates not reloaded: %s", e)


def channel_credentials(
    ca_file: str, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS to a gRPC server whose certificate ca_file signs, with a client certificate if given."""
    return grpc.ssl_channel_credentials(
        _read_file(ca_file, "CA certificate"),
        _read_file(key_file, "private key") if cert_file and key_file else None,
        _read_file(cert_file, "certificate") if cert_file and key_file else None,
    )


def peer_subject(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> str | None:
    """The caller's certificate subject (`CN=...,O=...`), or None without one.

    From the caller's own TLS handshake (a REST call inside `serve` carries its HTTPS
    client's there too), or, for a call the supervisor's REST shim makes over a
    worker's private Unix socket, from the shim's metadata naming the certificate
    its HTTPS client presented. Any other caller's metadata is ignored.
    """
    auth = context.auth_context()
    for key in ("x509_subject", "x509_common_name"):
        values = auth.get(key)
        if values:
            return values[0].decode("utf-8", "replace")
    if context.peer().startswith("unix:"):
        for key, value in context.invocation_metadata() or ():
            if key == SUBJECT_METADATA and isinstance(value, str) and value:
                return value
    return None


_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def _escape(value: str) -> str:
    """RFC 4514 escaping, with bytes beyond printable ASCII as \\hh (metadata is ASCII)."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch in " #" and i == 0) or (ch == " " and i == len(value) - 1):
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.extend(f"\\{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def subject_of(peercert: dict[str, Any] | None) -> str | None:
    """`ssl.SSLObject.getpeercert()`'s subject spelled as gRPC spells x509_subject."""
    if not peercert or not peercert.get("subject"):
        return None
    parts = []
    for rdn in reversed(peercert["subject"]):
        parts.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)
