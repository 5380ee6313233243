"""A few MiB kept beside the queue file, given up when the disk is full so that deleting tasks can free space.

On a full disk SQLite cannot append the WAL frames that a DELETE writes, so without a reserve nothing in the
API could free the space the queue's own images took. The reserve is made again once there is room.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mflux_server import store

log = logging.getLogger("mflux_server")

RESERVE_BYTES = 4 * 2**20  # a DELETE of a task with its images writes tens of pages (kilobytes) to the WAL


def reserve_path(db_path: str) -> Path | None:
    """Where the queue file's reserve lives (None for PostgreSQL, whose server owns its disk)."""
    return Path(f"{db_path}-reserve") if store.capabilities_of(db_path).local_file else None


def ensure(db_path: str) -> bool:
    """Make the reserve if it is missing and there is room; True when it is in place."""
    path = reserve_path(db_path)
    if path is None or (path.exists() and path.stat().st_size >= RESERVE_BYTES):
        return path is not None
    try:
        with open(path, "wb") as out:
            out.write(b"\0" * RESERVE_BYTES)  # written, not sparse: the bytes must really be taken
            out.flush()
            os.fsync(out.fileno())
    except OSError:
        path.unlink(missing_ok=True)
        return False
    return True


def release(db_path: str) -> bool:
    """Give the reserve's bytes back to the file system; True when there was one to give."""
    path = reserve_path(db_path)
    if path is None or not path.exists():
        return False
    path.unlink()
    log.warning("the disk under %s is full: released its %d MiB reserve so a delete can free space", db_path,
                RESERVE_BYTES // 2**20)
    return True
