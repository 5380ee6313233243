"""The process contract on the PostgreSQL store: the same tests as on SQLite (priority order, cancel, SIGKILL
recovery, several workers, no double claim), plus migrations racing under the advisory lock, wake-ups by NOTIFY,
and faults across hosts (a server restart, a frozen worker, a cut connection).

The shared tests are imported from their SQLite modules; collected here, they take this module's `db_path`, a
fresh database on the suite's PostgreSQL server. Event streams, webhooks, keys, quotas, fair share and metrics
are among them: everything above the store is the same code on both.
"""

from __future__ import annotations

import multiprocessing
import re
import signal
import time

import psycopg
import pytest

from mflux_server import store
from mflux_server.store.migration_files import migration_files
from mflux_server.store.postgresql.backend import PostgresStore
from mflux_server.store.postgresql.migrations import migrate
from mflux_server.testing import wait_for
from mflux_server.testing_postgres import PostgresServer
from tests.conftest import queue_task, status_of
from tests.fast.test_migrations import EXPECTED_COLUMNS
from tests.process.test_events import (  # noqa: F401  (collected here, on PostgreSQL)
    test_a_task_stream_follows_it_from_waiting_to_done_with_progress_and_previews,
    test_the_queue_stream_shows_positions_moving_and_a_cancel,
)
from tests.process.test_shared_service import (  # noqa: F401  (collected here, on PostgreSQL)
    test_an_idempotent_retry_after_a_killed_api_answers_the_same_task,
    test_another_keys_tasks_are_absent_and_only_admins_see_all,
    test_every_route_class_needs_a_live_key_in_its_own_envelope,
    test_fair_share_lets_a_second_key_through_within_a_task,
    test_metrics_parse_and_every_server_process_gives_the_same_figures,
    test_quotas_hold_across_two_server_processes_with_retry_after,
    test_readiness_needs_a_writable_queue_and_a_live_worker,
    test_the_first_key_ends_open_access_in_every_running_server_process,
)
from tests.process.test_store_processes import (  # noqa: F401  (collected here, on PostgreSQL)
    test_concurrent_claims_from_several_processes_never_share_a_task,
)
from tests.process.test_upload_lane import (  # noqa: F401  (collected here, on PostgreSQL)
    test_an_edit_with_four_references_is_stored_as_sent_and_its_retry_answers_its_task,
)
from tests.process.test_webhook_delivery import (  # noqa: F401  (collected here, on PostgreSQL)
    test_a_failing_receiver_gets_retries_with_one_id_until_it_answers,
    test_a_task_finished_while_the_api_was_killed_is_delivered_when_it_returns,
)
from tests.process.test_worker import (  # noqa: F401  (collected here, on PostgreSQL)
    row,
    test_a_running_worker_takes_over_from_a_killed_one,
    test_attempt_limit_ends_a_task_that_keeps_killing_workers,
    test_cancel_waiting_never_starts_and_running_stops_at_a_step,
    test_sigkill_mid_task_reruns_on_the_next_worker_start,
    test_worker_runs_in_priority_order_and_stores_images,
)


@pytest.fixture
def db_path(postgres_server: PostgresServer) -> str:
    """A fresh, migrated PostgreSQL database in place of the SQLite file."""
    url = postgres_server.create_database()
    store.open_migrated(url).close()
    return url


def describe(url: str) -> dict[str, set[str]]:
    """Every table of the public schema with its column names (catalog introspection, not queue access)."""
    with psycopg.connect(url) as db:
        rows = db.execute("SELECT table_name, column_name FROM information_schema.columns "
                            "WHERE table_schema = 'public'").fetchall()
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        tables.setdefault(table, set()).add(column)
    return tables


def _migrate(url: str) -> int:
    return migrate(PostgresStore(url).session)


def test_concurrent_processes_migrate_once_under_the_advisory_lock(postgres_server):
    url = postgres_server.create_database()
    with multiprocessing.get_context("spawn").Pool(6) as workers:
        versions = workers.map(_migrate, [url] * 12)
    assert set(versions) == {len(migration_files("postgresql"))}
    assert describe(url) == EXPECTED_COLUMNS | {"schema_migrations": {"version", "name", "applied_at"}}
    with psycopg.connect(url) as db:
        applied = [row[0] for row in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert applied == [version for version, _, _ in migration_files("postgresql")], "each applied exactly once"


def test_a_url_that_cannot_be_reached_exits_with_one_line_naming_it(processes):
    url = "postgresql://nobody:secret@127.0.0.1:1/none"
    processes.db_path = url
    proc = processes.spawn("mflux_server.worker", [], "worker")
    assert proc.wait(timeout=30) == 1
    last = processes.log(proc).strip().splitlines()[-1]
    assert "cannot use the PostgreSQL queue postgresql://nobody:***@127.0.0.1:1/none" in last
    assert "secret" not in processes.log(proc)


def test_an_idle_worker_wakes_on_notify_not_on_its_poll_interval(db, db_path, processes):
    # A 30 s poll interval: only a NOTIFY can make the claim quick.
    processes.worker("--poll-interval", "30", speed=50.0)
    time.sleep(1.0)  # the worker is idle, waiting
    task = queue_task(db, width=256, height=256, steps=2)
    started = time.monotonic()
    wait_for(lambda: status_of(db_path, task.id) in ("processing", "done"), timeout=10, interval=0.005,
             what="the idle worker to claim the task")
    assert time.monotonic() - started < 0.5  # the listener's quiet-second timeout must not be what wakes it


def test_a_restart_of_postgresql_mid_run_loses_no_acknowledged_task(processes):
    server = PostgresServer().start()  # a server of its own: this test stops it
    try:
        url = server.create_database()
        store.open_migrated(url).close()
        processes.db_path = url
        api = processes.server()
        processes.worker(speed=20.0)
        before = [_submit(api) for _ in range(3)]
        server.restart()
        # The API's and the worker's sessions broke; each reconnects on its next use. Submits may fail while
        # the server is down, but every one that was acknowledged is kept and run.
        after = [_submit(api, retries=50) for _ in range(3)]
        for task_id in before + after:
            wait_for(lambda task_id=task_id: _status(api, task_id) == "done", timeout=60,
                     what=f"task {task_id} to be done after the restart")
    finally:
        processes.stop_all()
        server.stop()


def _submit(api: str, retries: int = 0) -> str:
    import requests

    for attempt in range(retries + 1):
        response = requests.post(api + "/api/generate", json={"prompt": "restart", "width": 256, "height": 256,
                                                              "steps": 2, "seed": 1}, timeout=10)
        if response.status_code == 200:
            return str(response.json()["task_id"])
        assert response.status_code in (500, 503, 507), response.text  # a storage error, said as such
        assert attempt < retries, response.text
        time.sleep(0.2)
    raise AssertionError("unreachable")


def _status(api: str, task_id: str) -> str:
    import requests

    return str(requests.get(api + "/api/status", params={"task_id": task_id}, timeout=10).json().get("status"))


def test_a_frozen_worker_is_recovered_by_another_and_its_late_writes_are_refused(db, db_path, processes):
    # With the API, as deployed: a worker frozen in the middle of a write's pipeline holds the write lock, and only
    # the API's watchdog ends such a session (PostgreSQL's idle-in-transaction timeout does not see it); without
    # it the second worker could not even register (CI saw that once).
    processes.server()
    task = queue_task(db, width=256, height=256, steps=40)
    frozen = processes.worker("--stale-after", "2", speed=2.0)
    wait_for(lambda: (row(db_path, task.id).step or 0) >= 1, what="the task to be running")
    first_worker = row(db_path, task.id).worker_id
    frozen.send_signal(signal.SIGSTOP)
    try:
        processes.worker("--stale-after", "2", speed=50.0)
        wait_for(lambda: status_of(db_path, task.id) == "done", timeout=40, what="another worker to redo the task")
        redone = row(db_path, task.id)
        assert redone.worker_id != first_worker and redone.attempts == 2
    finally:
        frozen.send_signal(signal.SIGCONT)
    # The frozen worker resumes mid-task: its progress and completion are refused (the task is no longer its
    # own), the finished task is left as the other worker stored it, and the frozen one goes on running.
    time.sleep(3.0)
    assert frozen.poll() is None, processes.log(frozen)
    after = row(db_path, task.id)
    assert (after.status, after.worker_id, after.attempts) == ("done", redone.worker_id, 2)
    later = queue_task(db, width=256, height=256, steps=2)
    wait_for(lambda: status_of(db_path, later.id) == "done", timeout=30, what="the workers to go on with new tasks")


def test_a_cut_connection_mid_task_is_recovered_and_the_worker_goes_on(db, db_path, processes):
    task = queue_task(db, width=256, height=256, steps=30)
    processes.worker("--stale-after", "2", speed=4.0)
    wait_for(lambda: (row(db_path, task.id).step or 0) >= 1, what="the task to be running")
    dbname = db_path.rsplit("/", 1)[1]
    with psycopg.connect(db_path.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
        cut = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid != pg_backend_pid()",
                            (dbname,)).fetchone()[0]
    assert cut >= 1
    # The worker's session is gone mid-task: its next write reconnects, and the task ends done either way
    # (finished by it, or requeued by recovery and run again), never stuck in processing.
    wait_for(lambda: status_of(db_path, task.id) == "done", timeout=60, what="the task to be done after the cut")
    later = queue_task(store.connect(db_path), width=256, height=256, steps=2)  # the test's own session was cut too
    wait_for(lambda: status_of(db_path, later.id) == "done", timeout=30, what="the worker to go on")


def test_migrate_to_copies_a_sqlite_queue_with_its_images_timings_and_keys(tmp_path, postgres_server):
    import subprocess
    import sys

    from mflux_server.core import api_keys
    from mflux_server.core.rows import Status, Timing
    from tests.conftest import images_for

    path = str(tmp_path / "queue.db")
    source = store.open_migrated(path)
    done = queue_task(source, prompt="finished")
    claimed = source.claim_next("w", "schnell", "synthetic")
    assert claimed is not None and source.complete(claimed.id, "w", images_for(claimed, b"\x89PNG-bytes"))
    source.record_timings("schnell", 512, 512, [Timing("step", (0.5, 0.6, 0.7))])
    waiting = queue_task(source, prompt="still waiting", priority=1)
    key = api_keys.new_key()
    source.create_key("alice", api_keys.key_hash(key), admin=False, priority=True)
    events_before = len(source.events_after(0))
    source.close()

    url = postgres_server.create_database()
    result = subprocess.run([sys.executable, "-m", "mflux_server", "migrate-to", url, "--db", path],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^tasks\s+2 rows$", result.stdout, re.MULTILINE) and "copied the queue to" in result.stdout

    target = store.connect(url)
    copied = target.get(done.id)
    assert copied is not None and copied.status is Status.DONE and copied.prompt == "finished"
    image = target.fetch_image(done.id, 0)
    assert image is not None and image.data == b"\x89PNG-bytes0"
    assert [(s.kind, s.n, round(s.total, 6)) for s in target.timing_stats()] == [("step", 3, 1.8)]
    found = target.key_by_hash(api_keys.key_hash(key))
    assert found is not None and found.name == "alice" and found.priority
    assert len(target.events_after(0)) == events_before  # the history, without events made by the copy
    # The copy is a working queue: the waiting task is claimed next, and new rows number on after the copied ones.
    assert target.claim_next("w2", "schnell", "synthetic").id == waiting.id  # type: ignore[union-attr]
    assert queue_task(target).seq == waiting.seq + 1

    again = subprocess.run([sys.executable, "-m", "mflux_server", "migrate-to", url, "--db", path],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already holds tasks" in again.stderr


def test_many_first_requests_at_once_under_gevent_all_get_answers(db, db_path, processes):
    # The first requests of a server process all open the pool and the listener at the same moment: a lock
    # taken across those (as it once was) froze the whole event loop.
    import concurrent.futures

    import requests

    task = queue_task(db)
    api = processes.server(http_workers=1)
    with concurrent.futures.ThreadPoolExecutor(32) as clients:
        codes = list(clients.map(lambda _: requests.get(api + "/api/status", params={"task_id": task.id},
                                                        timeout=20).status_code, range(64)))
    assert codes == [200] * 64
