"""Numbered schema migrations of the PostgreSQL store (the SQLite ones are the folder above)."""
