"""The scope catalog: the built-in example catalog, or one from a TOML file."""

from __future__ import annotations

import tomllib
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Scope:
    name: str
    description: str
    api_only: bool = False


DEFAULT_SCOPES: tuple[Scope, ...] = (
    Scope("api_token:manage", "create, list and revoke API tokens", True),
    Scope("api_token:admin", "list and revoke every token in the caller's org", True),
    Scope("app:manage", "manage OAuth apps", True),
    Scope("api_token:verify", "watch token events to cache verifications", True),
    Scope("user:read", "read users"),
    Scope("pass:read", "read passes"),
    Scope("pass:create", "create passes"),
    Scope("loyalty:manage", "manage loyalty programs"),
    Scope("invoice.view", "view invoices"),
    Scope("invoice.create", "create invoices"),
    Scope("client.view", "view clients"),
)

MANAGE = "api_token:manage"
ADMIN = "api_token:admin"
VERIFY = "api_token:verify"


def why_not_canonical(name: str) -> str | None:
    """Why `name` cannot be a scope name as written, or None when it can.

    Scope names compare exactly, so a name must already be in the one form it
    is compared in: NFKC-normal (no look-alikes such as the Kelvin sign for K,
    no full-width letters) and without white space or control and format
    characters, which would hide in a log line or a terminal. Nothing is
    normalised on the way in: a name that would change is refused.
    """
    if not name:
        return "is empty"
    if unicodedata.normalize("NFKC", name) != name:
        return "is not in canonical Unicode form (NFKC)"
    for ch in name:
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zs"):
            return "contains white space or control characters"
    return None


class ScopeCatalog:
    """The scopes a token may carry, matched only as the catalog spells them."""

    def __init__(self, scopes: Iterable[Scope]) -> None:
        self._scopes = tuple(scopes)
        self._by_name = {s.name: s for s in self._scopes}
        for s in self._scopes:
            why = why_not_canonical(s.name)
            if why:
                raise ValueError(f"scope name {s.name!r} {why}")
        # Names differing only in case would be told apart by the service and
        # confused by people: a catalog may not hold both.
        if len({s.name.casefold() for s in self._scopes}) != len(self._scopes):
            raise ValueError("the scope catalog names a scope twice")

    def __iter__(self) -> Iterator[Scope]:
        return iter(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)

    def get(self, name: str) -> Scope | None:
        """The scope spelled exactly `name`; another case or spelling is no scope."""
        return self._by_name.get(name)

    @classmethod
    def default(cls) -> ScopeCatalog:
        return cls(DEFAULT_SCOPES)

    @classmethod
    def from_toml(cls, path: str) -> ScopeCatalog:
        """Reads `[scopes."name"] description = "...", api_only = true` tables."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ValueError(f"cannot read scopes file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"scopes file {path} is not valid TOML: {e}") from None
        table = data.get("scopes")
        if not isinstance(table, dict) or not table:
            raise ValueError(f"scopes file {path} has no [scopes.\"name\"] tables")
        scopes = []
        for name, entry in table.items():
            if not isinstance(entry, dict):
                raise ValueError(f"scopes file {path}: scope {name!r} must be a table")
            description = entry.get("description", "")
            api_only = entry.get("api_only", False)
            if not isinstance(description, str) or not isinstance(api_only, bool):
                raise ValueError(
                    f"scopes file {path}: scope {name!r} needs a string description"
                    " and a boolean api_only"
                )
            why = why_not_canonical(name)
            if why:
                raise ValueError(f"scopes file {path}: scope name {name!r} {why}")
            scopes.append(Scope(name, description, api_only))
        try:
            return cls(scopes)
        except ValueError as e:
            raise ValueError(f"scopes file {path}: {e}") from None

    @classmethod
    def load(cls, path: str | None) -> ScopeCatalog:
        return cls.from_toml(path) if path else cls.default()
