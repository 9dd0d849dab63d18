"""etcdctl over TLS: server certificates, and client certificates when a CA is trusted."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.certs import CA
from tests.servers import GeminiServer, Postgres

pytestmark = pytest.mark.skipif(shutil.which("etcdctl") is None, reason="etcdctl not installed")


def ctl(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "etcdctl",
            "--endpoints",
            f"https://{endpoint}",
            "--dial-timeout=3s",
            "--command-timeout=5s",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, ETCDCTL_API="3"),
    )


def test_tls_with_and_without_client_certificates(postgres: Postgres, tmp_path: Path) -> None:
    ca, other = CA("geminikv-test-ca"), CA("someone-else")
    ca_file = ca.write(tmp_path, "ca")
    server_cert, server_key = ca.issue(tmp_path, "server", server=True)
    client_cert, client_key = ca.issue(tmp_path, "client", server=False)
    wrong_cert, wrong_key = other.issue(tmp_path, "stranger", server=False)
    dsn = postgres.new_database("tls")

    # server TLS only: any client that trusts the server's CA
    server = GeminiServer(
        dsn, server_cert_file=str(server_cert), server_key_file=str(server_key)
    ).start()
    try:
        done = ctl(server.endpoint, f"--cacert={ca_file}", "put", "/tls/a", "1")
        assert (done.returncode, done.stdout) == (0, "OK\n"), done.stderr
        plain = subprocess.run(
            [
                "etcdctl",
                "--endpoints",
                f"http://{server.endpoint}",
                "--dial-timeout=2s",
                "--command-timeout=3s",
                "get",
                "/tls/a",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=dict(os.environ, ETCDCTL_API="3"),
        )
        assert plain.returncode != 0  # no plaintext on a TLS port
    finally:
        server.stop()

    # a trusted CA: client certificates required, and only ours accepted
    server = GeminiServer(
        dsn,
        server_cert_file=str(server_cert),
        server_key_file=str(server_key),
        trusted_ca_file=str(ca_file),
    ).start()
    try:
        good = ctl(
            server.endpoint,
            f"--cacert={ca_file}",
            f"--cert={client_cert}",
            f"--key={client_key}",
            "get",
            "/tls/a",
            "--print-value-only",
        )
        assert (good.returncode, good.stdout) == (0, "1\n"), good.stderr
        missing = ctl(server.endpoint, f"--cacert={ca_file}", "get", "/tls/a")
        assert missing.returncode != 0
        wrong = ctl(
            server.endpoint,
            f"--cacert={ca_file}",
            f"--cert={wrong_cert}",
            f"--key={wrong_key}",
            "get",
            "/tls/a",
        )
        assert wrong.returncode != 0
    finally:
        server.stop()
