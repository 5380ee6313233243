"""The schema's migration scripts, numbered, for either backend: migrations/ (SQLite) and migrations/postgresql/."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migration_files(dialect: str = "") -> list[tuple[int, str, str]]:
    """Return (version, name, sql) for every migration of a store ("" for SQLite, "postgresql"), from the installed
    package or the checkout."""
    package = "mflux_server.migrations" + (f".{dialect}" if dialect else "")
    try:
        folder = resources.files(package)
        entries = [(entry.name, entry) for entry in folder.iterdir()]
    except (ModuleNotFoundError, FileNotFoundError):
        entries = []
    if not any(_MIGRATION_NAME.match(name) for name, _ in entries):
        checkout = Path(__file__).resolve().parents[2] / "migrations" / dialect
        entries = [(entry.name, entry) for entry in checkout.iterdir()]
    found = []
    for name, entry in entries:
        match = _MIGRATION_NAME.match(name)
        if match:
            found.append((int(match.group(1)), name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 0001, 0002, … without gaps; found {versions}")
    return found
