"""last_used_at kept in memory and written in batches, never one write per request."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger("tokenservice.usage")


class UsageRecorder:
    def __init__(
        self, write: Callable[[Mapping[str, int]], None], interval_seconds: float
    ) -> None:
        self._write = write
        self._interval = interval_seconds
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, token_id: str, when_micros: int) -> None:
        # A plain dict store under a lock: the cheapest thing on the hot path.
        with self._lock:
            if self._pending.get(token_id, 0) < when_micros:
                self._pending[token_id] = when_micros

    def flush(self) -> int:
        """Writes what is pending; on failure keeps it for the next try."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        try:
            self._write(batch)
        except Exception:
            log.warning("could not write last_used_at for %d tokens; will retry", len(batch))
            with self._lock:
                for token_id, when in batch.items():
                    if self._pending.get(token_id, 0) < when:
                        self._pending[token_id] = when
            return 0
        return len(batch)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="last-used-flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self) -> None:
        """Stops the background writer and flushes what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
