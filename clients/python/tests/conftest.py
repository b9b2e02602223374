"""Fixtures of the client's own tests: a fake ingest and a fresh outbox path."""

from __future__ import annotations

import pytest

from .fake_ingest import FakeIngest


@pytest.fixture
def ingest():
    fake = FakeIngest().start()
    yield fake
    fake.stop()


@pytest.fixture
def outbox_path(tmp_path):
    return tmp_path / "outbox.db"
