"""gRPC services: decode, call the core, encode. No SQL here."""
