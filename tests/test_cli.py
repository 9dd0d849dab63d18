"""The command line: Kine's flags and value syntax, GEMINIKV_* variables, --help against
the README's flag table, --version, and bad values (exit code 2). No database needed."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

import pytest

from geminikv import __version__
from geminikv.cli import BENCH_MODULES, main
from geminikv.config import UNLIMITED_CONNECTIONS, Settings, no_effect, parse_settings

ROOT = Path(__file__).resolve().parent.parent

# Every flag of Kine's pkg/app/app.go (Kine's own reference, not geminikv's parser).
KINE_FLAGS = [
    "--listen-address",
    "--endpoint",
    "--ca-file",
    "--cert-file",
    "--key-file",
    "--skip-verify",
    "--server-cert-file",
    "--server-key-file",
    "--trusted-ca-file",
    "--metrics-bind-address",
    "--metrics-enable-profiling",
    "--metrics-ignore-tls-config",
    "--slow-sql-threshold",
    "--slow-sql-warning-threshold",
    "--datastore-max-idle-connections",
    "--datastore-max-open-connections",
    "--datastore-connection-max-lifetime",
    "--datastore-connection-max-idle-time",
    "--watch-progress-notify-interval",
    "--emulated-etcd-version",
    "--compact-interval",
    "--compact-interval-jitter",
    "--compact-timeout",
    "--compact-min-retain",
    "--compact-batch-size",
    "--poll-batch-size",
    "--log-format",
    "--debug",
]


def _geminikv(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command, from this checkout (``python -m geminikv`` runs cli.main)."""
    return subprocess.run(
        [sys.executable, "-m", "geminikv", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _readme_flags() -> list[str]:
    """The flags in the first column of README.md's flag table (## Configuration)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `-")]
    flags = [flag for row in rows for flag in re.findall(r"`(--?[a-z][a-z-]*)`", row.split("|")[1])]
    assert len(flags) > 30, flags  # the table was found and parsed
    return flags


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "GEMINIKV_" + name.upper()


def _sample(name: str, kind: str) -> tuple[str, Any]:
    """A value other than the default, as text and as the setting it gives."""
    special: dict[str, tuple[str, Any]] = {
        "log_format": ("json", "json"),
        "compact_interval_jitter": ("7", 7),
        "auth_token": ("jwt,sign-method=HS256,priv-key=k", "jwt,sign-method=HS256,priv-key=k"),
    }
    if name in special:
        return special[name]
    return {
        "str": ("some-text", "some-text"),
        "int": ("7", 7),
        "float": ("7s", 7.0),
        "bool": ("true", True),
    }[kind]


def test_version() -> None:
    for flag in ("--version", "-v"):
        done = _geminikv(flag)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"geminikv {__version__}\n"


def test_help_documents_every_flag_in_the_readme_table() -> None:
    done = _geminikv("--help")
    assert done.returncode == 0, done.stderr
    documented = set(re.findall(r"(?<![\w-])--?[a-z][a-z-]*", done.stdout))
    missing = [flag for flag in _readme_flags() if flag not in documented]
    assert not missing, f"in README's table but not in --help: {missing}"


def test_readme_table_has_every_setting() -> None:
    readme = set(_readme_flags())
    missing = [_flag(f.name) for f in fields(Settings) if _flag(f.name) not in readme]
    assert not missing, f"settings missing from README's flag table: {missing}"


def test_every_kine_flag_is_accepted_and_documented() -> None:
    readme = set(_readme_flags())
    assert [flag for flag in KINE_FLAGS if flag not in readme] == []
    settings = {_flag(f.name) for f in fields(Settings)}
    assert [flag for flag in KINE_FLAGS if flag not in settings] == []


@pytest.mark.parametrize("field", fields(Settings), ids=lambda f: f.name)
def test_each_flag_is_settable_from_the_environment(field: Field[Any]) -> None:
    text, value = _sample(field.name, str(field.type))
    assert value != field.default
    from_env = parse_settings([], {_env(field.name): text})
    assert getattr(from_env, field.name) == value
    assert from_env == Settings(**{field.name: value})  # and nothing else changed
    from_flag = parse_settings([f"{_flag(field.name)}={text}"], {})
    assert getattr(from_flag, field.name) == value


def test_command_line_wins_over_the_environment() -> None:
    env = {
        "GEMINIKV_ENDPOINT": "postgres://env/db",
        "GEMINIKV_COMPACT_INTERVAL": "1m",
        "GEMINIKV_DEBUG": "true",
        "GEMINIKV_POLL_BATCH_SIZE": "300",
        "GEMINIKV_SLOW_SQL_THRESHOLD": "3s",
    }
    settings = parse_settings(
        ["--endpoint", "postgres://flag/db", "--compact-interval=10s", "--debug=false"], env
    )
    assert settings.endpoint == "postgres://flag/db"
    assert settings.compact_interval == 10.0
    assert settings.debug is False
    # the rest still comes from the environment
    assert settings.poll_batch_size == 300
    assert settings.slow_sql_threshold == 3.0


def test_defaults_without_flags_or_environment() -> None:
    assert parse_settings([], {}) == Settings()
    assert parse_settings([], {"UNRELATED": "x", "KINE_ENDPOINT": "y"}) == Settings()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300.0),
        ("10s", 10.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("2h45m", 9900.0),
        ("100ms", 0.1),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("1000000ns", 0.001),
        ("+5s", 5.0),
        ("0", 0.0),
        ("2", 2.0),  # a bare number is seconds (an extension; Go wants a unit)
    ],
)
def test_durations_parse_as_go_durations(text: str, seconds: float) -> None:
    settings = parse_settings([f"--compact-timeout={text}"], {})
    assert settings.compact_timeout == pytest.approx(seconds)
    from_env = parse_settings([], {"GEMINIKV_WATCH_PROGRESS_NOTIFY_INTERVAL": text})
    assert from_env.watch_progress_notify_interval == pytest.approx(seconds)


def test_zero_or_less_means_off_where_kine_says_so() -> None:
    settings = parse_settings(
        [
            "--slow-sql-threshold=-1s",
            "--slow-sql-warning-threshold=0",
            "--compact-interval=-5m",
            "--datastore-connection-max-lifetime=-1h",
        ],
        {},
    )
    assert settings.slow_sql_threshold == 0.0
    assert settings.slow_sql_warning_threshold == 0.0
    assert settings.compact_interval == 0.0
    assert settings.datastore_connection_max_lifetime == 0.0


@pytest.mark.parametrize(
    ("given", "pool"),
    [("0", UNLIMITED_CONNECTIONS), ("-1", UNLIMITED_CONNECTIONS), ("1", 1), ("25", 25)],
)
def test_max_open_connections_zero_or_less_is_unlimited(given: str, pool: int) -> None:
    assert (
        parse_settings(
            ["--datastore-max-open-connections", given], {}
        ).datastore_max_open_connections
        == pool
    )
    from_env = parse_settings([], {"GEMINIKV_DATASTORE_MAX_OPEN_CONNECTIONS": given})
    assert from_env.datastore_max_open_connections == pool
    assert Settings().datastore_max_open_connections < UNLIMITED_CONNECTIONS


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--compact-timeout", "5 minutes"], "--compact-timeout: invalid duration '5 minutes'"),
        (["--watch-progress-notify-interval=-1s"], "must not be negative"),
        (["--slow-sql-threshold", "1d"], "invalid duration '1d'"),
        (["--compact-interval-jitter", "100"], "--compact-interval-jitter: invalid percentage"),
        (["--compact-interval-jitter=-1"], "invalid percentage '-1'"),
        (["--poll-batch-size", "0"], "--poll-batch-size: invalid value '0'"),
        (["--datastore-max-open-connections", "many"], "invalid integer 'many'"),
        (["--log-format", "xml"], "--log-format: invalid log format 'xml'"),
        (["--debug=maybe"], "--debug: invalid boolean 'maybe'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_bad_value_is_a_clear_error_with_exit_code_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv, {})
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "value", "says", "flag"),
    [
        ("GEMINIKV_COMPACT_TIMEOUT", "soon", "invalid duration 'soon'", "--compact-timeout=1s"),
        ("GEMINIKV_DEBUG", "ture", "invalid boolean 'ture'", "--debug"),
        ("GEMINIKV_COMPACT_MIN_RETAIN", "1k", "invalid integer '1k'", "--compact-min-retain=1"),
    ],
)
def test_a_bad_environment_value_names_the_variable(
    name: str, value: str, says: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings([], {name: value})
    assert exited.value.code == 2
    assert f"{name}: {says}" in capsys.readouterr().err
    # the command line overrides a bad variable, as it does a good one
    parse_settings([flag], {name: value})


def test_the_command_exits_2_on_a_bad_value() -> None:
    done = _geminikv("--compact-timeout", "soon")
    assert done.returncode == 2
    assert "argument --compact-timeout: invalid duration 'soon'" in done.stderr
    assert done.stdout == ""


def test_a_full_kine_command_line_parses() -> None:
    argv = [
        "--listen-address=0.0.0.0:2379",
        "--endpoint=postgres://kine:secret@db:5432/kine?sslmode=verify-full",
        "--ca-file=/etc/kine/db-ca.crt",
        "--cert-file",
        "/etc/kine/db.crt",
        "--key-file=/etc/kine/db.key",
        "--skip-verify=false",
        "--server-cert-file=/etc/kine/server.crt",
        "--server-key-file=/etc/kine/server.key",
        "--trusted-ca-file=/etc/kine/ca.crt",
        "--metrics-bind-address=:9090",
        "--metrics-enable-profiling",
        "--metrics-ignore-tls-config=true",
        "--slow-sql-threshold=2s",
        "--slow-sql-warning-threshold",
        "10s",
        "--datastore-max-idle-connections=5",
        "--datastore-max-open-connections=0",
        "--datastore-connection-max-lifetime=1h",
        "--datastore-connection-max-idle-time=30s",
        "--watch-progress-notify-interval=10s",
        "--emulated-etcd-version=3.6.11",
        "--compact-interval=5m",
        "--compact-interval-jitter=10",
        "--compact-timeout=10s",
        "--compact-min-retain=2000",
        "--compact-batch-size=500",
        "--poll-batch-size=500",
        "--log-format=json",
        "--debug",
    ]
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    assert given == set(KINE_FLAGS)  # the line really has every Kine flag
    # a GEMINIKV_* variable for one of them is overridden by the command line
    s = parse_settings(argv, {"GEMINIKV_LOG_FORMAT": "plain"})
    assert s == Settings(
        listen_address="0.0.0.0:2379",
        endpoint="postgres://kine:secret@db:5432/kine?sslmode=verify-full",
        ca_file="/etc/kine/db-ca.crt",
        cert_file="/etc/kine/db.crt",
        key_file="/etc/kine/db.key",
        skip_verify=False,
        server_cert_file="/etc/kine/server.crt",
        server_key_file="/etc/kine/server.key",
        trusted_ca_file="/etc/kine/ca.crt",
        metrics_bind_address=":9090",
        metrics_enable_profiling=True,
        metrics_ignore_tls_config=True,
        slow_sql_threshold=2.0,
        slow_sql_warning_threshold=10.0,
        datastore_max_idle_connections=5,
        datastore_max_open_connections=UNLIMITED_CONNECTIONS,
        datastore_connection_max_lifetime=3600.0,
        datastore_connection_max_idle_time=30.0,
        watch_progress_notify_interval=10.0,
        emulated_etcd_version="3.6.11",
        compact_interval=300.0,
        compact_interval_jitter=10,
        compact_timeout=10.0,
        compact_min_retain=2000,
        compact_batch_size=500,
        poll_batch_size=500,
        log_format="json",
        debug=True,
    )


def test_flags_without_effect_are_reported_once_each() -> None:
    assert no_effect(Settings()) == []
    argv = ["--metrics-enable-profiling", "--compact-interval-jitter=9", "--poll-batch-size=9"]
    lines = no_effect(parse_settings(argv, {}))
    assert len(lines) == 2  # the poll batch size has an effect
    assert lines[0].startswith("--compact-interval-jitter is accepted for Kine compatibility")
    assert lines[1].startswith("--metrics-enable-profiling is accepted for Kine compatibility")


def test_the_command_logs_a_flag_without_effect_at_start_up() -> None:
    # an invalid listen address stops the server before it touches PostgreSQL
    done = _geminikv("--metrics-enable-profiling", "--listen-address", "nowhere")
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if "--metrics-enable-profiling" in line]
    assert len(lines) == 1 and "WARNING" in lines[0] and "no effect" in lines[0], done.stderr
    assert "invalid listen address" in done.stderr


# -- geminikv bench: the harness is the optional `bench` extra ---------------------------


def test_bench_names_the_extra_when_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if never installed
    assert main(["bench", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "(missing: matplotlib)" in err
    assert "pip install 'geminikv[bench]'" in err


def test_bench_modules_are_the_bench_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["bench"]
    assert sorted(re.split(r"[<>=!~ ;\[]", req)[0] for req in extra) == sorted(BENCH_MODULES)
    assert not set(BENCH_MODULES) & {
        re.split(r"[<>=!~ ;\[]", r)[0] for r in project["dependencies"]
    }


def test_bench_runs_from_any_directory(tmp_path: Path) -> None:
    """The installed harness (geminikv_bench), not this checkout's benchmarks/ directory."""
    done = subprocess.run(
        [sys.executable, "-m", "geminikv", "bench", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: geminikv bench")
