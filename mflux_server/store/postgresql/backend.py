"""The PostgreSQL store: sessions from a pool, claims in one message, waits woken by LISTEN/NOTIFY."""

from __future__ import annotations

import time

from mflux_server.core.rows import Task
from mflux_server.store.base import Store
from mflux_server.store.capabilities import POSTGRESQL
from mflux_server.store.postgresql import migrations, pools
from mflux_server.store.postgresql.notifications import notifications
from mflux_server.store.postgresql.session import WRITE_LOCK, PgSession, psycopg_placeholders
from mflux_server.store.query_files import for_backend
from mflux_server.store.sqlite.backend import SqliteStore


class PostgresStore(Store):
    """A session with a PostgreSQL server (session.PgSession): its own, or borrowed from the process's pool."""

    capabilities = POSTGRESQL
    session: PgSession

    def __init__(self, url: str, pooled: bool = False):
        super().__init__(url, pools.connect(url, pooled), for_backend("postgresql", psycopg_placeholders))

    def end_frozen_writers(self, limit: float) -> list[tuple[int, float, bool]]:
        """End the sessions that have held the write lock for more than limit seconds (core/write_lock.py): each
        one's (pid, seconds held, whether it could be ended)."""
        rows = self._run("end_frozen_writers", {"high": WRITE_LOCK >> 32, "low": WRITE_LOCK & 0xFFFFFFFF,
                                                "limit": limit}).fetchall()
        return [(int(pid), float(held), bool(ended)) for pid, held, ended in rows]

    def claim_next(self, worker_id: str, model: str, engine: str, now: float | None = None,
                   loras: str | None = None) -> Task | None:
        """Atomically take the next waiting task of this model in claim order (of its LoRA set `loras` if given).

        The write lock and the claim go out in one message as one transaction, so the lock is held for no round
        trip at all, and between two generations the server wakes once (one_message.py).
        """
        params = {"worker_id": worker_id, "model": model, "engine": engine, "now": time.time() if now is None else now}
        if loras is not None:
            row = self.session.write_alone(self._queries["claim_next_variant"], {**params, "loras": loras}).fetchone()
        else:
            row = self.session.write_alone(self._queries["claim_next"], params).fetchone()
        return Task.from_row(row) if row else None

    def prepare_claims(self, worker_id: str, engine: str, model: str = "") -> None:
        """Prepare the session for its first claim, changing nothing.

        Parse and plan were 6 of the first claim's 9 ms on a 2-core VM, so the claim and the input read run once
        against nothing. Then one claim of `model` runs for real and is rolled back: its triggers' functions are
        compiled and their statements planned in this session (another 3-6 ms of the first real claim). It holds
        the write lock meanwhile, as every claim does, so no other claim sees its row taken (one_message.py).
        """
        self.claim_next(worker_id, "", engine)  # no task has the empty model: no row, no trigger, nothing written
        self.inputs("")
        if model:
            self.session.rehearse(self._queries["claim_next"], {"worker_id": worker_id, "model": model,
                                                                "engine": engine, "now": time.time()})

    def data_version(self) -> int:
        """A counter this process's LISTEN session moves on every NOTIFY (and on every reconnect)."""
        return notifications(self.target).version

    def wait_for_change(self, version: int, timeout: float, tick: float) -> int:
        """Wake on LISTEN/NOTIFY at once; tick is not needed."""
        return notifications(self.target).wait(version, timeout)

    def copy_from(self, source: Store) -> dict[str, int]:
        """Copy every row of an SQLite queue into this empty, migrated one; the rows copied per table."""
        if not isinstance(source, SqliteStore):
            return super().copy_from(source)
        return migrations.copy_from_sqlite(source.session, self.session)
