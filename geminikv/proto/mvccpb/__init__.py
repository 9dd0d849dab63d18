"""Generated bindings for etcd's mvccpb package."""
