"""The read side: the repository over the read model, its engines (the primary or replicas),
batched point reads and shared readings."""
