"""The PostgreSQL server the ledger tests run against: ``PMIXED_TEST_POSTGRES=postgresql://...``
(``./run test`` starts a throwaway cluster on loopback and sets it). Without it the PostgreSQL
tests are skipped, except under CI (``CI`` set), where they fail: CI must run them."""

from __future__ import annotations

import os
import uuid

import pytest

ENV = "PMIXED_TEST_POSTGRES"


def server_url() -> str:
    url = os.environ.get(ENV, "")
    if not url:
        why = f"{ENV} is not set: no PostgreSQL server to test the shared ledger against (./run test starts one)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL ledger tests, but {why}")
        pytest.skip(why)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("psycopg is not installed (it is part of the dev extra: pip install -e '.[dev]')")
    return url


def with_params(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


def budget_url(schema: str | None = None) -> str:
    """A fresh budget (unique name) on the test server, optionally in its own schema."""
    extra = {"schema": schema} if schema else {}
    return with_params(server_url(), budget=f"test-{uuid.uuid4().hex[:12]}", **extra)


def fresh_schema() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def admin():
    """A plain psycopg connection to the test database (autocommit), for inspection and damage."""
    import psycopg

    return psycopg.connect(server_url(), autocommit=True)
