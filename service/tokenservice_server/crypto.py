"""bcrypt on a bounded pool, and the verified-secret cache."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import bcrypt

from .errors import RateLimited


def hash_secret(secret: str, rounds: int) -> str:
    data = secret.encode("ascii")
    assert len(data) <= 72, "bcrypt takes at most 72 bytes"
    return bcrypt.hashpw(data, bcrypt.gensalt(rounds)).decode("ascii")


class BcryptPool:
    """At most `slots` bcrypt checks at once and `max_waiting` queued; more are refused.

    A flood of wrong secrets therefore holds at most slots + max_waiting worker
    threads, and the rest keep serving tokens whose secret is already verified.
    """

    def __init__(self, slots: int, max_waiting: int) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self._slot_count = slots
        self._max_waiting = max_waiting
        self._waiting = 0
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def _enter(self) -> None:
        with self._lock:
            if self._waiting >= self._max_waiting:
                raise RateLimited("too many token verifications in progress", retry_after=1.0)
            self._waiting += 1

    def _leave(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _checkpw(self, secret: str, hashed: str) -> bool:
        try:
            with self._slots:
                return bcrypt.checkpw(secret.encode("ascii"), hashed.encode("ascii"))
        except ValueError:  # a corrupt stored hash never authenticates
            return False

    def check(self, secret: str, hashed: str) -> bool:
        self._enter()
        try:
            return self._checkpw(secret, hashed)
        finally:
            self._leave()

    async def acheck(self, secret: str, hashed: str) -> bool:
        """check() for an event loop: the same bounds, bcrypt on the pool's own threads."""
        self._enter()
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._slot_count, thread_name_prefix="bcrypt"
                )
            job = self._executor.submit(self._checkpw, secret, hashed)
        except BaseException:
            self._leave()
            raise
        # The slot is given back when the check ends, even if the caller gave up
        # (a cancelled RPC) while it ran: the bound counts bcrypt work, not waiters.
        job.add_done_callback(lambda _: self._leave())
        return await asyncio.wrap_future(job)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


class VerifiedCache:
    """Remembers secrets already checked against a stored hash, as keyed HMACs.

    The key is random per process, so an entry is useless outside it, and the
    entry is bound to the stored hash, so a token whose hash changes is checked
    again. It caches only "this secret matches this hash": revocation, expiry
    and the user's state are read from the database on every call.
    """

    def __init__(self, max_entries: int) -> None:
        self._key = secrets.token_bytes(32)
        self._max = max_entries
        self._entries: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def digest(self, lookup_id: str, secret: str) -> bytes:
        return hmac.new(self._key, f"{lookup_id}:{secret}".encode(), hashlib.sha256).digest()

    def is_verified(self, digest: bytes, hashed: str) -> bool:
        with self._lock:
            known = self._entries.get(digest)
            if known is None:
                return False
            self._entries.move_to_end(digest)
        return hmac.compare_digest(known, hashed)

    def add(self, digest: bytes, hashed: str) -> None:
        with self._lock:
            self._entries[digest] = hashed
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
