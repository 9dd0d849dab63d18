"""Logging: one line per event in both formats, tracebacks included on that line."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

import orjson
import pytest

from geminikv import log
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiProcess, Postgres

PLAIN_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: "
)


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """What ``log.setup``'s handler writes (to sys.stderr, which capsys holds during the
    test); the root logger (pytest's own handlers) restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    asyncio_level = logging.getLogger("asyncio").level
    yield lambda: capsys.readouterr().err
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(asyncio_level)


def _fail() -> None:
    raise ValueError("broken\nsecond line")


def _log_failure() -> None:
    try:
        _fail()
    except ValueError:
        logging.getLogger("geminikv.test").exception("it failed: %s", "why")


def test_plain_puts_the_traceback_on_the_line(stderr: Callable[[], str]) -> None:
    log.setup("plain")
    _log_failure()
    text = stderr()
    assert text.count("\n") == 1 and text.endswith("\n"), text
    assert PLAIN_LINE.match(text), text
    assert "ERROR geminikv.test: it failed: why\\nTraceback (most recent call last):" in text
    assert "in _fail\\n" in text
    assert text.rstrip("\n").endswith("ValueError: broken\\nsecond line")


def test_json_puts_the_traceback_in_a_field(stderr: Callable[[], str]) -> None:
    log.setup("json")
    _log_failure()
    text = stderr()
    assert text.count("\n") == 1 and text.endswith("\n"), text
    entry = orjson.loads(text)
    assert entry["level"] == "error"
    assert entry["logger"] == "geminikv.test"
    assert entry["msg"] == "it failed: why"
    assert entry["error"].startswith("Traceback (most recent call last):\n")
    assert "in _fail\n" in entry["error"]
    assert entry["error"].endswith("ValueError: broken\nsecond line")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_multiline_messages_and_stacks_stay_on_one_line(
    stderr: Callable[[], str], fmt: str
) -> None:
    log.setup(fmt)
    logging.getLogger("geminikv.test").warning("first\nsecond", stack_info=True)
    logging.getLogger("geminikv.test").debug("not shown without --debug")
    lines = stderr().splitlines()
    assert len(lines) == 1, lines
    if fmt == "json":
        entry = orjson.loads(lines[0])
        assert entry["msg"] == "first\nsecond"
        assert entry["stack"].startswith("Stack (most recent call last):\n")
    else:
        assert "WARNING geminikv.test: first\\nsecond\\nStack (most recent call last):" in lines[0]


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_a_real_server_logs_one_line_per_event(postgres: Postgres, fmt: str) -> None:
    server = GeminiProcess(postgres.new_database("log"), "--log-format", fmt).start()
    try:
        stubs = server.stubs()
        stubs.kv.Put(pb.PutRequest(key=b"/log/a", value=b"v"))
        stubs.close()
    finally:
        server.stop()
    lines = server.output().splitlines()
    messages = []
    for line in lines:
        if fmt == "json":
            entry = orjson.loads(line)
            assert isinstance(entry, dict), line
            assert {"time", "level", "logger", "msg"} <= entry.keys(), line
            messages.append(entry["msg"])
        else:
            assert PLAIN_LINE.match(line), line
            messages.append(line)
    assert any("geminikv serving etcd v3" in m for m in messages), lines
    assert any("shutting down" in m for m in messages), lines
