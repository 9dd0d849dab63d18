"""The MVCC core: index, follower, batched writer, txn evaluation."""
