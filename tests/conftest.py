from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tests.redis_server import RedisServer

#: What every pytest a test runs is given: pytest-randomly (a test dependency, to test the
#: priorities with it) off, so that the sessions run their tests in the order they assert.
NO_RANDOMLY = "-p no:randomly"


@pytest.fixture(autouse=True)
def _randomly_off(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")  # it clears PYTEST_ADDOPTS as it starts
    monkeypatch.setenv("PYTEST_ADDOPTS", NO_RANDOMLY)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole test session (missing binary: the test fails)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (it may stop it), with a password."""
    server = RedisServer(tmp_path, password="s3cret-pa55").start()
    yield server
    server.stop()
