"""Who is calling: API keys resolved to a ``Principal`` (constant-time, before any body).

Keys come from three places, all optional: ``api_key`` (one admin key named ``default``,
as before ownership existed), ``api_keys`` (``NAME:KEY`` or ``NAME:KEY:admin`` entries)
and ``api_keys_file`` (one such entry per line; ``#`` starts a comment). Files and
batches belong to the key name that created them; admin keys see every row.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from vllm_batch.config import Settings

DEFAULT_PRINCIPAL_NAME = "default"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class KeyConfigError(ValueError):
    """The configured API keys are malformed (never echoes a key)."""


@dataclass(frozen=True)
class Principal:
    """The caller a request acts for."""

    name: str
    admin: bool

    @property
    def scope(self) -> str | None:
        """The owner to filter rows by: None (everything) for admins, else our name."""
        return None if self.admin else self.name


# Without any configured key every caller acts as the single local owner.
ANONYMOUS_ADMIN = Principal(DEFAULT_PRINCIPAL_NAME, admin=True)


class KeyRing:
    """API keys and the principal each one stands for."""

    def __init__(self, keys: dict[str, Principal]) -> None:
        self._keys = [(key.encode(), principal) for key, principal in keys.items() if key]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Every configured key; raises ``KeyConfigError`` on a malformed or duplicate one."""
        entries = [(entry, "VLLM_BATCH_API_KEYS") for entry in settings.api_keys]
        if settings.api_keys_file is not None:
            entries += _read_keys_file(settings.api_keys_file)
        keys: dict[str, Principal] = {}
        if settings.api_key:
            keys[settings.api_key] = Principal(DEFAULT_PRINCIPAL_NAME, admin=True)
        names = {p.name for p in keys.values()}
        for entry, where in entries:
            key, principal = _parse_entry(entry, where)
            if key in keys or principal.name in names:
                raise KeyConfigError(f"{where}: key name {principal.name!r} or its key is repeated")
            keys[key] = principal
            names.add(principal.name)
        return cls(keys)

    @property
    def enabled(self) -> bool:
        """Whether requests must present a key at all."""
        return bool(self._keys)

    def secrets(self) -> list[str]:
        """The keys themselves, for the log redaction filter."""
        return [key.decode() for key, _principal in self._keys]

    def resolve(self, authorization: bytes | None) -> Principal | None:
        """The principal for an ``Authorization: Bearer <key>`` header, or None.

        Every key is compared (constant time each), so timing does not tell which matched.
        """
        if not self._keys:
            return ANONYMOUS_ADMIN
        scheme, _, token = (authorization or b"").partition(b" ")
        presented = token.strip()
        found: Principal | None = None
        for key, principal in self._keys:
            if hmac.compare_digest(presented, key) and found is None:
                found = principal
        return found if scheme.lower() == b"bearer" else None


def _parse_entry(entry: str, where: str) -> tuple[str, Principal]:
    parts = entry.strip().split(":")
    admin = len(parts) == 3 and parts[2] == "admin"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not admin):
        raise KeyConfigError(f"{where}: expected NAME:KEY or NAME:KEY:admin")
    name, key = parts[0].strip(), parts[1].strip()
    if not _NAME.fullmatch(name):
        raise KeyConfigError(f"{where}: key name {name[:64]!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if not key:
        raise KeyConfigError(f"{where}: the key for {name!r} is empty")
    return key, Principal(name, admin=admin)


def _read_keys_file(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyConfigError(f"cannot read keys file {path}: {exc.strerror or exc}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append((line, f"{path}:{number}"))
    return entries
