"""The SQLite store: one queue file in WAL mode, polled for changes, with its pages handed back by hand."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mflux_server.store.base import Store
from mflux_server.store.capabilities import SQLITE
from mflux_server.store.errors import FileNotWritable
from mflux_server.store.query_files import for_backend
from mflux_server.store.sqlite import connection
from mflux_server.store.sqlite.connection import QueueConnection


class SqliteStore(Store):
    """A session with a queue file (connection.QueueConnection)."""

    capabilities = SQLITE
    session: QueueConnection

    def __init__(self, path: str | Path, checkpoint_pages: int | None = None, session: QueueConnection | None = None):
        super().__init__(str(path), session or connection.connect(path, checkpoint_pages), for_backend("sqlite"))
        self._page_size: int | None = None  # fixed when the file was made: read once

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to the file (PRAGMA data_version)."""
        version: int = self._run("data_version").fetchone()[0]
        return version

    def wait_for_change(self, version: int, timeout: float, tick: float) -> int:
        """SQLite has no notification: the cheap pragma is read every tick seconds."""
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(max(0.0, min(tick, deadline - time.monotonic())))
            current = self.data_version()
            if current != version or time.monotonic() >= deadline:
                return current

    def checkpoint(self) -> None:
        """Move the WAL's pages into the database file: a FULL checkpoint, never PASSIVE (connection.py)."""
        self.session.checkpoint_full()

    def checkpoint_if_grown(self) -> None:
        """Checkpoint once the -wal file is past its bound (the event loops' connections leave this to others)."""
        if connection.wal_bytes(self.session) > connection.WAL_SIZE_LIMIT:
            self.checkpoint()

    def give_back_space(self, pages: int) -> int:
        """Hand up to `pages` free pages back to the file system (incremental vacuum); returns how many were free."""
        free = int(self.session.execute("PRAGMA freelist_count").fetchone()[0])
        if free:
            # executescript steps the pragma to its end; execute() stops after the first page it frees.
            self.session.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
        return min(free, pages)

    def check_writable(self) -> None:
        """A file that lost its write permission still takes writes into its WAL, which then only grows: refuse."""
        path = self.session.path
        if path and not os.access(path, os.W_OK):
            raise FileNotWritable(f"{path} is not writable (read-only or immutable, as after chattr +i); writes go "
                                  "to its WAL, which cannot be checkpointed and grows until it is")
        super().check_writable()

    def _size_parameters(self) -> dict[str, Any]:
        """The page size, which sets how much disk a blob takes (connection.blob_disk_bytes)."""
        if self._page_size is None:
            self._page_size = int(self._run("page_size").fetchone()[0])
        return {"page": self._page_size}

    def backup(self, target: Path) -> None:
        """Copy the live queue into a new file with SQLite's online backup API: consistent while others write."""
        connection.backup(self.session, target)
