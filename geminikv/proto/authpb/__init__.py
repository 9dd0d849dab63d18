"""Generated bindings for etcd's authpb package."""
