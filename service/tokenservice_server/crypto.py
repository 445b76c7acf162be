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

import bcrypt

from .config import Config
from .fairshare import NOBODY, Claimant, FairScheduler


class SecretHasher(abc.ABC):
    """Turns a token's secret into what the store keeps, and checks a secret against it.

    `claimant` says whom the work is for, so a hasher with bounded resources can
    share them fairly; NOBODY when there is no one to charge it to.
    """

    @abc.abstractmethod
    def hash(self, secret: str, claimant: Claimant = NOBODY) -> str:
        """A fresh salted hash of `secret` (blocking: call it off any event loop)."""

    @abc.abstractmethod
    def verify(self, secret: str, hashed: str, claimant: Claimant = NOBODY) -> bool:
        """Whether `secret` matches `hashed`; a corrupt `hashed` never matches."""

    @abc.abstractmethod
    async def averify(self, secret: str, hashed: str, claimant: Claimant = NOBODY) -> bool:
        """verify() for an event loop: the work runs on the hasher's own threads."""

    @abc.abstractmethod
    def needs_rehash(self, hashed: str) -> bool:
        """Whether `hashed` was made with weaker settings than this hasher's."""

    def close(self) -> None:  # noqa: B027 - most hashers hold nothing to release
        """Releases the hasher's threads; later calls may start them again."""


class BcryptHasher(SecretHasher):
    """bcrypt, with every hash and check on a few threads shared fairly.

    At most `slots` bcrypt computations run at once, each client has at most
    `per_client` running or waiting, and at most `max_waiting` wait in all; the
    scheduler (fairshare.FairScheduler) serves orgs and clients in turn, so one
    tenant's flood does not hold up another's first-time verifications. A call
    that may not wait is refused with RateLimited. Hashes at CreateToken and
    checks at Authenticate share the threads, and calls answered from the
    verified cache never come here.
    """

    def __init__(
        self,
        rounds: int,
        slots: int,
        max_waiting: int,
        per_client: int = 4,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.rounds = rounds
        # on_depth is told the queue depth whenever it changes (the metrics gauge).
        self._scheduler = FairScheduler(slots, max_waiting, per_client, on_depth)

    @property
    def queue_depth(self) -> int:
        """bcrypt computations running or waiting for a thread."""
        return self._scheduler.running + self._scheduler.waiting

    @staticmethod
    def _checkpw(secret: str, hashed: str) -> bool:
        try:
            return bcrypt.checkpw(secret.encode("ascii"), hashed.encode("ascii"))
        except ValueError:  # a corrupt stored hash never authenticates
            return False

    def hash(self, secret: str, claimant: Claimant = NOBODY) -> str:
        data = secret.encode("ascii")
        if len(data) > 72:
            raise ValueError("bcrypt takes at most 72 bytes")
        salt = bcrypt.gensalt(self.rounds)
        job = self._scheduler.submit(claimant, lambda: bcrypt.hashpw(data, salt))
        return job.result().decode("ascii")

    def verify(self, secret: str, hashed: str, claimant: Claimant = NOBODY) -> bool:
        return self._scheduler.submit(claimant, lambda: self._checkpw(secret, hashed)).result()

    async def averify(self, secret: str, hashed: str, claimant: Claimant = NOBODY) -> bool:
        # A caller that gives up (a cancelled RPC) while its check waits withdraws it;
        # one already running runs to the end: the bound counts bcrypt work, not waiters.
        job = self._scheduler.submit(claimant, lambda: self._checkpw(secret, hashed))
        return await asyncio.wrap_future(job)

    def needs_rehash(self, hashed: str) -> bool:
        # $2b$12$...: the cost is the third field.
        parts = hashed.split("$")
        try:
            return int(parts[2]) < self.rounds
        except (IndexError, ValueError):
            return True

    def close(self) -> None:
        self._scheduler.close()


def hasher_for(config: Config, on_depth: Callable[[int], None] | None = None) -> SecretHasher:
    """The configured hasher: bcrypt, the one implementation today."""
    return BcryptHasher(
        config.bcrypt_rounds,
        config.bcrypt_concurrency,
        config.bcrypt_max_waiting,
        config.bcrypt_max_per_client,
        on_depth,
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
