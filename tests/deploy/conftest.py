"""The shared S3 server fixtures (tests/s3.py), for the storage checks of this package."""

from tests.s3 import s3_bucket, s3_env, s3_server, s3_storage  # noqa: F401  (fixtures, used by name)
