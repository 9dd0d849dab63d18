"""Generate the Python gRPC bindings for the etcd v3.5 wire contract.

Usage: python proto/generate.py [OUT_DIR]   (default: geminikv/proto)

setup.py runs it on every build; geminikv/proto is build output, never committed.

Runs grpc_tools.protoc over the .proto files in this directory, then rewrites
the generated absolute imports (``from mvccpb import kv_pb2`` ...) so that the
code lives inside the ``geminikv.proto`` package.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
DEFAULT_OUT = REPO_ROOT / "geminikv" / "proto"
TARGET_PACKAGE = "geminikv.proto"

PACKAGES: tuple[str, ...] = ("mvccpb", "authpb", "etcdserverpb")
PROTO_FILES: tuple[str, ...] = (
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "etcdserverpb/rpc.proto",
)

_PKG_ALT = "|".join(PACKAGES)
# "from mvccpb import kv_pb2 as ..." -> "from geminikv.proto.mvccpb import ..."
_FROM_RE = re.compile(rf"^(\s*)from ({_PKG_ALT})((?:\.\w+)*) import ", re.MULTILINE)
# "import mvccpb.kv_pb2 as x" -> "from geminikv.proto.mvccpb import kv_pb2 as x"
_IMPORT_AS_RE = re.compile(
    rf"^(\s*)import ({_PKG_ALT})((?:\.\w+)*)\.(\w+) as (\w+)\s*$", re.MULTILINE
)

_PACKAGE_DOCS: dict[str, str] = {
    "": "Generated gRPC/protobuf bindings for the etcd v3.5 API (see proto/generate.py).",
    "mvccpb": "Generated bindings for etcd's mvccpb package.",
    "authpb": "Generated bindings for etcd's authpb package.",
    "etcdserverpb": "Generated bindings for etcd's etcdserverpb package.",
}


def rewrite_imports(source: str) -> str:
    """Rewrite top-level imports of the etcd proto packages into geminikv.proto."""
    source = _FROM_RE.sub(rf"\1from {TARGET_PACKAGE}.\2\3 import ", source)
    source = _IMPORT_AS_RE.sub(rf"\1from {TARGET_PACKAGE}.\2\3 import \4 as \5", source)
    return source


def write_package_inits(out_dir: Path) -> None:
    """Create docstring-only __init__.py files for the package and subpackages."""
    for sub, doc in _PACKAGE_DOCS.items():
        pkg_dir = out_dir / sub if sub else out_dir
        pkg_dir.mkdir(parents=True, exist_ok=True)
        (pkg_dir / "__init__.py").write_text(f'"""{doc}"""\n', encoding="utf-8")


def run_protoc(out_dir: Path) -> None:
    # In this process, not `python -m grpc_tools.protoc`: a build's isolated environment
    # need not be importable from a child interpreter.
    from grpc_tools import protoc  # type: ignore[import-untyped]

    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    out = str(out_dir)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(PROTO_DIR / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def generate(out_dir: Path) -> list[Path]:
    """Generate bindings into out_dir; return the list of files written."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_package_inits(out_dir)
    run_protoc(out_dir)
    written: list[Path] = []
    for pkg in PACKAGES:
        for path in sorted((out_dir / pkg).iterdir()):
            if path.suffix not in (".py", ".pyi") or path.name == "__init__.py":
                continue
            text = path.read_text(encoding="utf-8")
            new = rewrite_imports(text)
            if new != text:
                path.write_text(new, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    for path in generate(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
