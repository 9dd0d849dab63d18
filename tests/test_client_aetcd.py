"""End to end with a Python etcd v3 client nobody here wrote (aetcd, from PyPI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.servers import GeminiServer

SESSION = Path(__file__).parent / "clients" / "aetcd_session.py"


def test_kv_and_txn_through_aetcd(gemini: GeminiServer, prefix: bytes) -> None:
    done = subprocess.run(
        [sys.executable, str(SESSION), str(gemini.port), prefix.decode()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    p = prefix.decode()
    assert seen["get"] == ["1", 1]
    assert seen["missing"] is None
    assert seen["prefix"] == [p + "a", p + "b"]
    assert seen["range"] == ["1"]
    assert seen["deleted"] == 1
    assert seen["after_delete"] == [p + "a"]
    assert seen["txn"] == [True, False, "10", "10", 2]
    assert seen["lease"] == [True, True] and seen["lease_revoked"] is True
    assert [e[1:] for e in seen["watch"]] == [[p + "w/1", "hello"], [p + "w/1", ""]]
    assert "PUT" in seen["watch"][0][0] and "DELETE" in seen["watch"][1][0]
