"""Alembic migrations, applied on start (``store.db.migrate``)."""
