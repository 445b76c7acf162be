"""Structured logs: one JSON object a line, on stderr."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time

# Attributes every LogRecord has; anything else passed in `extra` is a field.
# uvicorn adds a terminal-coloured copy of its messages: not for JSON lines.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    # The formatted second, reused by every line within it (one line per RPC).
    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._second = cached
        line = {
            "ts": f"{cached[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info and record.levelno >= logging.ERROR:
            # Exception type only: messages of driver errors can quote data.
            line["error"] = record.exc_info[0].__name__ if record.exc_info[0] else "unknown"
        return json.dumps(line, default=str)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # peewee logs every query with its parameters at DEBUG: never let it.
    logging.getLogger("peewee").setLevel(logging.WARNING)


class RpcLog:
    """The one line per RPC, in the JsonFormatter's shape, written in batches.

    The logging module costs a record object, a formatter pass over its
    attributes, a lock and a write(2) per line: about a fifth of a warm
    Authenticate. This builds the line with one f-string (every field is
    known) and a background thread writes what gathered every `interval`
    seconds in one write. Lines reach stderr up to `interval` late; their `ts`
    says when the RPC ended. Whether to log at all follows the level of the
    `tokenservice.rpc` logger, as before.
    """

    def __init__(self, fd: int = 2, interval: float = 0.05) -> None:
        self._fd = fd
        self._interval = interval
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._second: tuple[int, str] = (-1, "")
        self._quoted: dict[str, str] = {}
        self.logger = logging.getLogger("tokenservice.rpc")

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def rpc(self, method: str, status: str, duration_ms: float, token_id: str | None) -> None:
        now = time.time()
        second = int(now)
        cached = self._second
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._second = cached
        quoted = self._quoted.get(method)
        if quoted is None:
            quoted = self._quoted[method] = json.dumps(method)
        token = "null" if token_id is None else f'"{token_id}"'  # a UUID: nothing to escape
        line = (
            f'{{"ts": "{cached[1]}.{int((now - second) * 1000):03d}Z", "level": "info", '
            f'"logger": "tokenservice.rpc", "msg": "rpc", "method": {quoted}, '
            f'"status": "{status}", "duration_ms": {duration_ms}, "token_id": {token}}}\n'
        )
        with self._lock:
            self._pending.append(line)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rpc-log", daemon=True)
                self._thread.start()
                atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
        if lines:
            data = "".join(lines).encode()
            try:
                while data:
                    data = data[os.write(self._fd, data):]
            except OSError:
                pass  # stderr closed: nothing more to do for a log


# The process's RPC log: grpc_api writes to it, the server flushes it on stop.
rpc_log = RpcLog()
