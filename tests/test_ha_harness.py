"""The HA harness's own hygiene: what a dead session left behind is removed before the
next one starts, and leaving a harness removes everything it made (tests/ha/)."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.ha.cluster import harness, missing
from tests.ha.net import BRIDGE, PREFIX, ip, namespace_pids

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


def _namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def _links() -> str:
    return ip("-o", "link", "show").stdout


def test_stale_namespaces_processes_and_directories_are_removed() -> None:
    stale = PREFIX + "stale"
    ip("netns", "add", stale)
    leftover = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"])
    while not namespace_pids(stale):
        time.sleep(0.01)
    directory = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        with harness():
            assert stale not in _namespaces()
            leftover.wait(10)  # killed (reaped by the harness: no status to assert)
            assert not directory.exists()
    finally:
        leftover.kill()
        leftover.wait()
        ip("netns", "delete", stale, check=False)


def test_leaving_the_harness_removes_everything_even_on_failure() -> None:
    made: list[str] = []
    with pytest.raises(RuntimeError, match="a test failed"), harness() as (network, root):
        namespace, _ = network.add("x", 99)
        made.append(namespace)
        subprocess.Popen(["ip", "netns", "exec", namespace, "sleep", "600"])
        assert namespace_pids(namespace)
        assert root.exists()
        made.append(str(root))
        raise RuntimeError("a test failed")
    assert made[0] not in _namespaces()
    assert not Path(made[1]).exists()
    assert BRIDGE not in _links()
    assert made[0] + "@" not in _links()
