"""podman, with its own storage in a temporary directory, and a stand-in for the
Dockerfile's base image (these machines reach Debian's and PyPI's packages but no image
registry, so `python:3.11-slim` is made locally with debootstrap). The image is built in
the background while the rest of the suite runs (``ImageBuild``)."""

from __future__ import annotations

import resource
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

from tests.waiting import eventually

BASE_IMAGE = "python:3.11-slim"
IMAGE = "localhost/geminikv:test"
ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("podman", "runc", "debootstrap", "etcdctl")
# The build runs beside other tests: at low priority, so they keep the CPU they need.
NICE = ["nice", "-n", "15"]
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
        self, *args: str, timeout: float = 120, check: bool = True, nice: bool = False
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*(NICE if nice else []), *self.base, *args],
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
            [*NICE, "debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
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


def missing_tools() -> list[str]:
    return [c for c in TOOLS if shutil.which(c) is None]


class ImageBuild:
    """The Dockerfile's image, built in a thread from the start of the session: the build
    (~95 s, mostly downloads and compiling) then overlaps the other tests, and the image
    tests, which run last, wait for what is left of it."""

    def __init__(self, root: Path) -> None:
        self.engine = Podman(root / "podman")
        self._base = root / "base"
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._build, name="image-build", daemon=True)
        self._thread.start()

    def _build(self) -> None:
        try:
            self._base.mkdir(parents=True)
            self.engine.make_base_image(self._base)
            # --format docker keeps HEALTHCHECK (OCI images have no such field); chroot
            # isolation: RUN steps need no cgroups
            self.engine(
                "build", "--format", "docker", "--isolation", "chroot", "--pull=never",
                "--network", "host", "--tag", IMAGE, str(ROOT), timeout=900, nice=True,
            )  # fmt: skip
        except BaseException as err:  # raised again in the test that waits for the image
            self._error = err

    def wait(self) -> Podman:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.engine

    def destroy(self) -> None:
        self._thread.join()
        self.engine.destroy()


def wait_ready(port: int, timeout: float = 60.0) -> None:
    eventually(lambda: _ready(port), f"ready on port {port}", timeout, 0.25)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
