"""What a queue's store can do: code outside the store asks about a behaviour, never about which database it is."""

from __future__ import annotations

from dataclasses import dataclass

from mflux_server.core import pg, store


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


_SQLITE = Capabilities(notifies=False, pooled=False, local_file=True, outcome_unknown_when_cut=False)
_POSTGRESQL = Capabilities(notifies=True, pooled=True, local_file=False, outcome_unknown_when_cut=True)


def of(target: str) -> Capabilities:
    """The capabilities of the store a --db value names (an SQLite file, or a postgresql:// URL)."""
    return _POSTGRESQL if pg.is_postgres_url(target) else _SQLITE


def of_connection(conn: object) -> Capabilities:
    """The capabilities of the store a connection is to."""
    return _POSTGRESQL if store.is_postgres(conn) else _SQLITE
