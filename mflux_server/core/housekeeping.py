"""Retention: what the queue forgets, and when. Each API server process runs a housekeeper on its own thread.

Finished, failed and canceled tasks go after --keep-finished with their images and inputs (their ids are
remembered for a week, so they answer task_expired); tasks kept only for image links go when the links expire;
past --max-store-bytes the oldest finished tasks go first. Freed pages go back to the file system
(incremental vacuum) and the WAL is checkpointed (and cut back to 1 MB) at each sweep and whenever it is
found past 1 MB in between; a removed task's events go a minute after it. So the files shrink rather than only
stopping to grow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mflux_server.core import disk_reserve, native
from mflux_server.store import Store, StoreError

log = logging.getLogger("mflux_server.housekeeping")

EVERY = 30.0  # seconds between sweeps
IDEMPOTENCY_WINDOW = 24 * 3600.0  # an Idempotency-Key answers its task for this long
EXPIRED_MEMORY = 7 * 24 * 3600.0  # how long a removed task's id answers task_expired
REMOVED_EVENTS_KEPT = 60.0  # seconds a removed task's events stay, for a stream that reconnects just then
# Seconds between looks at the WAL's size between sweeps. Not much oftener: each look takes the GIL from the
# busy event loop, which then waits for this thread to be scheduled. A running worker checkpoints at 1 MB
# itself (store.EAGER_PAGES); this covers a queue written without one.
WAL_CHECK = 0.25
VACUUM_PAGES = 2000  # pages handed back per sweep at most (8 MB at 4 KiB pages), so a sweep stays short


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep removed and gave back."""

    expired: int
    links: int
    trimmed: int
    pages_freed: int


def sweep(db: Store, keep_finished: float, max_store_bytes: int | None, now: float | None = None) -> Sweep:
    """Remove what retention says must go, then give free pages back; returns what it did."""
    now = time.time() if now is None else now
    expired = db.expire_finished(now - keep_finished, now)
    links = db.remove_expired(now)
    trimmed = db.trim_store(max_store_bytes, now) if max_store_bytes is not None else 0
    db.forget_old_records(now - IDEMPOTENCY_WINDOW, now - EXPIRED_MEMORY)
    db.prune_removed_events(now - REMOVED_EVENTS_KEPT)
    pages = db.give_back_space(VACUUM_PAGES)
    db.checkpoint()
    return Sweep(expired, links, trimmed, pages)


def fail_unserved(db: Store, stale_after: float, unserved_timeout: float,
                  now: float | None = None) -> int:
    """Fail waiting tasks of models no live worker serves, queued over unserved_timeout ago, while workers run.

    A task queued while no worker was alive is accepted (a worker is expected); if the workers that then run serve
    other models, it would otherwise wait forever. With no worker alive at all, tasks keep waiting."""
    now = time.time() if now is None else now
    live = db.live_workers(stale_after)
    if not live:
        return 0
    served = {model for worker in live for model in worker.servable}
    failed = 0
    for model in sorted({head.model for head in db.waiting_heads()} - served):
        failed += db.fail_unserved(model, now - unserved_timeout,
                                      f"no live worker serves {model} (the running workers serve "
                                      f"{', '.join(sorted(served))}); the task waited {unserved_timeout:g} s "
                                      "(--unserved-timeout) for one", now)
    return failed


def start(connect: Callable[[], Store], keep_finished: float, max_store_bytes: int | None,
          every: float = EVERY, db_path: str | None = None, stale_after: float | None = None,
          unserved_timeout: float | None = None) -> Any:
    """Sweep every `every` seconds on an OS thread of its own; returns the signal that stops it (its set()).

    Not a greenlet: a sweep's trims, incremental vacuum and checkpoint (with its fsync) block in SQLite for
    tens of milliseconds, which on the event loop stalled every request of the process (the soak's status p99).
    """

    def run(stop: Any) -> None:
        db = connect()
        next_sweep = time.monotonic()
        while True:
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + every
                    done = sweep(db, keep_finished, max_store_bytes)
                    if db_path is not None:
                        disk_reserve.ensure(db_path)  # again, once a full disk has room
                    if stale_after is not None and unserved_timeout is not None:
                        unserved = fail_unserved(db, stale_after, unserved_timeout)
                        if unserved:
                            log.warning("failed %d waiting task(s) whose model no live worker serves", unserved)
                    if done.expired or done.trimmed or done.links:
                        log.info("retention removed %d finished, %d expired-link and %d over-the-store-bound tasks; "
                                 "%d pages given back", done.expired, done.links, done.trimmed, done.pages_freed)
                else:
                    db.checkpoint_if_grown()  # the event loops' sessions leave this to us (store.connect)
            except StoreError as error:  # a storage fault must not end retention for good
                log.error("housekeeping: %s: %s", type(error).__name__, error)
            if stop.wait(min(WAL_CHECK, every)):
                return

    return native.daemon(run, "housekeeping")
