"""The PostgreSQL backend: sessions and pools, LISTEN/NOTIFY, one-message claims, migrations, its own SQL."""
