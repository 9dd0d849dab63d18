"""How etcd keys map to Kine's ``name`` column (docs/architecture.md#keys).

etcd keys are any bytes; ``name`` is text, which holds neither NUL nor invalid UTF-8. Such
keys are stored escaped, as ``ESCAPED`` followed by the key in hex (ASCII, so any
database encoding holds it); so is a key that itself begins with ``ESCAPED``, which keeps
the mapping one to one. Every other key is stored as it is, as Go Kine stores it. The
order of keys is the index's (bytewise), never SQL's, so escaping changes no answer.
"""

from __future__ import annotations

import binascii

# Kine keeps its compact revision in a row named compact_rev_key (in prev_revision), so
# the etcd key of that name, which kube-apiserver's compactor writes, is stored under
# Kine's alias for it.
COMPACT_KEY = b"compact_rev_key"
COMPACT_KEY_STORED = b"compact_rev_key_apiserver"
GAP_PREFIX = b"gap-"
ESCAPED = b"\x7fgeminikv-hex:"


def _storable(key: bytes) -> bool:
    if b"\x00" in key or key.startswith(ESCAPED):
        return False
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def stored_name(key: bytes) -> bytes:
    if key == COMPACT_KEY:
        return COMPACT_KEY_STORED
    if key.isascii() and b"\x00" not in key and not key.startswith(ESCAPED):
        return key  # the common case, decided without decoding
    return key if _storable(key) else ESCAPED + binascii.hexlify(key)


def key_of(name: bytes) -> bytes:
    if name == COMPACT_KEY_STORED:
        return COMPACT_KEY
    if name.startswith(ESCAPED):
        try:
            return binascii.unhexlify(name[len(ESCAPED) :])
        except (binascii.Error, ValueError):
            return name  # not geminikv's escape (a name Go Kine wrote): the name itself
    return name
