"""Run the same requests against etcd and geminikv and compare the answers field by field.

The two servers start at different revisions, so requests name revisions relative to the
pair's starting point and answers are compared with revisions made relative. From there on
revisions advance alike (one per write request, whatever it changes, as etcd's): every
answer's header revision is checked to be etcd's, relative, exactly. Every write's header
revision is still recorded on both sides and geminikv's mapped onto etcd's, so a mismatch
shows as the field it is in rather than as every later revision.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]
from google.protobuf.message import Message  # type: ignore[import-untyped]

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import Stubs

REVISION_FIELDS = {"revision", "create_revision", "mod_revision", "compact_revision"}
HEADER_NOISE = {"cluster_id", "member_id", "raft_term"}

Outcome = tuple[str, Any]  # ("ok", normalised response) or ("error", (code, message))
Revision = Callable[[int], int]  # a relative revision to one server's own


class Build(Protocol):
    """Builds a request for one server, given how to turn relative revisions into its own
    (a protocol, not a Callable: builders often bind loop variables as default arguments)."""

    def __call__(self, rev: Revision, /) -> Message: ...


def _current(stubs: Stubs) -> int:
    return int(stubs.kv.Range(pb.RangeRequest(key=b"\x00", limit=1)).header.revision)


class Pair:
    def __init__(self, etcd: Stubs, gk: Stubs, timeout: float = 30.0) -> None:
        self.etcd = etcd
        self.gk = gk
        self.timeout = timeout  # every call's deadline: a hang shows up as DEADLINE_EXCEEDED
        self.base_e = _current(etcd)
        self.base_g = _current(gk)
        self._etcd_revs = [self.base_e]  # parallel: after each write, both headers
        self._gk_revs = [self.base_g]

    # -- revision translation

    def etcd_rev(self, rel: int) -> int:
        return self.base_e + rel

    def gk_rev(self, rel: int) -> int:
        """geminikv's revision for the state etcd has at base + rel."""
        want = self.base_e + rel
        i = bisect.bisect_right(self._etcd_revs, want) - 1
        if i < 0:
            return self.base_g - (self.base_e - want)
        if want > self._etcd_revs[-1]:
            return self._gk_revs[-1] + (want - self._etcd_revs[-1])
        return self._gk_revs[i]

    def gk_to_rel(self, g: int) -> int:
        """The relative revision of geminikv's revision ``g``."""
        if g == 0:
            return 0
        i = bisect.bisect_left(self._gk_revs, g)
        if i == len(self._gk_revs):
            return self._etcd_revs[-1] + (g - self._gk_revs[-1]) - self.base_e
        return self._etcd_revs[i] - self.base_e

    def etcd_to_rel(self, e: int) -> int:
        """The relative revision of etcd's revision ``e``."""
        return 0 if e == 0 else e - self.base_e

    # -- calls

    def call(self, method: str, build: Build, service: str = "kv") -> tuple[Outcome, Outcome]:
        """Send build(rev) to both; ``rev(rel)`` gives each server's absolute revision."""
        e = self._invoke(self.etcd, service, method, build(self.etcd_rev))
        g = self._invoke(self.gk, service, method, build(self.gk_rev))
        if e[0] == "ok" and g[0] == "ok":
            e_rev = int(e[1].header.revision)
            g_rev = int(g[1].header.revision)
            # (etcd's header revision is 0 in some answers, Alarm's: compared as fields)
            assert not e_rev or g_rev - self.base_g == e_rev - self.base_e, (
                f"{method}: header revision {g_rev - self.base_g} on geminikv, "
                f"{e_rev - self.base_e} on etcd (relative)"
            )
            if e_rev > self._etcd_revs[-1]:
                self._etcd_revs.append(e_rev)
                self._gk_revs.append(g_rev)
        return self.normalise(e, self.etcd_to_rel), self.normalise(g, self.gk_to_rel)

    def check(self, method: str, build: Build, service: str = "kv") -> Outcome:
        """Call both and assert identical answers; returns etcd's (normalised) outcome."""
        e, g = self.call(method, build, service)
        if g != e:
            print(f"MISMATCH {method}: {build(self.etcd_rev)}\n etcd:     {e}\n geminikv: {g}")
        assert g == e, f"{method} differs:\n etcd:     {e}\n geminikv: {g}"
        return e

    def _invoke(self, stubs: Stubs, service: str, method: str, request: Message) -> Outcome:
        try:
            return "ok", getattr(getattr(stubs, service), method)(request, timeout=self.timeout)
        except grpc.RpcError as err:
            return "error", (err.code(), err.details())

    @staticmethod
    def normalise(outcome: Outcome, to_rel: Callable[[int], int]) -> Outcome:
        """A response as a dict, without per-server header fields, revisions made relative."""
        kind, value = outcome
        if kind == "error":
            return outcome
        data = MessageToDict(
            value, preserving_proto_field_name=True, always_print_fields_with_no_presence=False
        )
        return "ok", _walk(data, to_rel)


def _walk(node: Any, to_rel: Callable[[int], int]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, val in node.items():
            if key in HEADER_NOISE:
                continue
            if key in REVISION_FIELDS and not isinstance(val, (dict, list)):
                out[key] = to_rel(int(val))
            else:
                out[key] = _walk(val, to_rel)
        return out
    if isinstance(node, list):
        return [_walk(v, to_rel) for v in node]
    return node
