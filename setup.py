"""Build the Cython extensions in geminikv/_native, and name the packages (everything else
is in pyproject.toml).

The benchmark harness lives in ``benchmarks/`` and installs as ``geminikv_bench``, not as a
generic top-level ``benchmarks``; pyproject.toml's package discovery cannot rename a
package, hence the list here. Its dependencies are the ``bench`` extra.
"""

from Cython.Build import cythonize
from setuptools import Extension, find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["geminikv", "geminikv.*"]), "geminikv_bench"],
    package_dir={"geminikv_bench": "benchmarks"},
    ext_modules=cythonize(
        [
            Extension("geminikv._native.index", ["geminikv/_native/index.pyx"]),
            Extension("geminikv._native.kvwire", ["geminikv/_native/kvwire.pyx"]),
        ],
        compiler_directives={"language_level": "3"},
    ),
)
