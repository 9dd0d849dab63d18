"""How etcd keys map to Kine's ``name`` column, and which keys the table can hold."""

from __future__ import annotations

from geminikv import errors

# Kine keeps its compact revision in a row named compact_rev_key (in prev_revision), so
# the etcd key of that name, which kube-apiserver's compactor writes, is stored under
# Kine's alias for it (docs/architecture.md#keys).
COMPACT_KEY = b"compact_rev_key"
COMPACT_KEY_STORED = b"compact_rev_key_apiserver"
GAP_PREFIX = b"gap-"


def stored_name(key: bytes) -> bytes:
    return COMPACT_KEY_STORED if key == COMPACT_KEY else key


def key_of(name: bytes) -> bytes:
    return COMPACT_KEY if name == COMPACT_KEY_STORED else name


def check_writable(key: bytes) -> None:
    """Reject keys a PostgreSQL text column cannot store."""
    if b"\x00" in key:
        raise errors.InvalidKey("geminikv: key must not contain NUL bytes")
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidKey("geminikv: key must be valid UTF-8") from None
