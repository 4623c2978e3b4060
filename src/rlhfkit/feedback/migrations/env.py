"""Alembic environment: migrations always run on the connection `store.upgrade` passes in (no alembic.ini)."""

from alembic import context

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot ALTER most things, so later revisions rebuild tables in batch mode
context.configure(connection=connection, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
