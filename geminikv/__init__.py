"""geminikv: an etcd v3 server backed by PostgreSQL."""

__version__ = "0.1.0"
