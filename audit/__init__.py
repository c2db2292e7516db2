"""Replay and audit: re-derive state from the event log and check the read model against it."""
