"""Alembic migrations, from store's metadata. Applied by ``pflat db upgrade`` and at service start."""
