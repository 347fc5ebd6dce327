"""Alembic migrations of the job store (a package so that wheels ship them)."""
