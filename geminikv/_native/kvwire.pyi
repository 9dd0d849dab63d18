"""Type stub for kube-apiserver's hottest requests in wire format (kvwire.pyx)."""

from collections.abc import Callable

class GuardedPut:
    key: bytes
    want_mod: int
    value: bytes
    lease: int
    read_on_failure: bool
    delete: bool

def parse_guarded_put(data: bytes, max_bytes: int) -> GuardedPut | None: ...

class KeyGet:
    key: bytes
    serializable: bool

def parse_key_get(data: bytes) -> KeyGet | None: ...
def encode_header_prefix(cluster_id: int, member_id: int) -> bytes: ...
def encode_txn_answer(
    header_prefix: bytes,
    raft_term: int,
    request: GuardedPut,
    succeeded: bool,
    revision: int,
    found: tuple[int, int, int, int] | None,
    value: bytes,
) -> bytes: ...
def encode_range_answer(
    header_prefix: bytes,
    raft_term: int,
    revision: int,
    entries: list[tuple[bytes, int, int, int, int]],
    values: dict[int, bytes] | None,
    count: int,
    more: bool,
    revision_of: Callable[[int], int] | None = ...,
) -> bytes: ...
def encode_get_answer(
    header_prefix: bytes,
    raft_term: int,
    key: bytes,
    revision: int,
    found: tuple[int, int, int, int] | None,
    value: bytes,
) -> bytes: ...
