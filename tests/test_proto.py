"""Tests for the etcd v3.5 gRPC wire contract (proto/ and geminikv/proto/)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]
from google.protobuf.message import Message  # type: ignore[import-untyped]

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from geminikv.proto.authpb import auth_pb2  # noqa: E402
from geminikv.proto.etcdserverpb import rpc_pb2, rpc_pb2_grpc  # noqa: E402
from geminikv.proto.mvccpb import kv_pb2  # noqa: E402

GENERATED_DIR = REPO_ROOT / "geminikv" / "proto"
GENERATE_SCRIPT = REPO_ROOT / "proto" / "generate.py"
CONSTRAINTS = REPO_ROOT / "constraints.txt"

DEBIAN_ETCD = Path("/usr/share/gocode/src/go.etcd.io/etcd")
# Debian (etcd 3.4) source path -> path under our proto root.
DEBIAN_PROTOS: dict[str, str] = {
    "mvcc/mvccpb/kv.proto": "mvccpb/kv.proto",
    "auth/authpb/auth.proto": "authpb/auth.proto",
    "etcdserver/etcdserverpb/rpc.proto": "etcdserverpb/rpc.proto",
}
DEBIAN_IMPORT_MAP: dict[str, str] = {
    "etcd/mvcc/mvccpb/kv.proto": "mvccpb/kv.proto",
    "etcd/auth/authpb/auth.proto": "authpb/auth.proto",
}


def _files_under(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text(encoding="utf-8")
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".pyi")
    }


# The generator stamps its own version into the code; everything else must match exactly.
_VERSION_STAMPS = (
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE),
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.\w+,)[^)]*\)"),
)
_GRPC_METHOD = re.compile(r"channel\.(\w+)\(\s*'(/[\w.]+/\w+)'")
_GRPC_HANDLER = re.compile(r"'(\w+)': grpc\.(\w+)_rpc_method_handler\(")


def _without_version_stamps(text: str) -> str:
    for stamp in _VERSION_STAMPS:
        text = stamp.sub(lambda m: m.group(1) if m.groups() else "", text)
    return text


def _serialized_descriptor(source: str) -> bytes:
    """The FileDescriptorProto a _pb2 module registers: every message, field, enum, service."""
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            arg = node.args[0]
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, bytes)
            return arg.value
    raise AssertionError("no AddSerializedFile call in a _pb2 module")


def _grpc_methods(source: str) -> set[tuple[str, str]]:
    """(kind, name) of every stub method and every servicer handler of a _grpc module."""
    return {(kind, path) for kind, path in _GRPC_METHOD.findall(source)} | {
        (kind, name) for name, kind in _GRPC_HANDLER.findall(source)
    }


def _pinned(package: str) -> str:
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in {CONSTRAINTS.name}")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("generated") / "out"
    subprocess.run(
        [sys.executable, str(GENERATE_SCRIPT), str(out)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )
    fresh = _files_under(out)
    assert "etcdserverpb/rpc_pb2.py" in fresh
    assert "etcdserverpb/rpc_pb2_grpc.py" in fresh
    return fresh


def _regenerate_hint() -> str:
    return (
        "the bindings are built by setup.py with the grpcio-tools pinned in pyproject.toml's "
        "[build-system]; rebuild them: pip install -c constraints.txt -e '.[test,dev]'"
    )


def test_generated_messages_and_services_match_the_protos(regenerated: dict[str, str]) -> None:
    built = _files_under(GENERATED_DIR)
    assert sorted(regenerated) == sorted(built), (
        f"set of generated files differs; {_regenerate_hint()}"
    )
    for name, fresh in regenerated.items():
        if name.endswith("_pb2.py"):
            same = _serialized_descriptor(fresh) == _serialized_descriptor(built[name])
            assert same, f"{name}: messages, fields or services differ; {_regenerate_hint()}"
        elif name.endswith("_grpc.py"):
            same = _grpc_methods(fresh) == _grpc_methods(built[name])
            assert same, f"{name}: service methods differ; {_regenerate_hint()}"


def test_generated_code_is_current(regenerated: dict[str, str]) -> None:
    built = _files_under(GENERATED_DIR)
    stale = [
        name
        for name, fresh in regenerated.items()
        if _without_version_stamps(fresh) != _without_version_stamps(built.get(name, ""))
    ]
    assert not stale, f"generated code is stale: {stale}; {_regenerate_hint()}"


def test_generated_with_the_pinned_generator() -> None:
    """The build's generator is the one constraints.txt pins, the built code carries its
    stamp, and the runtime floors in pyproject.toml are the ones that code demands (it
    refuses to import below them)."""
    pinned = _pinned("grpcio-tools")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert f"grpcio-tools=={pinned}" in project["build-system"]["requires"]
    for path in sorted(GENERATED_DIR.rglob("*_pb2_grpc.py")):
        stamp = f"GRPC_GENERATED_VERSION = '{pinned}'"
        assert stamp in path.read_text(encoding="utf-8"), f"{path.name}: {_regenerate_hint()}"
    pb2_code = (GENERATED_DIR / "etcdserverpb" / "rpc_pb2.py").read_text(encoding="utf-8")
    gencode = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)$", pb2_code, re.MULTILINE)
    assert gencode is not None
    dependencies = project["project"]["dependencies"]
    assert f"grpcio>={pinned}" in dependencies
    major = int(gencode.group(1))
    assert f"protobuf>={'.'.join(gencode.groups())},<{major + 1}" in dependencies


def test_no_gogoproto_or_http_annotations() -> None:
    for name in DEBIAN_PROTOS.values():
        text = (REPO_ROOT / "proto" / name).read_text(encoding="utf-8")
        assert "gogoproto" not in text
        assert "google.api" not in text and "google/api" not in text


def test_generated_imports_are_package_relative() -> None:
    bad = re.compile(r"^\s*(from|import) (mvccpb|authpb|etcdserverpb)\b", re.MULTILINE)
    for path in GENERATED_DIR.rglob("*.py*"):
        if "__pycache__" in path.parts:
            continue
        assert not bad.search(path.read_text(encoding="utf-8")), path


def test_grpc_module_exposes_servicers() -> None:
    assert rpc_pb2.DESCRIPTOR.package == "etcdserverpb"
    assert kv_pb2.DESCRIPTOR.package == "mvccpb"
    assert auth_pb2.DESCRIPTOR.package == "authpb"
    for service in ("KV", "Watch", "Lease", "Cluster", "Maintenance", "Auth"):
        assert callable(getattr(rpc_pb2_grpc, f"add_{service}Servicer_to_server"))
        assert hasattr(rpc_pb2_grpc, f"{service}Stub")
        assert hasattr(rpc_pb2_grpc, f"{service}Servicer")
    assert set(rpc_pb2.DESCRIPTOR.services_by_name) == {
        "KV",
        "Watch",
        "Lease",
        "Cluster",
        "Maintenance",
        "Auth",
    }


def test_etcd_35_additions_present() -> None:
    services = rpc_pb2.DESCRIPTOR.services_by_name
    assert "Downgrade" in services["Maintenance"].methods_by_name
    assert "AuthStatus" in services["Auth"].methods_by_name
    assert "MemberPromote" in services["Cluster"].methods_by_name
    assert "LeaseLeases" in services["Lease"].methods_by_name

    def num(msg: type[Message], field: str) -> int:
        number: int = msg.DESCRIPTOR.fields_by_name[field].number
        return number

    assert num(rpc_pb2.StatusResponse, "dbSizeInUse") == 9
    assert num(rpc_pb2.StatusResponse, "isLearner") == 10
    assert num(rpc_pb2.MemberListRequest, "linearizable") == 1
    assert num(rpc_pb2.AuthUserAddRequest, "hashedPassword") == 4
    assert num(rpc_pb2.AuthUserChangePasswordRequest, "hashedPassword") == 3
    assert num(rpc_pb2.AuthStatusResponse, "enabled") == 2
    assert num(rpc_pb2.AuthStatusResponse, "authRevision") == 3
    assert num(rpc_pb2.DowngradeRequest, "action") == 1
    assert num(rpc_pb2.DowngradeRequest, "version") == 2
    assert num(rpc_pb2.DowngradeResponse, "version") == 2
    assert rpc_pb2.DowngradeRequest.DowngradeAction.Value("CANCEL") == 2
    assert num(rpc_pb2.WatchCreateRequest, "fragment") == 8
    assert num(rpc_pb2.WatchResponse, "fragment") == 7
    assert num(auth_pb2.User, "options") == 4
    assert num(auth_pb2.UserAddOptions, "no_password") == 1
    # Round-trip through the wire format.
    req = rpc_pb2.RangeRequest(key=b"a", range_end=b"b", sort_order=rpc_pb2.RangeRequest.DESCEND)
    assert rpc_pb2.RangeRequest.FromString(req.SerializeToString()) == req


# --- comparison against Debian's etcd 3.4 protos ---------------------------


def _strip_debian_proto(text: str) -> str:
    """Remove gogoproto / google.api annotations and rewrite imports."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'import\s+"(gogoproto|google/api)/[^"]*";', "", text)
    text = re.sub(r"option\s+\(gogoproto\.[^;]*;", "", text)
    text = re.sub(r"\s*\[\s*\(gogoproto\.[^\]]*\]", "", text)
    text = re.sub(r"option\s+\(google\.api\.http\)\s*=\s*\{(?:[^{}]|\{[^{}]*\})*\}\s*;", "", text)
    for old, new in DEBIAN_IMPORT_MAP.items():
        text = text.replace(f'"{old}"', f'"{new}"')
    assert "gogoproto" not in text and "google.api" not in text
    return text


def _compile_debian(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    src_root = tmp_path / "debian"
    for src, dst in DEBIAN_PROTOS.items():
        target = src_root / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_strip_debian_proto((DEBIAN_ETCD / src).read_text(encoding="utf-8")))
    out = tmp_path / "debian.pb"
    rc = protoc.main(
        [
            "protoc",
            f"-I{src_root}",
            f"--descriptor_set_out={out}",
            "--include_imports",
            *(str(src_root / dst) for dst in DEBIAN_PROTOS.values()),
        ]
    )
    assert rc == 0, "protoc failed on the stripped Debian protos"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


def _ours() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    result: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for module in (kv_pb2, auth_pb2, rpc_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        result[fdp.package] = fdp
    return result


def _field_shape(f: descriptor_pb2.FieldDescriptorProto) -> tuple[object, ...]:
    return (f.name, f.number, f.type, f.label, f.type_name)


def _collect_messages(
    prefix: str,
    messages: Iterable[descriptor_pb2.DescriptorProto],
    out: dict[str, descriptor_pb2.DescriptorProto],
) -> None:
    for msg in messages:
        full = f"{prefix}.{msg.name}"
        out[full] = msg
        _collect_messages(full, msg.nested_type, out)


def _collect_enums(
    fdp: descriptor_pb2.FileDescriptorProto,
) -> dict[str, dict[str, int]]:
    enums: dict[str, dict[str, int]] = {}
    for e in fdp.enum_type:
        enums[f"{fdp.package}.{e.name}"] = {v.name: v.number for v in e.value}
    msgs: dict[str, descriptor_pb2.DescriptorProto] = {}
    _collect_messages(fdp.package, fdp.message_type, msgs)
    for full, msg in msgs.items():
        for e in msg.enum_type:
            enums[f"{full}.{e.name}"] = {v.name: v.number for v in e.value}
    return enums


def _oneof_name(msg: descriptor_pb2.DescriptorProto, f: descriptor_pb2.FieldDescriptorProto) -> str:
    return msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else ""


@pytest.fixture(scope="module")
def debian_files(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    if not DEBIAN_ETCD.is_dir():
        pytest.skip(
            f"Debian etcd protos not installed ({DEBIAN_ETCD} missing; "
            "apt install golang-etcd-server-dev)"
        )
    missing = [src for src in DEBIAN_PROTOS if not (DEBIAN_ETCD / src).is_file()]
    if missing:
        pytest.skip(f"Debian etcd protos incomplete under {DEBIAN_ETCD}: missing {missing}")
    fds = _compile_debian(tmp_path_factory.mktemp("debian-protos"))
    files = {f.package: f for f in fds.file}
    assert set(files) == {"mvccpb", "authpb", "etcdserverpb"}
    return files


@pytest.mark.parametrize("package", ["mvccpb", "authpb", "etcdserverpb"])
def test_messages_match_debian(
    debian_files: dict[str, descriptor_pb2.FileDescriptorProto], package: str
) -> None:
    theirs: dict[str, descriptor_pb2.DescriptorProto] = {}
    ours: dict[str, descriptor_pb2.DescriptorProto] = {}
    _collect_messages(package, debian_files[package].message_type, theirs)
    _collect_messages(package, _ours()[package].message_type, ours)
    assert theirs, "no messages parsed from the Debian proto"
    for full, msg in theirs.items():
        assert full in ours, f"message {full} missing"
        our_fields = {f.name: f for f in ours[full].field}
        for f in msg.field:
            assert f.name in our_fields, f"field {full}.{f.name} missing"
            mine = our_fields[f.name]
            assert _field_shape(mine) == _field_shape(f), f"field {full}.{f.name} differs"
            assert _oneof_name(ours[full], mine) == _oneof_name(msg, f), f"oneof of {full}.{f.name}"


@pytest.mark.parametrize("package", ["mvccpb", "authpb", "etcdserverpb"])
def test_enums_match_debian(
    debian_files: dict[str, descriptor_pb2.FileDescriptorProto], package: str
) -> None:
    theirs = _collect_enums(debian_files[package])
    ours = _collect_enums(_ours()[package])
    for full, values in theirs.items():
        assert full in ours, f"enum {full} missing"
        for name, number in values.items():
            assert ours[full].get(name) == number, f"enum value {full}.{name} differs"


def test_services_match_debian(
    debian_files: dict[str, descriptor_pb2.FileDescriptorProto],
) -> None:
    ours = {s.name: s for s in _ours()["etcdserverpb"].service}
    theirs = debian_files["etcdserverpb"].service
    assert {s.name for s in theirs} == {
        "KV",
        "Watch",
        "Lease",
        "Cluster",
        "Maintenance",
        "Auth",
    }
    for svc in theirs:
        assert svc.name in ours, f"service {svc.name} missing"
        our_methods = {m.name: m for m in ours[svc.name].method}
        for m in svc.method:
            assert m.name in our_methods, f"rpc {svc.name}.{m.name} missing"
            mine = our_methods[m.name]
            assert (mine.input_type, mine.output_type) == (m.input_type, m.output_type)
            assert (mine.client_streaming, mine.server_streaming) == (
                m.client_streaming,
                m.server_streaming,
            ), f"streaming of {svc.name}.{m.name} differs"
