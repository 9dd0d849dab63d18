"""Generated gRPC/protobuf bindings for the etcd v3.5 API (see proto/generate.py)."""
