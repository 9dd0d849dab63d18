"""The benchmark harness behind ``geminikv bench``: geminikv, etcd and Python's gRPC
ceiling measured side by side, on kube-apiserver's request shapes."""
