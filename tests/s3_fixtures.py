"""A real S3-compatible server on loopback: moto's server mode, in a thread of this process.

Import the fixture into a test module with
``from tests.s3_fixtures import s3_server  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

REGION = "us-east-1"
# Variables that could point a client at real AWS or another profile; cleared in ``aws_env``.
_CLEARED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


@dataclass
class S3Server:
    endpoint_url: str

    def env(self) -> dict[str, str]:
        """What a client built from the environment (``open_storage``) needs."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @contextlib.contextmanager
    def aws_env(self) -> Iterator[None]:
        """Set :meth:`env` in ``os.environ`` (clearing other AWS settings); restore after."""
        saved = {name: os.environ.get(name) for name in (*self.env(), *_CLEARED)}
        for name in _CLEARED:
            os.environ.pop(name, None)
        os.environ.update(self.env())
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def client(self) -> Any:
        """A new boto3 S3 client configured explicitly (independent of the environment)."""
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name=REGION,
        )

    @functools.cached_property
    def admin(self) -> Any:
        """One shared client for the helpers below (making a client takes a fraction of a s)."""
        return self.client()

    def new_bucket(self, stem: str = "test") -> str:
        name = f"{stem}-{secrets.token_hex(4)}"
        self.admin.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.admin.get_paginator("list_objects_v2")
        return [
            item["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        ]

    def uploads_in_progress(self, bucket: str) -> list[dict[str, Any]]:
        return list(self.admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []))

    def get(self, bucket: str, key: str) -> bytes:
        return bytes(self.admin.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 (all its services, in fact) over HTTP on 127.0.0.1, on a free port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


def local_or_s3(kind: str, s3_server: S3Server, bucket: str) -> Iterator[str | None]:
    """A module's ``storage_url`` for ``kind`` "local" (None) or "s3" (a fresh ``bucket`` on
    ``s3_server``, with its AWS environment set while the module runs)."""
    if kind == "local":
        yield None
        return
    name = s3_server.new_bucket(bucket)
    with s3_server.aws_env():
        yield f"s3://{name}/api"
