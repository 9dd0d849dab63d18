"""Cython hot paths; Python code reaches them through one wrapper module each."""
