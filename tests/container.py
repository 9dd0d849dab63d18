"""podman, with its own storage in a temporary directory, and a stand-in for the
Dockerfile's base image (these machines reach Debian's and PyPI's packages but no image
registry, so `python:3.11-slim` is made locally with debootstrap)."""

from __future__ import annotations

import resource
import shutil
import subprocess
import urllib.request
from pathlib import Path

from tests.waiting import eventually

BASE_IMAGE = "python:3.11-slim"
# What the official image has that matters to the Dockerfile: python, pip, Python's headers.
BASE_PACKAGES = "python3,python3-pip,python3-venv,libpython3.11-dev,ca-certificates"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class Podman:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = [
            "podman",
            "--root", str(root / "storage"),
            "--runroot", str(root / "run"),
            "--storage-driver", "overlay",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            # crun refuses these VMs' hybrid cgroup hierarchy; runc runs on it
            "--runtime", "runc",
        ]  # fmt: skip

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.base, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {done.stdout}{done.stderr}")
        return done

    def run_flags(self) -> list[str]:
        # podman's defaults for root (nofile 1048576, nproc 4194304) exceed these
        # machines' hard limits, and a container may not raise them
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 4096)
        return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]

    def make_base_image(self, work: Path) -> None:
        rootfs = work / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
             str(rootfs), DEBIAN_MIRROR],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        if not (rootfs / "usr/bin/python").exists():
            (rootfs / "usr/bin/python").symlink_to("python3")
        # the official image's pip installs system-wide; Debian's refuses without this
        (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink()
        # this machine's certificate authorities (PyPI is reached through its proxy)
        bundle = "/etc/ssl/certs/ca-certificates.crt"
        shutil.copy(bundle, rootfs / bundle.lstrip("/"))
        (rootfs / "etc/pip.conf").write_text(f"[global]\ncert = {bundle}\n")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
        done = subprocess.run(
            [*self.base, "import", "--change", 'CMD ["python3"]', "-", f"localhost/{BASE_IMAGE}"],
            input=tar.stdout, capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        shutil.rmtree(rootfs, ignore_errors=True)

    def destroy(self) -> None:
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("system", "reset", "--force", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def wait_ready(port: int, timeout: float = 60.0) -> None:
    eventually(lambda: _ready(port), f"ready on port {port}", timeout, 0.25)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
