"""The projector: folds the event log into the SQL read model, exactly once in effect."""
