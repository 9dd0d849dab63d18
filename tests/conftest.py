"""Session fixtures: one embedded PostgreSQL, one geminikv, one etcd (when installed)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.container import ImageBuild, missing_tools
from tests.differential import Pair
from tests.servers import Etcd, GeminiServer, Postgres, Stubs

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("geminikv reliability run (tests/test_reliability.py)")
    group.addoption(
        "--reliability-seconds",
        type=float,
        default=float(os.environ.get("GEMINIKV_RELIABILITY_SECONDS", "30")),
        help="how long the traffic runs (default 30: each fault once; or "
        "GEMINIKV_RELIABILITY_SECONDS)",
    )
    group.addoption(
        "--reliability-seed",
        type=int,
        default=int(os.environ.get("GEMINIKV_RELIABILITY_SEED", str(int(time.time()) % 10_000))),
        help="the random traffic's seed (default: the clock, or GEMINIKV_RELIABILITY_SEED)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The container image tests last: their image builds in the background meanwhile.
    items.sort(key=lambda item: item.path.name == "test_dockerfile.py")  # stable: else as is


@pytest.fixture(scope="session", autouse=True)
def image_build(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ImageBuild | None]:
    """The container image, building from the session's first test on when an image test
    is selected and its tools are installed (tests/container.py); else None."""
    wanted = any("podman" in getattr(item, "fixturenames", ()) for item in request.session.items)
    if not wanted or missing_tools():
        yield None
        return
    build = ImageBuild(tmp_path_factory.mktemp("image"))
    yield build
    build.destroy()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    root = Path(tempfile.mkdtemp(prefix="geminikv-pg-"))
    pg = Postgres(root)
    yield pg
    pg.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def gemini(postgres: Postgres) -> Iterator[GeminiServer]:
    server = GeminiServer(postgres.new_database("session")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def etcd() -> Iterator[Etcd]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed (Debian package etcd-server)")
    server = Etcd().start()
    yield server
    server.stop()


@pytest.fixture
def gk(gemini: GeminiServer) -> Iterator[Stubs]:
    stubs = gemini.stubs()
    yield stubs
    stubs.close()


def unique_prefix() -> bytes:
    """A key prefix above every key created before it.

    Tests share servers; prefixes grow with time and sort after everything else
    ("~" > "/registry/…"), so even a range open to the end ("\\0") sees only the keys
    of the test that made it.
    """
    return b"~%020d/" % time.time_ns()


@pytest.fixture
def prefix() -> bytes:
    return unique_prefix()


@pytest.fixture
def pair(etcd: Etcd, gemini: GeminiServer) -> Iterator[Pair]:
    """The session's etcd and geminikv, for differential checks."""
    e, g = etcd.stubs(), gemini.stubs()
    yield Pair(e, g)
    e.close()
    g.close()
