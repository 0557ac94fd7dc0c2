"""Alembic migrations of the glio-node schema (run by glio_node.store.db.upgrade)."""
