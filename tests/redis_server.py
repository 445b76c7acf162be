"""A throwaway Redis server from the machine's own redis-server, for tests and benchmarks.

    with RedisServer() as server:
        url = server.url()           # redis://127.0.0.1:PORT/0
        server.stop(); server.start()  # Redis down and back, on the same port
        server.freeze(); server.thaw()  # Redis stalled (SIGSTOP) and resumed

It runs in a fresh temporary directory on a free loopback port with no
persistence (no RDB snapshot, no append-only file), so a restart comes back
empty, as a Redis without persistence does after a crash.

Only the standard library: bench/ may import this too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DEFAULT_BINARY = "/usr/bin/redis-server"
BINARY_ENV = "TOKENSERVICE_REDIS_SERVER"


class RedisUnavailable(RuntimeError):
    """redis-server is not there; the message says what to install."""


def binary() -> Path:
    return Path(os.environ.get(BINARY_ENV) or DEFAULT_BINARY)


def missing_reason() -> str | None:
    """None when a Redis server can be started here, else why not (one line)."""
    if not os.access(binary(), os.X_OK):
        return (f"redis-server not found at {binary()} "
                f"(apt-get install redis-server, or set {BINARY_ENV})")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process in a temporary directory; start() it, remove() cleans up."""

    def __init__(self, port: int | None = None) -> None:
        reason = missing_reason()
        if reason:
            raise RedisUnavailable(reason)
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.base = Path(tempfile.mkdtemp(prefix="redis-"))
        self.logfile = self.base / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> RedisServer:
        """Starts redis-server (on the same port every time); returns once it answers PING."""
        if self._process is not None and self._process.poll() is None:
            return self
        command = [
            str(binary()), "--port", str(self.port), "--bind", self.host,
            "--dir", str(self.base), "--logfile", str(self.logfile),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--databases", "16",
        ]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, cwd=self.base)
        deadline = time.monotonic() + timeout
        while not self._pong():
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self._process.returncode}):\n"
                                   f"{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer in {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def _pong(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stops the server (SIGKILL: no goodbye to its clients, as in a crash)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a frozen server must die too
            process.kill()
        process.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """Stalls the server (SIGSTOP): connections stay open, nothing answers."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    @property
    def pid(self) -> int | None:
        """The running server's process id (None when stopped)."""
        return None if self._process is None else self._process.pid

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def remove(self) -> None:
        """Stops the server if it runs and deletes its directory."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()
