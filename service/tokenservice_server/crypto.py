"""Hashing secrets (the SecretHasher interface, bcrypt behind it) and the verified-secret cache."""

from __future__ import annotations

import abc
import asyncio
import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import bcrypt

from .config import Config
from .errors import RateLimited


class SecretHasher(abc.ABC):
    """Turns a token's secret into what the store keeps, and checks a secret against it."""

    @abc.abstractmethod
    def hash(self, secret: str) -> str:
        """A fresh salted hash of `secret` (blocking: call it off any event loop)."""

    @abc.abstractmethod
    def verify(self, secret: str, hashed: str) -> bool:
        """Whether `secret` matches `hashed`; a corrupt `hashed` never matches."""

    @abc.abstractmethod
    async def averify(self, secret: str, hashed: str) -> bool:
        """verify() for an event loop: the work runs on the hasher's own threads."""

    @abc.abstractmethod
    def needs_rehash(self, hashed: str) -> bool:
        """Whether `hashed` was made with weaker settings than this hasher's."""

    def close(self) -> None:  # noqa: B027 - most hashers hold nothing to release
        """Releases the hasher's threads; later calls may start them again."""


class BcryptHasher(SecretHasher):
    """bcrypt, with every hash and check on one bounded pool.

    At most `slots` bcrypt computations run at once and `max_waiting` more may
    queue; beyond that a call is refused with RateLimited. Hashes at CreateToken
    and checks at Authenticate share the bound, so a flood of either holds at
    most slots + max_waiting threads, and calls answered from the verified
    cache keep being served.
    """

    def __init__(
        self,
        rounds: int,
        slots: int,
        max_waiting: int,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.rounds = rounds
        # Told the queue depth whenever it changes (the metrics gauge).
        self._on_depth = on_depth
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
            if self._on_depth is not None:
                self._on_depth(self._waiting)

    def _leave(self) -> None:
        with self._lock:
            self._waiting -= 1
            if self._on_depth is not None:
                self._on_depth(self._waiting)

    @property
    def queue_depth(self) -> int:
        """bcrypt computations running or waiting for a slot."""
        return self._waiting

    def _checkpw(self, secret: str, hashed: str) -> bool:
        try:
            with self._slots:
                return bcrypt.checkpw(secret.encode("ascii"), hashed.encode("ascii"))
        except ValueError:  # a corrupt stored hash never authenticates
            return False

    def hash(self, secret: str) -> str:
        data = secret.encode("ascii")
        if len(data) > 72:
            raise ValueError("bcrypt takes at most 72 bytes")
        self._enter()
        try:
            with self._slots:
                return bcrypt.hashpw(data, bcrypt.gensalt(self.rounds)).decode("ascii")
        finally:
            self._leave()

    def verify(self, secret: str, hashed: str) -> bool:
        self._enter()
        try:
            return self._checkpw(secret, hashed)
        finally:
            self._leave()

    async def averify(self, secret: str, hashed: str) -> bool:
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

    def needs_rehash(self, hashed: str) -> bool:
        # $2b$12$...: the cost is the third field.
        parts = hashed.split("$")
        try:
            return int(parts[2]) < self.rounds
        except (IndexError, ValueError):
            return True

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


def hasher_for(config: Config, on_depth: Callable[[int], None] | None = None) -> SecretHasher:
    """The configured hasher: bcrypt, the one implementation today."""
    return BcryptHasher(
        config.bcrypt_rounds, config.bcrypt_concurrency, config.bcrypt_max_waiting, on_depth
    )


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
