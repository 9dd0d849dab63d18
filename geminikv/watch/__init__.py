"""Watch delivery: the hub that fans applied revisions out, and per-stream state."""
