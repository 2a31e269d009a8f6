"""Shared fixtures: the Hypothesis profile, and the machine's PostgreSQL.

HYPOTHESIS_PROFILE picks the profile (default: fast). PostgreSQL
(127.0.0.1:5432, database ``test``) and Redis (127.0.0.1:6379) must be
running: a test that needs one and cannot reach it fails, never skips. The
S3 tests start their own moto server on loopback.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import psycopg
import pytest
from hypothesis import settings

from tests import strategies  # noqa: F401  (registers the profiles)
from tests.moto_server import MotoServer, MotoServerError, aws_environment

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose tables live in a fresh schema, dropped afterwards."""
    schema = f"dais_t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (database test) is needed: {exc}")
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="session")
def moto() -> Iterator[str]:
    """A moto S3 server on loopback, with the AWS variables pointing at it.

    A server that cannot start fails the tests that need it.
    """
    try:
        server = MotoServer.start()
    except MotoServerError as exc:
        pytest.fail(f"the moto S3 server could not start: {exc}")
    with server, pytest.MonkeyPatch.context() as patch:
        for name, value in aws_environment(server.endpoint).items():
            if value is None:
                patch.delenv(name, raising=False)
            else:
                patch.setenv(name, value)
        yield server.endpoint


@pytest.fixture(scope="session")
def s3(moto: str) -> Any:
    """A boto3 client of the moto server, for setting up and looking."""
    return boto3.session.Session().client("s3")


@pytest.fixture
def bucket(s3: Any) -> str:
    """A fresh, empty bucket."""
    name = f"dais-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name
