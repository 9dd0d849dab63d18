"""Auth as etcd's: users, roles, key-range permissions, tokens, and the checks every
request passes while auth is enabled (docs/architecture.md#auth)."""
