"""The tokenservice command line. Bad input: one line on stderr, a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

from . import logs, narrowing
from .config import (
    ENV_PREFIX,
    Config,
    ConfigError,
    check_transport,
    grpc_address,
    load_config,
    to_environ,
)
from .crypto import hasher_for
from .db import DB_ERRORS, DatabaseURLError, open_database
from .errors import DomainError, InvalidArgument
from .fanout import settle_blocking
from .migrations import migrate, open_migrated
from .scopes import ScopeCatalog
from .service import TokenService
from .store import Store
from .values import AuditEvent, TokenInfo, UserInfo
from .wakeups import RedisWakeups

log = logging.getLogger("tokenservice.cli")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokenservice", description="API tokens over gRPC and REST/JSON.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def db_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="sqlite:///path.db or postgresql://user:pass@host/db")

    def tls_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tls-cert", metavar="F", help="serve TLS with this certificate (PEM)")
        p.add_argument("--tls-key", metavar="F", help="the certificate's private key (PEM)")
        p.add_argument("--tls-client-ca", metavar="F",
                       help="require client certificates signed by this CA (mTLS)")
        p.add_argument("--plaintext", action="store_const", const=True,
                       help="allow a non-loopback host without TLS (a mesh terminates TLS)")

    serve = sub.add_parser("serve", help="run the gRPC server and the REST shim")
    serve.add_argument("--host")
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--http-port", type=int)
    db_flag(serve)
    serve.add_argument("--scopes-file")
    serve.add_argument("--bcrypt-rounds", type=int)
    serve.add_argument("--no-rest", dest="rest_enabled", action="store_const", const=False,
                       help="serve gRPC only")
    serve.add_argument("--workers", type=int,
                       help="N gRPC server processes sharing the port (default 1)")
    serve.add_argument("--metrics-port", type=int,
                       help="serve /metrics on this port too (default: the REST port only)")
    serve.add_argument("--rate-limit",
                       help="successful authentications per token, e.g. 600/60s, or off")
    serve.add_argument("--redis-url",
                       help="redis://host:port/db: limits shared by every replica and worker")
    tls_flags(serve)

    rest = sub.add_parser("rest", help="run the REST shim alone, in front of a gRPC server")
    rest.add_argument("--grpc-target", default="127.0.0.1:50051", help="HOST:PORT")
    rest.add_argument("--host")
    rest.add_argument("--http-port", type=int)
    tls_flags(rest)
    rest.add_argument("--tls-ca", metavar="F",
                      help="dial gRPC over TLS, trusting this CA; with mTLS the shim presents"
                      " --tls-cert/--tls-key as its client certificate")

    mig = sub.add_parser("migrate", help="create or upgrade the schema")
    db_flag(mig)

    user = sub.add_parser("user", help="manage users").add_subparsers(
        dest="user_command", required=True, parser_class=_Parser
    )
    add = user.add_parser("add", help="create a user")
    add.add_argument("--email", required=True)
    add.add_argument("--org", required=True)
    add.add_argument("--permissions", required=True, help="comma-separated scopes")
    db_flag(add)
    add.add_argument("--scopes-file")
    disable = user.add_parser("disable", help="disable a user and stop all their tokens")
    disable.add_argument("--email", required=True)
    db_flag(disable)
    enable = user.add_parser("enable", help="enable a disabled user again")
    enable.add_argument("--email", required=True)
    db_flag(enable)
    users = user.add_parser("list", help="list users (of one org, or all)")
    users.add_argument("--org")
    users.add_argument("--json", action="store_true", help="one JSON object a line")
    db_flag(users)
    perms = user.add_parser(
        "set-permissions",
        help="replace a user's permissions; every token of theirs narrows at its next use",
    )
    perms.add_argument("--email", required=True)
    perms.add_argument("--permissions", required=True, help="comma-separated scopes")
    db_flag(perms)
    perms.add_argument("--scopes-file")

    token = sub.add_parser("token", help="manage tokens").add_subparsers(
        dest="token_command", required=True, parser_class=_Parser
    )
    create = token.add_parser("create", help="create a token; prints it alone on the last line")
    create.add_argument("--email", required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", required=True, help="comma-separated scopes")
    create.add_argument("--expires-at", help="ISO 8601, for example 2027-01-01T00:00:00Z")
    db_flag(create)
    create.add_argument("--scopes-file")
    create.add_argument("--bcrypt-rounds", type=int)
    tokens = token.add_parser("list", help="list a user's tokens, newest first")
    tokens.add_argument("--email", required=True)
    tokens.add_argument("--json", action="store_true", help="one JSON object a line")
    db_flag(tokens)
    revoke = token.add_parser("revoke", help="revoke a token by id, at once")
    revoke.add_argument("id")
    revoke.add_argument("--children", action="store_true",
                        help="also revoke every token it minted, transitively")
    revoke.add_argument("--json", action="store_true", help="print the token as JSON")
    db_flag(revoke)

    audit = sub.add_parser("audit", help="print audit events, newest first, as JSON lines")
    audit.add_argument("--org")
    audit.add_argument("--token-id", default="")
    audit.add_argument("--limit", type=int, default=100)
    db_flag(audit)

    scopes = sub.add_parser("scopes", help="print the scope catalog")
    scopes.add_argument("--scopes-file")
    return parser


def _split(value: str) -> list[str]:
    """A comma-separated list; spaces after a comma are list syntax, anything else is
    part of the item (a tab or a newline in a scope name is refused, not trimmed)."""
    return [part.strip(" ") for part in value.split(",") if part.strip(" ")]


def _parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidArgument(
            [("expires_at", f"{value!r} is not an ISO 8601 date-time")]
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _when(value: datetime | None) -> str:
    return value.isoformat().replace("+00:00", "Z") if value else ""


def _token_dict(info: TokenInfo) -> dict[str, Any]:
    return {
        "id": info.id, "name": info.name, "tokenPrefix": info.token_prefix,
        "state": info.state.value, "scopes": list(info.scopes),
        "expiresAt": _when(info.expires_at) or None,
        "lastUsedAt": _when(info.last_used_at) or None,
        "revokedAt": _when(info.revoked_at) or None, "createdAt": _when(info.created_at),
        "createdByEmail": info.created_by_email, "orgId": info.org_id,
        "parentId": info.parent_id, "rotatedFromId": info.rotated_from_id,
        "replacedById": info.replaced_by_id,
    }


def _user_dict(user: UserInfo) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "orgId": user.org_id,
            "permissions": list(user.permissions), "disabled": user.disabled,
            "createdAt": _when(user.created_at)}


def _event_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id, "time": _when(event.time), "action": event.action,
        "orgId": event.org_id, "actorUserId": event.actor_user_id,
        "actorEmail": event.actor_email, "actorTokenId": event.actor_token_id,
        "tokenId": event.token_id, "clientAddress": event.client_address,
        "details": event.details,
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns as wide as their widest cell; what a person reads at a terminal."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _json_lines(items: Sequence[dict[str, Any]]) -> None:
    for item in items:
        print(json.dumps(item, ensure_ascii=False, separators=(",", ":")))


def _service(config: Config) -> TokenService:
    return TokenService(
        config,
        Store(open_migrated(config.database_url)),
        ScopeCatalog.load(config.scopes_file),
        hasher_for(config),
    )


class _Hangup:
    """SIGHUP re-reads the certificates; one that arrives while they are first read waits."""

    def __init__(self) -> None:
        self.pending = False
        self.reload: Callable[[], object] | None = None

    def __call__(self, *_: object) -> None:
        if self.reload is None:
            self.pending = True
        else:
            self.reload()

    def ready(self, reload: Callable[[], object]) -> None:
        self.reload = reload
        if self.pending:
            self.pending = False
            reload()


def _private_socket_folder(config: Config) -> tempfile.TemporaryDirectory[str] | None:
    """Where the supervisor's REST shim (`serve --workers N`) reaches each worker's gRPC:
    a folder only this user may enter.

    The shim dials gRPC over a Unix socket there, in plaintext, rather than through
    the public port: it then needs no certificate of its own (with mTLS, it would
    need one the client CA signed), gRPC can believe the client address and
    certificate subject it forwards (no other process can reach the socket), and
    nothing extra listens on the network.
    """
    return tempfile.TemporaryDirectory(prefix="tokenservice-") if config.rest_enabled else None


def _serve(config: Config) -> int:
    from .server import TokenServer

    check_transport(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    hangup = _Hangup()
    if config.tls_cert:
        signal.signal(signal.SIGHUP, hangup)
    if config.workers > 1:
        return _supervise(config, stop, hangup)
    if config.reuse_port:
        _end_with_supervisor()
    server = TokenServer(config)
    if server.tls is not None:
        hangup.ready(server.tls.reload)
    server.start()
    _serve_metrics(config)
    rest = None
    if config.rest_enabled:
        from .rest import LocalHandlers, RestLimits, RestServer

        # In process: the shim awaits the gRPC server's own handlers on its loop, no
        # gRPC hop; at most as many calls at once as one gRPC connection may carry.
        local = LocalHandlers(server.unary_handlers, config.grpc_max_concurrent_streams,
                              config.grpc_max_message_bytes)
        rest = RestServer(None, config.host, config.http_port, tls=server.tls,
                          limits=RestLimits.from_config(config), local=local,
                          metrics=config.metrics)
        rest.start(server.loop)
    stop.wait()
    log.info("stopping: draining in-flight calls")
    if rest is not None:
        rest.stop(config.shutdown_grace_seconds)
    server.stop()
    return 0


def _end_with_supervisor() -> None:
    """A worker of `serve --workers` is sent SIGTERM (and drains) when its supervisor
    ends, however it ends: a supervisor killed with -9 would otherwise leave its
    workers serving the shared port for ever, beside the next supervisor's."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() == 1:  # it ended before the call above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_command() -> list[str]:
    """A worker's command line: no settings on it, everyone on the machine can read it."""
    return [sys.executable, "-c", "from tokenservice_server.cli import main; main()", "serve"]


def _worker_environ(config: Config, port: int, local_socket: str | None) -> dict[str, str]:
    """A worker's environment: this process's, its TOKENSERVICE_* variables replaced by
    the whole configuration (database URL included), readable only by this user.

    Every worker counts against the same limits and serves the same TLS files as
    this process; /metrics is served here only, summed over the workers."""
    worker = dataclasses.replace(
        config, grpc_port=port, workers=1, reuse_port=True, rest_enabled=False,
        metrics_port=None, local_socket=local_socket,
    )
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return {**inherited, **to_environ(worker)}


def _supervise(config: Config, stop: threading.Event, hangup: _Hangup) -> int:
    """`serve --workers N`: N gRPC processes on one port (SO_REUSEPORT), the REST shim here.

    A Python process runs Python on one core at a time (the GIL), so one
    process cannot use a second core; N processes can. They share nothing but
    the database: each has its own verified-secret cache and throttle buckets,
    and reads revocation from the database on every call as before. SIGTERM or
    SIGINT drains the shim, then every worker (each flushes its last_used_at).
    SIGHUP re-reads the shim's certificates and is passed on to every worker.
    The shim reaches the workers through a Unix socket each, round robin.
    """
    import subprocess
    import tempfile
    import time

    from . import metrics
    from .tls import ServerTls

    tls = ServerTls.from_config(config)  # a bad certificate stops us before any worker starts
    # Every worker writes its metrics under one directory; /metrics here sums them.
    metrics_dir = None
    if not os.environ.get(metrics.MULTIPROC_ENV):
        metrics_dir = tempfile.TemporaryDirectory(prefix="tokenservice-metrics-")
        os.environ[metrics.MULTIPROC_ENV] = metrics_dir.name
    open_migrated(config.database_url).close()  # once, before the workers race to do it
    port = config.grpc_port
    if port == 0:
        import socket

        with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as s:
            s.bind((config.host, 0))
            port = s.getsockname()[1]
    folder = _private_socket_folder(config)
    sockets = (
        [os.path.join(folder.name, f"worker-{i}.sock") for i in range(config.workers)]
        if folder is not None else [None] * config.workers
    )
    command = _worker_command()
    environs = [_worker_environ(config, port, path) for path in sockets]
    workers = [subprocess.Popen(command, env=environ) for environ in environs]
    log.info("supervising gRPC workers",
             extra={"workers": len(workers), "port": port, "pids": [w.pid for w in workers]})

    def forward_hangup() -> None:
        if tls is not None:
            tls.reload()
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGHUP)

    hangup.ready(forward_hangup)
    rest = None
    try:
        _wait_listening(config.host, port, workers, stop, [p for p in sockets if p])
        if config.rest_enabled and not stop.is_set():
            from .rest import RestLimits, RestServer

            target = "unix:" + ",".join(p for p in sockets if p)
            rest = RestServer(target, config.host, config.http_port, tls=tls,
                              limits=RestLimits.from_config(config), metrics=config.metrics)
            rest.start()
        _serve_metrics(config)
        while not stop.wait(1.0):
            for i, worker in enumerate(workers):
                if worker.poll() is not None:
                    log.warning("gRPC worker exited; starting another",
                                extra={"pid": worker.pid, "exit_code": worker.returncode})
                    metrics.worker_exited(worker.pid)
                    time.sleep(1.0)
                    workers[i] = subprocess.Popen(command, env=environs[i])
    finally:
        log.info("stopping: draining in-flight calls")
        if rest is not None:
            rest.stop(config.shutdown_grace_seconds)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        codes = []
        for worker in workers:
            try:
                codes.append(worker.wait(timeout=config.shutdown_grace_seconds + 15))
            except subprocess.TimeoutExpired:
                worker.kill()
                codes.append(worker.wait())
        if folder is not None:
            folder.cleanup()
        if metrics_dir is not None:
            metrics_dir.cleanup()
    return 0 if all(code == 0 for code in codes) else 1


def _serve_metrics(config: Config) -> None:
    """With --metrics-port, /metrics on a port of its own too (a daemon thread)."""
    if config.metrics_port is None:
        return
    from . import metrics

    port = metrics.serve_on_port(config.host, config.metrics_port, config.tls_cert,
                                 config.tls_key, config.tls_client_ca)
    log.info("serving metrics", extra={"port": port})


def _wait_listening(
    host: str, port: int, workers: list, stop: threading.Event, sockets: list[str]
) -> None:
    """Until the port answers and every worker's Unix socket is there; a worker that dies
    on start (port taken) fails the serve."""
    import socket

    deadline = threading.Event()
    timer = threading.Timer(60, deadline.set)
    timer.start()
    try:
        while not stop.is_set():
            if any(w.poll() is not None for w in workers):
                address = grpc_address(host, port)
                raise OSError(f"cannot serve on {address}: a worker exited on start")
            try:
                with socket.create_connection((host, port), timeout=1):
                    pass
                if all(os.path.exists(path) for path in sockets):
                    return
            except OSError:
                pass
            if deadline.is_set():
                raise OSError(f"no gRPC worker listens on {grpc_address(host, port)}")
            stop.wait(0.1)
    finally:
        timer.cancel()


def run(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    config = load_config(flags)
    logs.configure(config.log_level)
    if args.command == "serve":
        return _serve(config)
    if args.command == "rest":
        from .rest import RestLimits, run_rest
        from .tls import ServerTls, channel_credentials

        check_transport(config)
        credentials = None
        if config.tls_ca:
            credentials = channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
        run_rest(args.grpc_target, config.host, config.http_port,
                 tls=ServerTls.from_config(config), channel_credentials=credentials,
                 limits=RestLimits.from_config(config), metrics=config.metrics)
        return 0
    if args.command == "scopes":
        catalog = ScopeCatalog.load(config.scopes_file)
        width = max(len(s.name) for s in catalog)
        for s in catalog:
            print(f"{s.name:<{width}}  {'api_only' if s.api_only else '        '}  {s.description}")
        return 0
    if args.command == "migrate":
        db = open_database(config.database_url)
        applied = migrate(db)
        print(f"schema at version {max(applied) if applied else 'current'}"
              + (f" (applied {', '.join(map(str, applied))})" if applied else ""))
        return 0
    service = _service(config)
    # A command that narrows tokens returns only once every consumer caching
    # Authenticate's answers, on every replica, has dropped them (narrowing.py);
    # what it prints is shown then too, so nobody reads "revoked" too early.
    narrowed: list = []
    collecting = narrowing.collect(narrowed)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            _run_command(args, service)
    finally:
        narrowing.stop(collecting)
        wakeups = (RedisWakeups(config.redis_url, config.redis_timeout_seconds)
                   if narrowed and config.redis_url else None)
        settle_blocking(service.store, narrowed, wakeups)
        if wakeups is not None:
            wakeups.close()
        sys.stdout.write(out.getvalue())
    return 0


def _run_command(args: argparse.Namespace, service: TokenService) -> None:
    """Runs a user, token or audit command in one connection."""
    with service.store.connection():
        if args.command == "user" and args.user_command == "add":
            service.add_user(args.email, args.org, _split(args.permissions))
            print(f"user {args.email.strip().lower()} added to org {args.org.strip()}")
        elif args.command == "user" and args.user_command == "disable":
            service.disable_user(args.email)
            print(f"user {args.email.strip().lower()} disabled; their tokens no longer work")
        elif args.command == "user" and args.user_command == "enable":
            service.enable_user(args.email)
            print(f"user {args.email.strip().lower()} enabled; their tokens work again")
        elif args.command == "user" and args.user_command == "set-permissions":
            user = service.set_permissions(args.email, _split(args.permissions))
            print(f"user {user.email} now holds {','.join(user.permissions)};"
                  " their tokens carry no more than that from their next use")
        elif args.command == "user" and args.user_command == "list":
            users = service.list_users(args.org)
            if args.json:
                _json_lines([_user_dict(u) for u in users])
            else:
                _table(("EMAIL", "ORG", "STATE", "PERMISSIONS", "CREATED"), [
                    (u.email, u.org_id, "disabled" if u.disabled else "enabled",
                     ",".join(u.permissions), _when(u.created_at)) for u in users])
        elif args.command == "token" and args.token_command == "list":
            found = service.tokens_for_email(args.email)
            if args.json:
                _json_lines([_token_dict(t) for t in found])
            else:
                _table(("ID", "NAME", "PREFIX", "STATE", "SCOPES", "EXPIRES", "LAST USED"), [
                    (t.id, t.name, t.token_prefix, t.state.value.lower(), ",".join(t.scopes),
                     _when(t.expires_at) or "never", _when(t.last_used_at) or "never")
                    for t in found])
        elif args.command == "token" and args.token_command == "revoke":
            info = service.revoke_by_id(args.id, args.children)
            if args.json:
                _json_lines([_token_dict(info)])
            else:
                print(f"token {info.name!r} id={info.id} revoked at {_when(info.revoked_at)}"
                      + (" with every token it minted" if args.children else ""))
        elif args.command == "audit":
            _json_lines([_event_dict(e) for e in
                         service.audit_events(args.org, args.token_id, args.limit)])
        elif args.command == "token":
            expires = _parse_time(args.expires_at) if args.expires_at else None
            created = service.mint_for_email(args.email, args.name, _split(args.scopes), expires)
            info = created.info
            print(f"created token {info.name!r} id={info.id} prefix={info.token_prefix}"
                  f" scopes={','.join(info.scopes)}"
                  f" expires={info.expires_at.isoformat() if info.expires_at else 'never'}")
            print("store it now, it will not be shown again:")
            print(created.raw)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    # gRPC's C core logs to stderr on its own; errors reach the person through
    # the one-line messages below instead (set GRPC_VERBOSITY to see them).
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        code = run(argv)
    except UsageError as e:
        print(f"tokenservice: {e}", file=sys.stderr)
        code = 2
    except InvalidArgument as e:
        reasons = "; ".join(f"{field}: {why}" for field, why in e.violations)
        print(f"tokenservice: {reasons}", file=sys.stderr)
        code = 1
    except DomainError as e:
        print(f"tokenservice: {e.message}", file=sys.stderr)
        code = 1
    except (ConfigError, DatabaseURLError, ValueError) as e:
        print(f"tokenservice: {e}", file=sys.stderr)
        code = 1
    except DB_ERRORS as e:
        first = (str(e).splitlines() or [""])[0]
        print(f"tokenservice: database error: {type(e).__name__}: {first}", file=sys.stderr)
        code = 1
    except OSError as e:
        print(f"tokenservice: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # a bug: still one line, and the type says where to look
        print(f"tokenservice: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)
