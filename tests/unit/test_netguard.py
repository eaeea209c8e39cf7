"""The outbound URL guard: schemes, private ranges, metadata services, DNS, allow list."""

from __future__ import annotations

import pytest

from vllm_batch.net.guard import AllowList, RefusedURL, check_url


def resolver_for(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"unknown host {host}")
        return table[host]

    return resolve


PUBLIC = resolver_for(
    {
        "hooks.example.com": ["93.184.216.34"],
        "db.internal": ["10.0.0.5"],
        "split.example.com": ["93.184.216.34", "192.168.1.7"],
        "v6.example.com": ["2606:2800:220:1:248:1893:25c8:1946"],
        "mapped.example.com": ["::ffff:127.0.0.1"],
    }
)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://hooks.example.com/x", "must use http or https"),
        ("file:///etc/passwd", "must use http or https"),
        ("hooks.example.com/x", "must use http or https"),
        ("http://user:pw@hooks.example.com/", "credentials"),
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://172.16.5.4/hook", "private"),
        ("http://100.64.0.1/hook", "CGNAT"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://[fd00:ec2::254]/", "metadata"),
        ("http://169.254.10.10/", "link-local"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://db.internal/hook", "private address: db.internal (10.0.0.5)"),
        ("http://split.example.com/hook", "192.168.1.7"),
        ("http://mapped.example.com/hook", "loopback"),
        ("http://nowhere.example.com/", "does not resolve"),
        ("http://hooks.example.com:99999/", "not a valid URL"),
    ],
)
async def test_refused(url: str, reason: str) -> None:
    with pytest.raises(RefusedURL, match=reason.replace("(", r"\(").replace(")", r"\)")):
        await check_url(url, AllowList([]), PUBLIC)


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example.com/x?token=1", "http://v6.example.com/", "http://93.184.216.34/"],
)
async def test_public_targets_pass(url: str) -> None:
    target = await check_url(url, AllowList([]), PUBLIC)
    assert target.addresses and target.url == url


async def test_allow_list_by_ip_cidr_and_host() -> None:
    allow = AllowList(["127.0.0.1", "10.0.0.0/8", "Split.Example.com"])
    assert (await check_url("http://127.0.0.1:9/h", allow, PUBLIC)).addresses == ("127.0.0.1",)
    assert (await check_url("http://db.internal/h", allow, PUBLIC)).addresses == ("10.0.0.5",)
    await check_url("http://split.example.com/h", allow, PUBLIC)  # named host: allowed
    with pytest.raises(RefusedURL, match=r"127\.0\.0\.2"):
        await check_url("http://127.0.0.2/h", allow, PUBLIC)
    with pytest.raises(RefusedURL, match="metadata"):
        await check_url("http://169.254.169.254/", allow, PUBLIC)


async def test_real_resolver_refuses_localhost_name() -> None:
    """The system resolver: ``localhost`` is a DNS name for a loopback address."""
    with pytest.raises(RefusedURL, match=r"loopback address: localhost \("):
        await check_url("http://localhost:8080/hook", AllowList([]))
    target = await check_url("http://localhost:8080/hook", AllowList(["127.0.0.0/8", "::1"]))
    assert target.host == "localhost"
