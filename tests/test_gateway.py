"""etcd's HTTP endpoints (issue 20 item 4): the same requests with curl to a real etcd (its
gateway is on its client URL) and to geminikv's --http-listen-address, the answers compared
after normalising what legitimately differs (cluster and member ids, raft term, lease ids);
then OpenStack's gateway client, etcd3gw, against geminikv.

Both servers start fresh for this module, so their revisions are the same throughout.
etcd here is Debian's 3.4; geminikv answers as 3.5 does, and where the two differ (3.5's
"reason" in /health, the field order of error bodies) the 3.5 form is asserted literally,
as etcd 3.5 was seen to answer.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from etcd3gw.client import Etcd3Client

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.gateway_routes import dumps, http_status, to_json
from tests.certs import CA
from tests.servers import Etcd, GeminiServer, Postgres, free_port
from tests.waiting import eventually

pytestmark = [pytest.mark.etcd]


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        # the first value: etcd 3.4 sends its error bodies with an HTTP trailer after them
        return json.JSONDecoder().raw_decode(self.body.decode())[0]


@dataclass
class Servers:
    etcd: str  # base URLs
    gemini: str
    gemini_server: GeminiServer


@pytest.fixture(scope="module")
def servers(postgres: Postgres) -> Iterator[Servers]:
    if shutil.which("etcd") is None or shutil.which("curl") is None:
        pytest.skip("needs etcd (Debian etcd-server) and curl")
    port = free_port()
    gemini = GeminiServer(
        postgres.new_database("gateway"), http_listen_address=f"127.0.0.1:{port}"
    ).start()
    etcd = Etcd().start()
    try:
        yield Servers(f"http://{etcd.endpoint}", f"http://127.0.0.1:{port}", gemini)
    finally:
        etcd.stop()
        gemini.stop()


def curl(base: str, path: str, body: str | None = None, *options: str) -> Answer:
    """One request with curl: POST when there is a body, else GET."""
    argv = ["curl", "-sS", "-i", *options, base + path]
    if body is not None:
        argv += ["-X", "POST", "-d", body]
    raw = subprocess.run(argv, capture_output=True, check=True, timeout=30).stdout
    head, _, content = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return Answer(int(lines[0].split()[1]), headers.get("Content-Type", ""), content)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


DIFFERING = {"cluster_id", "member_id", "raft_term", "ID"}


def normalised(value: Any) -> Any:
    """``value`` with what differs between two clusters replaced by its presence."""
    if isinstance(value, dict):
        return {k: ("<set>" if k in DIFFERING else normalised(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v) for v in value]
    return value


def both(servers: Servers, path: str, body: str | None = None, *options: str) -> Answer:
    """The same request to etcd and to geminikv: equal status and (normalised) JSON."""
    theirs = curl(servers.etcd, path, body, *options)
    ours = curl(servers.gemini, path, body, *options)
    assert ours.status == theirs.status, (path, body, ours, theirs)
    assert ours.content_type == theirs.content_type, (path, body)
    assert normalised(ours.json()) == normalised(theirs.json()), (path, body)
    return ours


def test_kv_requests_answer_as_etcd(servers: Servers) -> None:
    key, other = b64("/gw/kv/a"), b64("/gw/kv/b")
    both(servers, "/v3/kv/put", json.dumps({"key": key, "value": b64("one")}))
    both(servers, "/v3/kv/put", json.dumps({"key": other, "value": b64("two"), "prev_kv": True}))
    ranged = both(servers, "/v3/kv/range", json.dumps({"key": key, "range_end": b64("/gw/kv/c")}))
    kvs = ranged.json()["kvs"]
    assert [base64.b64decode(kv["value"]) for kv in kvs] == [b"one", b"two"]
    assert ranged.json()["count"] == "2"  # int64 as a JSON string
    both(servers, "/v3/kv/range", json.dumps({"key": key, "keys_only": True, "limit": 1}))
    both(servers, "/v3/kv/range", json.dumps({"key": key, "count_only": True}))
    # lowerCamel names are read too; an empty body is an empty request
    both(servers, "/v3/kv/range", json.dumps({"key": key, "rangeEnd": b64("/gw/kv/c")}))
    both(servers, "/v3/kv/range", json.dumps({"key": key, "sort_order": "DESCEND"}))
    txn = {
        "compare": [{"key": key, "result": "EQUAL", "target": "VALUE", "value": b64("one")}],
        "success": [
            {"request_put": {"key": key, "value": b64("three")}},
            {"request_range": {"key": other}},
        ],
        "failure": [{"request_delete_range": {"key": key}}],
    }
    assert both(servers, "/v3/kv/txn", json.dumps(txn)).json()["succeeded"] is True
    assert "succeeded" not in both(servers, "/v3/kv/txn", json.dumps(txn)).json()
    both(servers, "/v3/kv/deleterange", json.dumps({"key": other, "prev_kv": True}))
    # etcd 3.3's prefix, still served
    both(servers, "/v3beta/kv/range", json.dumps({"key": key}))


def test_errors_are_etcds_json_bodies(servers: Servers) -> None:
    key = b64("/gw/errors")
    bad = [
        ("/v3/kv/range", {"key": ""}),
        ("/v3/kv/put", {"key": key, "value": "", "lease": "12345"}),
        ("/v3/kv/txn", {"success": [{"request_put": {"key": key}}] * 2}),
        ("/v3/kv/compaction", {"revision": "100000"}),
        ("/v3/kv/range", {"key": key, "revision": "100000"}),
        ("/v3/lease/revoke", {"ID": "777"}),
        ("/v3/kv/range", []),  # not an object: the decoder's own message
    ]
    for path, body in bad:
        answer = both(servers, path, json.dumps(body))
        error = answer.json()
        assert answer.status >= 400 and error["error"] == error["message"]
        assert answer.content_type == "application/json"
    ours = curl(servers.gemini, "/v3/kv/range", '{"key":""}')
    assert ours.status == 400  # etcd 3.5's field order
    assert ours.body == (
        b'{"error":"etcdserver: key is not provided","code":3,'
        b'"message":"etcdserver: key is not provided"}'
    )


def test_paths_and_methods_as_etcds_muxes(servers: Servers) -> None:
    for path, body in [
        ("/v3/kv/range", None),  # GET: 405
        ("/v3/kv/nothing", "{}"),
        ("/nothing", None),
        ("/v3alpha/kv/range", "{}"),  # not served since etcd 3.4
        ("/version", "{}"),  # POST: 405
    ]:
        theirs = curl(servers.etcd, path, body)
        ours = curl(servers.gemini, path, body)
        assert (ours.status, ours.content_type, ours.body) == (
            theirs.status,
            theirs.content_type,
            theirs.body,
        ), path


def test_version_and_health(servers: Servers) -> None:
    theirs, ours = curl(servers.etcd, "/version"), curl(servers.gemini, "/version")
    assert theirs.json().keys() == ours.json().keys() == {"etcdserver", "etcdcluster"}
    assert ours.body == b'{"etcdserver":"3.5.16","etcdcluster":"3.5.0"}'
    assert ours.content_type == theirs.content_type == "application/json"
    theirs, ours = curl(servers.etcd, "/health"), curl(servers.gemini, "/health")
    assert theirs.status == ours.status == 200
    assert theirs.body == b'{"health":"true"}'  # 3.4; 3.5 adds the reason
    assert ours.body == b'{"health":"true","reason":""}'
    metrics = curl(servers.gemini, "/metrics")
    assert metrics.status == 200 and metrics.content_type.startswith("text/plain")
    assert b"\ngeminikv_revision " in metrics.body


def test_etcd_35_probes(servers: Servers) -> None:
    """etcd 3.5.16's /livez and /readyz (etcd 3.4 has none), answered as its source does."""
    assert curl(servers.gemini, "/livez").body == b"ok\n"
    verbose = curl(servers.gemini, "/readyz?verbose")
    assert (verbose.status, verbose.content_type) == (200, "text/plain; charset=utf-8")
    assert verbose.body == (
        b"[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\nok\n"
    )
    assert curl(servers.gemini, "/readyz/linearizable_read?verbose").body == (
        b"[+]linearizable_read ok\nok\n"
    )
    assert curl(servers.gemini, "/readyz?exclude=data_corruption&verbose").body == (
        b"[+]serializable_read ok\n[+]linearizable_read ok\nok\n"
    )
    assert curl(servers.gemini, "/readyz", "{}").status == 405
    member = curl(servers.gemini, "/v3/maintenance/status", "{}").json()["header"]["member_id"]
    corrupt = {"memberID": member, "alarm": "CORRUPT"}
    curl(servers.gemini, "/v3/maintenance/alarm", json.dumps({"action": "ACTIVATE", **corrupt}))
    try:
        failed = curl(servers.gemini, "/readyz")
        assert failed.status == 503
        assert failed.body == (
            b"[-]data_corruption failed: alarm activated: CORRUPT\n"
            b"[+]serializable_read ok\n[+]linearizable_read ok\n\n"
        )
        assert curl(servers.gemini, "/livez").status == 200
    finally:
        body = json.dumps({"action": "DEACTIVATE", **corrupt})
        curl(servers.gemini, "/v3/maintenance/alarm", body)
    assert curl(servers.gemini, "/readyz").status == 200


def test_json_is_written_as_go_writes_it() -> None:
    """Go's encoding/json escapes <, > and & and keeps other non-ASCII text: etcd 3.4 and
    3.5 list a role named "a<b&é" as below (checked by hand: geminikv's Auth comes later)."""
    assert dumps({"roles": ["a<b&é"]}) == '{"roles":["a\\u003cb\\u0026é"]}'.encode()


def test_health_is_false_without_postgres(servers: Servers) -> None:
    """etcd answers "RAFT NO LEADER" without a leader; geminikv's leader is PostgreSQL."""
    app = servers.gemini_server.app
    assert app is not None
    reachable = app.health.primary_reachable
    app.health.primary_reachable = lambda: False
    try:
        ours = curl(servers.gemini, "/health")
        assert ours.status == 503
        assert ours.body == b'{"health":"false","reason":"RAFT NO LEADER"}\n'
        assert ours.content_type == "text/plain; charset=utf-8"
        # serializable: this member's own view, no leader needed (as etcd)
        assert curl(servers.gemini, "/health?serializable=true").status == 200
    finally:
        app.health.primary_reachable = reachable


def test_health_and_writes_under_a_nospace_alarm(servers: Servers) -> None:
    """/health is false under NOSPACE (unless excluded), and writes are refused, as etcd's."""
    members = {
        base: curl(base, "/v3/maintenance/status", "{}").json()["header"]["member_id"]
        for base in (servers.etcd, servers.gemini)
    }

    def alarm(action: str) -> None:
        for base, member in members.items():
            body = {"action": action, "memberID": member, "alarm": "NOSPACE"}
            assert curl(base, "/v3/maintenance/alarm", json.dumps(body)).status == 200

    alarm("ACTIVATE")
    try:
        for base, member in members.items():  # (etcd 3.4 answers Alarm without a header)
            listed = curl(base, "/v3/maintenance/alarm", '{"action":"GET"}').json()["alarms"]
            assert listed == [{"memberID": member, "alarm": "NOSPACE"}]
        theirs, ours = curl(servers.etcd, "/health"), curl(servers.gemini, "/health")
        assert theirs.status == ours.status == 503
        assert theirs.body == b'{"health":"false"}\n'  # 3.4 keeps the reason to itself
        assert ours.body == b'{"health":"false","reason":"ALARM NOSPACE"}\n'
        excluded = [curl(b, "/health?exclude=NOSPACE") for b in (servers.etcd, servers.gemini)]
        assert [a.status for a in excluded] == [200, 200]
        refused = both(servers, "/v3/kv/put", json.dumps({"key": b64("/gw/full")}))
        assert refused.json()["message"] == "etcdserver: mvcc: database space exceeded"
    finally:
        alarm("DEACTIVATE")
    assert curl(servers.gemini, "/health").status == 200


def test_lease_requests_answer_as_etcd(servers: Servers) -> None:
    granted = both(servers, "/v3/lease/grant", '{"TTL":60}')
    assert granted.json()["TTL"] == "60"
    ids = {
        base: curl(base, "/v3/lease/grant", '{"TTL":60}').json()["ID"]
        for base in (servers.etcd, servers.gemini)
    }
    key = b64("/gw/lease")
    for path, body in [
        ("/v3/kv/put", '{"key":"%s","lease":"%s"}'),
        ("/v3/lease/keepalive", '{"ID":"%s"}'),
        ("/v3/lease/revoke", '{"ID":"%s"}'),
        ("/v3/kv/lease/revoke", '{"ID":"%s"}'),  # etcd's second binding: now not found
        ("/v3/lease/keepalive", '{"ID":"%s"}'),  # a lease gone: TTL 0, left out
    ]:
        answers = []
        for base, lease in ids.items():
            text = body % (key, lease) if "key" in body else body % lease
            answers.append(curl(base, path, text))
        theirs, ours = answers
        assert ours.status == theirs.status, path
        if path == "/v3/lease/keepalive":  # a stream: one line per answer
            assert ours.body.endswith(b"}\n") and ours.body.count(b"\n") == 1
        assert normalised(ours.json()) == normalised(theirs.json()), path
    leases = both(servers, "/v3/lease/leases", "{}").json()
    assert "leases" in leases
    both(servers, "/v3/lease/timetolive", '{"ID":"424242"}')  # unknown: TTL -1


def _watch(base: str, body: str) -> tuple[subprocess.Popen[bytes], list[bytes]]:
    """curl streaming a watch; its lines as they come."""
    process = subprocess.Popen(
        ["curl", "-sN", "-X", "POST", base + "/v3/watch", "-d", body], stdout=subprocess.PIPE
    )
    lines: list[bytes] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return process, lines


def _has(lines: list[bytes], count: int) -> Callable[[], bool]:
    return lambda: len(lines) >= count


def _same_watch_lines(
    servers: Servers, body: str, count: int, during: Callable[[], None] = lambda: None
) -> list[bytes]:
    """One streamed watch on each server, ``during`` run once both are created; the
    ``count`` lines each streamed must be the same, up to ids. Returns geminikv's."""
    streams = {base: _watch(base, body) for base in (servers.etcd, servers.gemini)}
    try:
        for _, lines in streams.values():
            eventually(_has(lines, 1), "the watch created", 10, 0.05)
        during()
        for _, lines in streams.values():
            eventually(_has(lines, count), f"{count} lines", 10, 0.05)
    finally:
        for process, _ in streams.values():
            process.terminate()
            process.wait(10)
    (_, theirs), (_, ours) = streams.values()
    assert [normalised(json.loads(line)) for line in ours] == [
        normalised(json.loads(line)) for line in theirs
    ]
    return ours


def test_a_streamed_watch_receives_events_as_from_etcd(servers: Servers) -> None:
    key = b64("/gw/watched")
    body = json.dumps({"create_request": {"key": key, "prev_kv": True}})

    def writes() -> None:
        both(servers, "/v3/kv/put", json.dumps({"key": key, "value": b64("v1")}))
        both(servers, "/v3/kv/put", json.dumps({"key": key, "value": b64("v2")}))
        both(servers, "/v3/kv/deleterange", json.dumps({"key": key}))

    ours = _same_watch_lines(servers, body, 4, writes)
    assert json.loads(ours[0])["result"]["created"] is True
    events = [json.loads(line)["result"]["events"][0] for line in ours[1:]]
    assert [e.get("type", "PUT") for e in events] == ["PUT", "PUT", "DELETE"]
    assert base64.b64decode(events[1]["prev_kv"]["value"]) == b"v1"


def test_a_watch_etcd_cancels_and_a_keepalive_of_lease_zero(servers: Servers) -> None:
    body = json.dumps({"create_request": {"key": b64("/gw/x"), "start_revision": "-5"}})
    ours = _same_watch_lines(servers, body, 2)
    assert json.loads(ours[1])["result"]["canceled"] is True
    both(servers, "/v3/lease/keepalive", '{"ID":"0"}')


def _watch_streams(servers: Servers) -> float:
    metrics = curl(servers.gemini, "/metrics").body.decode()
    return float(re.search(r"^geminikv_watch_streams (\S+)$", metrics, re.M)[1])  # type: ignore[index]


def test_a_client_that_goes_away_ends_its_watch(servers: Servers) -> None:
    before = _watch_streams(servers)
    process, lines = _watch(servers.gemini, json.dumps({"create_request": {"key": b64("/gw")}}))
    try:
        eventually(_has(lines, 1), "the watch created", 10, 0.05)
        assert _watch_streams(servers) == before + 1
    finally:
        process.terminate()
        process.wait(10)
    eventually(lambda: _watch_streams(servers) == before, "the gRPC watch stream ended", 10)


def test_a_body_cut_short(servers: Servers) -> None:
    """The decoder's "unexpected EOF": 400 where one request is read (server streams too),
    500 (Unknown) for a client stream."""
    for path in ("/v3/kv/range", "/v3/watch", "/v3/maintenance/snapshot"):
        both(servers, path, '{"key":"Zm9v"')


def test_a_keepalive_body_of_several_requests_or_none(servers: Servers) -> None:
    answers = []
    for base in (servers.etcd, servers.gemini):
        lease = curl(base, "/v3/lease/grant", '{"TTL":60}').json()["ID"]
        answer = curl(base, "/v3/lease/keepalive", " ".join([json.dumps({"ID": lease})] * 2))
        lines = [json.loads(line)["result"] for line in answer.body.splitlines()]
        # a bad request after a good one ends the requests, not the answers
        cut = curl(base, "/v3/lease/keepalive", json.dumps({"ID": lease}) + ' {"ID":"x"}')
        cut_lines = [json.loads(line)["result"] for line in cut.body.splitlines()]
        answers.append((answer.status, normalised(lines), cut.status, normalised(cut_lines)))
    assert answers[0] == answers[1]
    assert len(answers[1][1]) == 2 and len(answers[1][3]) == 1
    empty = [curl(base, "/v3/lease/keepalive", "") for base in (servers.etcd, servers.gemini)]
    assert [(a.status, a.content_type, a.body) for a in empty] == [
        (200, "application/json", b"")
    ] * 2


def test_snapshot_streams_the_database(servers: Servers) -> None:
    answer = curl(servers.gemini, "/v3/maintenance/snapshot", "{}")
    assert answer.status == 200
    chunks = [json.loads(line)["result"] for line in answer.body.splitlines()]
    assert chunks and all("blob" in chunk for chunk in chunks)
    assert "remaining_bytes" not in chunks[-1]  # 0 on the last chunk: left out
    theirs = curl(servers.etcd, "/v3/maintenance/snapshot", "{}")
    first = json.loads(theirs.body.splitlines()[0])["result"]
    # etcd 3.5.16 (geminikv's) heads the first chunk with a header; 3.4 does not
    assert first.keys() | {"header"} == chunks[0].keys() | {"header"}


def test_etcd3gw_against_geminikv(servers: Servers) -> None:
    """OpenStack's client (etcd3gw 2.7.0): the same calls give the same results on both."""
    results = [_etcd3gw_session(base) for base in (servers.etcd, servers.gemini)]
    assert results[0] == results[1]
    assert results[1]["get"] == [b"value"]


def _etcd3gw_session(base: str) -> dict[str, Any]:
    host, port = base.removeprefix("http://").split(":")
    client = Etcd3Client(host=host, port=int(port), timeout=10)
    out: dict[str, Any] = {}
    events: list[Any] = []
    iterator, cancel = client.watch_prefix("/gw3/")
    watcher = threading.Thread(target=lambda: events.extend(_first(iterator, 3)), daemon=True)
    watcher.start()
    out["put"] = client.put("/gw3/key", "value")
    out["get"] = client.get("/gw3/key")
    lease = client.lease(ttl=60)
    out["lease_ttl"] = lease.ttl() > 50
    out["refresh"] = lease.refresh() == 60
    out["put_leased"] = client.put("/gw3/leased", "v", lease=lease)
    out["lease_keys"] = lease.keys()
    out["revoke"] = lease.revoke()
    out["after_revoke"] = client.get("/gw3/leased")
    out["delete"] = client.delete("/gw3/key")
    out["delete_again"] = client.delete("/gw3/key")
    out["status_keys"] = sorted(client.status().keys())
    watcher.join(10)
    cancel()
    out["events"] = [(e.get("type", "PUT"), e["kv"]["key"]) for e in events]
    return out


def _first(iterator: Iterator[Any], count: int) -> list[Any]:
    found = []
    for event in iterator:
        found.append(event)
        if len(found) == count:
            break
    return found


def test_https_with_client_certificates_as_on_the_etcd_endpoint(
    postgres: Postgres, tmp_path: Path
) -> None:
    """With TLS on the etcd endpoint the HTTP endpoints are HTTPS with the same certificate,
    and a trusted CA makes client certificates mandatory there too (as etcd's client URL)."""
    ca, other = CA("gateway-ca"), CA("other-ca")
    server_cert, server_key = ca.issue(tmp_path, "server", server=True)
    client_cert, client_key = ca.issue(tmp_path, "client", server=False)
    wrong_cert, wrong_key = other.issue(tmp_path, "wrong", server=False)
    ca_file = ca.write(tmp_path, "ca")
    port = free_port()
    server = GeminiServer(
        postgres.new_database("gateway_tls"),
        http_listen_address=f"127.0.0.1:{port}",
        server_cert_file=str(server_cert),
        server_key_file=str(server_key),
        trusted_ca_file=str(ca_file),
    ).start()
    base = f"https://127.0.0.1:{port}"
    trust = ("--cacert", str(ca_file))
    try:
        put = curl(
            base,
            "/v3/kv/put",
            '{"key":"YQ==","value":"MQ=="}',
            *trust,
            *_pair(client_cert, client_key),
        )
        assert put.status == 200 and put.json()["header"]["revision"] == "2"
        got = curl(base, "/v3/kv/range", '{"key":"YQ=="}', *trust, *_pair(client_cert, client_key))
        assert base64.b64decode(got.json()["kvs"][0]["value"]) == b"1"
        for refused in ((), _pair(wrong_cert, wrong_key)):
            done = subprocess.run(
                ["curl", "-s", *trust, *refused, base + "/version"], capture_output=True, timeout=30
            )
            assert done.returncode != 0 and not done.stdout  # the handshake fails
    finally:
        server.stop()


def _pair(cert: Path, key: Path) -> tuple[str, ...]:
    return ("--cert", str(cert), "--key", str(key))


def test_auth_routes_answer_what_grpc_answers(servers: Servers) -> None:
    """/v3/auth/* only forwards: its answer is the Auth service's over gRPC, error or not
    (the token from the Authorization header, as etcd's gateway passes it)."""
    stubs = servers.gemini_server.stubs()
    auth = rpc_pb2_grpc.AuthStub(stubs.channel)
    try:
        for path, method, request in [
            ("/v3/auth/status", auth.AuthStatus, pb.AuthStatusRequest()),
            ("/v3/auth/user/list", auth.UserList, pb.AuthUserListRequest()),
        ]:
            answer = curl(servers.gemini, path, "{}", "-H", "Authorization: not-a-token")
            try:
                reply = method(request, metadata=[("token", "not-a-token")])
            except grpc.RpcError as err:
                assert answer.status == http_status(err.code())
                assert answer.json() == {
                    "error": err.details(),
                    "code": err.code().value[0],
                    "message": err.details(),
                }
            else:
                assert answer.status == 200
                assert normalised(answer.json()) == normalised(to_json(reply))
    finally:
        stubs.close()
