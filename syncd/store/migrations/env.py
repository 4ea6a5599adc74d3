"""Alembic environment for syncd's store. Run programmatically by `Store.upgrade()`, which hands
over an open connection (inside its own transaction) in `config.attributes["connection"]`."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from syncd.store.schema import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("syncd migrations run through `syncd db upgrade`, not the alembic CLI")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
