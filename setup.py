"""Build the Cython extensions in geminikv/_native (everything else is in pyproject.toml)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension("geminikv._native.index", ["geminikv/_native/index.pyx"]),
            Extension("geminikv._native.kvwire", ["geminikv/_native/kvwire.pyx"]),
        ],
        compiler_directives={"language_level": "3"},
    )
)
