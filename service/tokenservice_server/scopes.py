"""The scope catalog: the built-in example catalog, or one from a TOML file."""

from __future__ import annotations

import tomllib
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


def normalise(name: str) -> str:
    """Scope names compare trimmed and case-insensitively."""
    return name.strip().lower()


class ScopeCatalog:
    def __init__(self, scopes: Iterable[Scope]) -> None:
        self._scopes = tuple(scopes)
        self._by_name = {normalise(s.name): s for s in self._scopes}
        if len(self._by_name) != len(self._scopes):
            raise ValueError("the scope catalog names a scope twice")

    def __iter__(self) -> Iterator[Scope]:
        return iter(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)

    def get(self, name: str) -> Scope | None:
        return self._by_name.get(normalise(name))

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
            if not name.strip() or name != name.strip():
                raise ValueError(f"scopes file {path}: invalid scope name {name!r}")
            scopes.append(Scope(name, description, api_only))
        return cls(scopes)

    @classmethod
    def load(cls, path: str | None) -> ScopeCatalog:
        return cls.from_toml(path) if path else cls.default()
