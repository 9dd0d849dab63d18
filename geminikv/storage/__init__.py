"""PostgreSQL: the embedded server, connections, Kine's schema and every SQL statement."""
