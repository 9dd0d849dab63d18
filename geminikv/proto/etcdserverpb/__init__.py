"""Generated bindings for etcd's etcdserverpb package."""
