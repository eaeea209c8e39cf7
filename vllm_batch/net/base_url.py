"""An upstream engine's base URL (``--engine-url``), checked and normalised."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_base_url(url: str) -> str:
    """``url`` as an upstream base URL (http(s), a host, no credentials, no trailing ``/``);
    a bare ``http://host:port`` gets ``/v1``. Raises ``ValueError`` naming the problem."""
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"engine URL {url!r} must be http(s)://HOST[:PORT]/v1")
    if parts.username or parts.password:
        raise ValueError(
            f"engine URL {parts.hostname!r} must not carry credentials: use --engine-api-key"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"engine URL {url!r} must not have a query or fragment")
    text = text.rstrip("/")
    return text if parts.path.strip("/") else f"{text}/v1"
