"""Alembic migrations of the feedback store, applied by `rlhfkit.feedback.store.open_store`."""
