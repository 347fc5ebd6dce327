"""Alembic revisions of the job store, one module each."""
