"""API keys to principals, and Host header parsing, without a server."""

from __future__ import annotations

from vllm_batch.api.auth import ANONYMOUS_ADMIN, KeyRing, Principal
from vllm_batch.api.edge import host_name
from vllm_batch.config import Settings


def test_single_api_key_setting_is_one_admin_named_default() -> None:
    ring = KeyRing.from_settings(Settings(api_key="sk-one"))
    assert ring.enabled
    assert ring.resolve(b"Bearer sk-one") == Principal("default", admin=True)
    assert ring.resolve(b"bearer sk-one") == Principal("default", admin=True)
    for header in (None, b"", b"sk-one", b"Basic sk-one", b"Bearer sk-on", b"Bearer sk-one2"):
        assert ring.resolve(header) is None


def test_a_set_of_keys_resolves_each_to_its_principal() -> None:
    alice, bob = Principal("alice", admin=False), Principal("bob", admin=True)
    ring = KeyRing({"sk-alice": alice, "sk-bob": bob, "": Principal("empty", admin=True)})
    assert ring.resolve(b"Bearer sk-alice") == alice
    assert ring.resolve(b"Bearer sk-bob") == bob
    assert ring.resolve(b"Bearer ") is None  # an empty key is never configured


def test_without_keys_everyone_is_the_local_admin() -> None:
    ring = KeyRing.from_settings(Settings())
    assert not ring.enabled and ring.resolve(None) == ANONYMOUS_ADMIN


def test_non_ascii_keys_compare_as_utf8_bytes() -> None:
    ring = KeyRing({"clé-secrète": Principal("p", admin=False)})
    assert ring.resolve("Bearer clé-secrète".encode()) == Principal("p", admin=False)
    assert ring.resolve("Bearer clé-secrète".encode("latin-1")) is None


def test_host_name_strips_ports_and_brackets() -> None:
    assert host_name("LocalHost:4080") == "localhost"
    assert host_name("[::1]:4080") == "::1"
    assert host_name("[::1]") == "::1"
    assert host_name("::1") == "::1"
    assert host_name("example.com") == "example.com"
    assert host_name("") == ""
