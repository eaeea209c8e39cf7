"""Who is calling: API keys resolved to a ``Principal`` (constant-time, before any body).

Today one ``api_key`` setting gives one admin principal named ``default``; the ``KeyRing``
already holds a set of keys so per-key principals can be added without touching the edge.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from vllm_batch.config import Settings

DEFAULT_PRINCIPAL_NAME = "default"


@dataclass(frozen=True)
class Principal:
    """The caller a request acts for."""

    name: str
    admin: bool


# Without any configured key every caller acts as the single local owner.
ANONYMOUS_ADMIN = Principal(DEFAULT_PRINCIPAL_NAME, admin=True)


class KeyRing:
    """API keys and the principal each one stands for."""

    def __init__(self, keys: dict[str, Principal]) -> None:
        self._keys = [(key.encode(), principal) for key, principal in keys.items() if key]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        if not settings.api_key:
            return cls({})
        return cls({settings.api_key: Principal(DEFAULT_PRINCIPAL_NAME, admin=True)})

    @property
    def enabled(self) -> bool:
        """Whether requests must present a key at all."""
        return bool(self._keys)

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
