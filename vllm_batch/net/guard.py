"""Outbound URL guard (SSRF): http(s) only, and no private targets unless allowed by name.

Used for webhook URLs at batch creation and again at delivery time (DNS may have changed),
and for the audio endpoints' ``file_url`` before each fetch (``file_url.py``).
A URL passes when its scheme is http(s) and every address its host resolves to is public,
or when the host, or an address it resolves to, is in the allow list (hosts, IPs, CIDRs).
Callers then connect to a checked address (``pinned``), not to a fresh DNS answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Cloud metadata services (also covered by link-local/private, listed for the message).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254")
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT


class RefusedURL(ValueError):
    """The URL may not be used as an outbound target; the message says why."""


@dataclass(frozen=True)
class Target:
    """A checked URL and the addresses it resolved to (connect to one of these)."""

    url: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _why_private(address: IPAddress) -> str | None:
    if address in METADATA_ADDRESSES:
        return "a cloud metadata service"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return _why_private(address.ipv4_mapped)
    for test, what in (
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_unspecified, "unspecified"),
        (address in _SHARED if address.version == 4 else False, "shared (CGNAT)"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
    ):
        if test:
            return what
    return None


class AllowList:
    """Hosts, IPs and CIDRs exempt from the private-address rule."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.hosts: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.hosts.add(entry.rstrip("."))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


RESOLVE_TIMEOUT_SECONDS = 5.0


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, via the system resolver (in a thread, bounded)."""
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            ),
            RESOLVE_TIMEOUT_SECONDS,
        )
    except TimeoutError:
        raise OSError(f"no answer within {RESOLVE_TIMEOUT_SECONDS:.0f} s") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an absolute http(s) URL, else ``RefusedURL``."""
    if not isinstance(url, str) or not url:
        raise RefusedURL("must be an absolute http(s) URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RefusedURL(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise RefusedURL(f"must use http or https, not {parts.scheme or 'no scheme'!r}")
    if not parts.hostname:
        raise RefusedURL("has no host")
    if parts.username or parts.password:
        raise RefusedURL("must not carry credentials in the URL")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80)


WEBHOOK_ALLOW_SETTING = "VLLM_BATCH_WEBHOOK_ALLOWED_HOSTS"


async def check_url(
    url: str,
    allow: AllowList,
    resolver: Resolver = system_resolver,
    *,
    allow_setting: str = WEBHOOK_ALLOW_SETTING,
) -> Target:
    """Resolve and check ``url``; raises ``RefusedURL`` naming the reason (and the setting,
    ``allow_setting``, that would allow a private target)."""
    _, host, port = parse_url(url)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = await resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise RefusedURL(f"host {host!r} does not resolve ({exc})") from None
        if not addresses:
            raise RefusedURL(f"host {host!r} does not resolve")
    if not allow.allows_host(host):
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            why = _why_private(address)
            if why and not allow.allows_address(address):
                shown = host if literal is not None else f"{host} ({address})"
                raise RefusedURL(f"targets a {why} address: {shown}; allow it with {allow_setting}")
    return Target(url=url, host=host, port=port, addresses=tuple(addresses))


def pinned(target: Target) -> tuple[str, dict[str, str], dict[str, str]]:
    """The URL rewritten to the checked address, plus Host header and TLS server name
    (httpx request ``extensions``).

    Connecting to the address we checked (not re-resolving) closes the DNS-rebinding gap.
    """
    parts = urlsplit(target.url)
    address = target.addresses[0]
    shown = f"[{address}]" if ipaddress.ip_address(address.split("%")[0]).version == 6 else address
    netloc = f"{shown}:{parts.port}" if parts.port else shown
    url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host = parts.netloc.rsplit("@", 1)[-1]
    extensions = {"sni_hostname": target.host} if parts.scheme.lower() == "https" else {}
    return url, {"host": host}, extensions
