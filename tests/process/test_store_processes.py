"""The queue across processes: concurrent claims never share a task; concurrent starts migrate once."""

from __future__ import annotations

import multiprocessing
import time

from mflux_server import store
from mflux_server.core.rows import Status
from mflux_server.store.migration_files import migration_files
from tests.conftest import queue_task
from tests.fast.test_migrations import EXPECTED_COLUMNS, describe, pragma


def _claim_all(path: str, worker: str, out, ready, go) -> None:
    db = store.connect(path)
    ready.put(worker)
    go.wait()
    got = []
    while (task := db.claim_next(worker, "schnell", "synthetic")) is not None:
        got.append(task.id)
        time.sleep(0.001)  # a real worker generates between claims; this lets the others in
    out.put(got)


def test_concurrent_claims_from_several_processes_never_share_a_task(db_path, db):
    ids = {queue_task(db).id for _ in range(300)}
    ctx = multiprocessing.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim_all, args=(db_path, f"w{i}", out, ready, go)) for i in range(4)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    go.set()  # all four start claiming at the same moment
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    claimed = [i for r in results for i in r]
    assert len(claimed) == len(set(claimed)) == 300
    assert set(claimed) == ids
    assert sum(1 for r in results if r) >= 2, "the claims should really have been spread over processes"
    running = db.list_tasks(Status.PROCESSING, 300, 0)[0]
    assert len({t.worker_id for t in running}) == sum(1 for r in results if r)


def _open(path: str) -> object:
    db = store.open_migrated(path)
    return pragma(db, "user_version")


def test_concurrent_processes_migrate_safely(tmp_path):
    path = str(tmp_path / "q.db")
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        versions = pool.map(_open, [path] * 12)
    assert set(versions) == {len(migration_files())}
    assert describe(store.connect(path)) == EXPECTED_COLUMNS
