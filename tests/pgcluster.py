"""A throwaway PostgreSQL cluster from the machine's own binaries, for tests and benchmarks.

    with PgCluster() as cluster:
        url = cluster.create_database()      # postgresql://postgres@127.0.0.1:PORT/db_1
        ...
        cluster.restart(mode="immediate")    # a crash and recovery, for fault tests

initdb and pg_ctl run in a fresh temporary directory on a free port, as the
`postgres` user when we are root (PostgreSQL refuses to run as root). fsync is
off for speed: a killed *server process* still loses nothing, because the
kernel keeps what was written; only a power cut would. synchronous_commit
stays on, so a COMMIT that returned is in the WAL the kernel holds.

Only the standard library and psycopg2: bench/ imports this too.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pwd
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg2

DEFAULT_BINDIR = "/usr/lib/postgresql/15/bin"
BINDIR_ENV = "TOKENSERVICE_PG_BINDIR"


class PgUnavailable(RuntimeError):
    """The PostgreSQL binaries are not there; the message says what to install."""


def bindir() -> Path:
    return Path(os.environ.get(BINDIR_ENV) or DEFAULT_BINDIR)


def missing_reason() -> str | None:
    """None when a cluster can be started here, else why not (one line)."""
    directory = bindir()
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not os.access(directory / tool, os.X_OK):
            return (
                f"PostgreSQL 15 binaries not found: {directory / tool} is missing "
                f"(apt-get install postgresql-15, or set {BINDIR_ENV})"
            )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no 'postgres' user to run PostgreSQL as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """One PostgreSQL cluster in a temporary directory; start() it, stop() removes it."""

    def __init__(self, *, port: int | None = None, settings: dict[str, str] | None = None):
        reason = missing_reason()
        if reason:
            raise PgUnavailable(reason)
        self.bindir = bindir()
        self.port = port or _free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.settings = {
            "listen_addresses": self.host,
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] ",
            **(settings or {}),
        }
        self._as_postgres = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="pgcluster-"))
        self.data = self.base / "data"
        self.sockets = self.base / "sockets"
        self.logfile = self.base / "postgres.log"
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._removed = False
        self._spares: queue.Queue[str] = queue.Queue()
        self._spare_count = 0
        self._spare_wanted = threading.Event()
        self._spare_thread: threading.Thread | None = None

    # Running the tools.

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(a) for a in args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            cwd=self.base,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}\n{self.log()}"
            )
        return result

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _pg_ctl(self, *args: str, timeout: float = 120) -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.logfile, *args,
                  timeout=timeout)

    # Life cycle.

    def start(self) -> PgCluster:
        """initdb (first time only) and start; returns when it accepts connections."""
        if not self.data.exists():
            self.sockets.mkdir()
            if self._as_postgres:
                pw = pwd.getpwnam("postgres")
                for path in (self.base, self.sockets):
                    os.chown(path, pw.pw_uid, pw.pw_gid)
            os.chmod(self.base, 0o700)
            self._run(
                self.bindir / "initdb", "-D", self.data, "-U", self.user, "-A", "trust",
                "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            )
            options = {**self.settings, "port": str(self.port),
                       "unix_socket_directories": f"'{self.sockets}'"}
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("\n# pgcluster.py\n")
                for key, value in options.items():
                    if key in ("listen_addresses", "log_line_prefix"):
                        value = f"'{value}'"
                    conf.write(f"{key} = {value}\n")
            atexit.register(self.remove)
        self._pg_ctl("-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stops the server; mode "immediate" is a crash (recovery runs on the next start)."""
        self._pg_ctl("-w", "-t", "60", "-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        self._pg_ctl("-w", "-t", "60", "-m", mode, "restart")

    def is_running(self) -> bool:
        try:
            self._run(self.bindir / "pg_ctl", "-D", self.data, "status", timeout=30)
        except RuntimeError:
            return False
        return True

    def remove(self) -> None:
        """Stops the server if it runs and deletes every file of the cluster."""
        if self._removed:
            return
        self._removed = True
        self._spare_wanted.set()
        if self._spare_thread is not None:
            self._spare_thread.join(timeout=30)
        if self.data.exists():
            with contextlib.suppress(Exception):
                self._pg_ctl("-w", "-t", "30", "-m", "immediate", "stop", timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # Databases.

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg2.extensions.connection:
        """An autocommit psycopg2 connection, for set-up and inspection."""
        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname=dbname,
                                connect_timeout=10)
        conn.autocommit = True
        return conn

    def execute(self, sql: str, params: tuple = (), dbname: str = "postgres") -> list[tuple]:
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """A fresh, empty (or copied from `template`) database; returns its URL."""
        with self._lock:
            name = name or f"db_{os.getpid()}_{next(self._counter)}"
        clause = f" TEMPLATE {template}" if template else " TEMPLATE template0"
        # FILE_COPY skips WAL-logging every page of the template: much faster here.
        self.execute(f'CREATE DATABASE "{name}"{clause} STRATEGY = FILE_COPY')
        return self.url(name)

    def take_database(self, spares: int = 2) -> str:
        """Like create_database(), but from `spares` kept ready by a background thread.

        CREATE DATABASE costs tens to hundreds of milliseconds (a checkpoint);
        made while the previous test runs, it costs a test nothing.
        """
        with self._lock:
            self._spare_count = spares
            if self._spare_thread is None:
                self._spare_thread = threading.Thread(
                    target=self._make_spares, name="pgcluster-spares", daemon=True
                )
                self._spare_thread.start()
        self._spare_wanted.set()
        try:
            url = self._spares.get(timeout=60)
        except queue.Empty:
            return self.create_database()
        self._spare_wanted.set()
        return url

    def _make_spares(self) -> None:
        while not self._removed:
            if self._spares.qsize() < self._spare_count:
                try:
                    self._spares.put(self.create_database())
                except Exception:
                    time.sleep(0.5)  # stopped for a fault test; try again later
                continue
            self._spare_wanted.wait(timeout=1)
            self._spare_wanted.clear()

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def terminate_connections(self, dbname: str) -> int:
        """Kills every backend connected to `dbname`, as a failover or a DBA would."""
        rows = self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        return sum(1 for (ok,) in rows if ok)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.execute("SELECT 1")
                return
            except psycopg2.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def dbname_of(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]
