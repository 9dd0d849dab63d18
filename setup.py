"""Build the Cython extensions in geminikv/_native, generate the gRPC bindings in
geminikv/proto from proto/*.proto, and name the packages (everything else is in
pyproject.toml).

The bindings are build output, not source: they are written when the package is built
(an install, an editable install, a wheel) by the grpcio-tools pinned in pyproject.toml's
[build-system], so they always match proto/ and the runtime floors in pyproject.toml.

The benchmark harness lives in ``benchmarks/`` and installs as ``geminikv_bench``, not as a
generic top-level ``benchmarks``; pyproject.toml's package discovery cannot rename a
package, hence the list here. Its dependencies are the ``bench`` extra.
"""

import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, find_namespace_packages, setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent / "proto"))
import generate  # proto/generate.py


class BuildPyWithBindings(build_py):
    """Generates geminikv/proto before the packages' files are collected."""

    def run(self) -> None:
        generate.generate(generate.DEFAULT_OUT)
        super().run()


setup(
    cmdclass={"build_py": BuildPyWithBindings},
    packages=[
        *find_namespace_packages(include=["geminikv", "geminikv.*"]),
        "geminikv_bench",
        "geminikv_bench.loadgen",  # the Go load generator's source, built on first use
    ],
    package_dir={"geminikv_bench": "benchmarks"},
    ext_modules=cythonize(
        [
            Extension("geminikv._native.index", ["geminikv/_native/index.pyx"]),
            Extension("geminikv._native.kvwire", ["geminikv/_native/kvwire.pyx"]),
        ],
        compiler_directives={"language_level": "3"},
    ),
)
