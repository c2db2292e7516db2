"""Shared core of the connection tracker: settings, the event schema, the read-model schema."""
