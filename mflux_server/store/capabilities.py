"""What a queue's store can do: code outside the store asks about a behaviour, never about which database it is."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The behaviours callers branch on."""

    # A commit signals every listening session at once (LISTEN/NOTIFY), so waits can block on the signal and a
    # read can be cached until it moves; without it, readers poll the file's data version.
    notifies: bool
    # Sessions are borrowed from a pool per use: greenlets sharing one would interleave their transactions.
    pooled: bool
    # The queue is one file on this machine: backups and migrate-to copy it, a disk reserve sits beside it, its
    # write lock can be inspected, and ~ in its path is the user's home.
    local_file: bool
    # A connection cut during a commit can leave its outcome unknown (the server may have committed it).
    outcome_unknown_when_cut: bool


SQLITE = Capabilities(notifies=False, pooled=False, local_file=True, outcome_unknown_when_cut=False)
POSTGRESQL = Capabilities(notifies=True, pooled=True, local_file=False, outcome_unknown_when_cut=True)


def is_server_url(target: object) -> bool:
    """Whether a --db value names a PostgreSQL server rather than an SQLite file."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def of(target: object) -> Capabilities:
    """The capabilities of the store a --db value names (an SQLite file, or a postgresql:// URL)."""
    return POSTGRESQL if is_server_url(target) else SQLITE
