"""Audit log retention: old events deleted in small batches on a thread of their own."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("tokenservice.retention")


class AuditPruner:
    """Every `interval` seconds, deletes events older than the retention, a batch at a time.

    `prune_batch` deletes at most one batch and says how many it deleted; it
    runs inside its own connection and transaction, so a large backlog is
    worked off in short transactions with a pause between them, never holding
    the table or a request's thread. Several replicas pruning at once only
    share the work.
    """

    def __init__(
        self,
        prune_batch: Callable[[], int],
        interval_seconds: float,
        batch_size: int,
        pause_seconds: float = 0.05,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self._prune_batch = prune_batch
        self._interval = interval_seconds
        self._batch_size = batch_size
        self._pause = pause_seconds
        self._on_exit = on_exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def prune(self) -> int:
        """Deletes every event past the retention now; returns how many."""
        total = 0
        while not self._stop.is_set():
            try:
                deleted = self._prune_batch()
            except Exception:
                log.warning("could not prune the audit log; will retry", exc_info=True)
                break
            total += deleted
            if deleted < self._batch_size:
                break
            self._stop.wait(self._pause)
        if total:
            log.info("pruned the audit log", extra={"deleted": total})
        return total

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-prune", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.prune()
            while not self._stop.wait(self._interval):
                self.prune()
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
