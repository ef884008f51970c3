"""A real S3-compatible server on loopback for tests: moto in server mode, shared by a session.

Use it from any test package by importing the fixtures into that package's conftest.py:

    from tests.s3 import s3_bucket, s3_env, s3_server, s3_storage  # noqa: F401

- `s3_server` (session): the running server (`S3Server`: endpoint URL, credentials, a boto3 client).
- `s3_env`: points this test's process environment at the server (`AWS_ENDPOINT_URL`, keys,
  region) through monkeypatch, the same variables the api container and the Ray nodes get.
- `s3_bucket`: a fresh, empty bucket for this test (name), with `s3_env` applied.
- `s3_storage`: `s3://<fresh bucket>/runs`, a value for `CDSP_STORAGE`.

The server speaks HTTP on 127.0.0.1 at a port the OS picks, so parallel sessions do not collide.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# Variables that would send boto3/s3fs/pyarrow elsewhere (a real profile, a session token, our own
# endpoint override) if left over from the developer's shell.
_FOREIGN_ENV = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "CDSP_S3_ENDPOINT",
)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str = "cdsp-test-key"
    secret_key: str = "cdsp-test-secret"
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The environment a process needs to use this server for s3:// locations."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server (independent of the process environment)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def create_bucket(self, prefix: str = "cdsp") -> str:
        """Create a bucket with a unique name and return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (free port), started once per test session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point this test's environment at the server; undone after the test."""
    for name in _FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A new empty bucket on the server, environment applied; returns its name."""
    return s3_env.create_bucket()


@pytest.fixture
def s3_storage(s3_bucket: str) -> str:
    """A storage URI under a new bucket, e.g. for `CDSP_STORAGE`."""
    return f"s3://{s3_bucket}/runs"
