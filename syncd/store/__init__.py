"""The SQL store (jobs, budget reservations) and its schema migrations."""

from syncd.store.persist import persist
from syncd.store.store import JobRow, NewJob, Store, command_store

__all__ = ["JobRow", "NewJob", "Store", "command_store", "persist"]
