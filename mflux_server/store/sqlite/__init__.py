"""The SQLite backend: the session (connection.py), its migrations (migrations.py), its own SQL (queries.sql)."""
