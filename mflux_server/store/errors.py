"""The store's own errors: what a database failure means for the queue, whichever driver raised it."""

from __future__ import annotations

# What a StoreError's `problem` may be: the disk is full, an I/O error or a lost server, the storage refuses
# writes, another writer holds the lock too long, the data is damaged, the file was removed under the process.
PROBLEMS = ("full", "io", "read_only", "busy", "corrupt", "lost")


class StoreError(Exception):
    """A database failure; `problem` says what it means for the store (one of PROBLEMS), None for a bug."""

    problem: str | None = None

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        if problem is not None:
            self.problem = problem


class StorageLost(StoreError):
    """The database file or its WAL was removed or replaced under a running process: writes would not be durable."""

    problem = "lost"


class FileNotWritable(StoreError):
    """The queue file stopped being writable while the process ran."""

    problem = "read_only"


class Conflict(StoreError):
    """A unique or check constraint refused a write (a key name already taken)."""


def storage_problem(error: BaseException) -> str | None:
    """What an error says about the storage: full, io, read_only, busy, corrupt or lost; None for anything else."""
    return error.problem if isinstance(error, StoreError) else None
