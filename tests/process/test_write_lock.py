"""A process frozen inside a write transaction: the write-lock watchdog (SQLite) and the session limit (PostgreSQL)
keep submits answering, and only a registered worker is ever stopped."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from mflux_server import store
from mflux_server.core import write_lock
from mflux_server.testing import Processes

# A stand-in for a worker frozen mid-write: a real process that registers as a worker when asked, opens a write
# transaction, says so, and stops itself with SIGSTOP, as a debugger or a swapping machine would stop a worker.
FROZEN = textwrap.dedent("""
    import os, signal, sys
    from mflux_server import store
    target, register, limit = sys.argv[1], sys.argv[2] == "worker", float(sys.argv[3])
    if store.is_server_url(target):
        import psycopg
        from mflux_server.store.postgresql import session as pg
        store.limit_idle_transactions(limit)  # as the worker's main() does
        if sys.argv[2] == "pipeline":  # stopped mid-pipeline: BEGIN and the lock ran, no Sync yet (not idle)
            import select
            session = psycopg.connect(target, **pg.SESSION_OPTIONS)
            wire = session.pgconn
            wire.enter_pipeline_mode()
            for text in pg._BEGIN_WRITE:
                wire.send_query_params(text.encode(), None)
            wire.send_flush_request()
            wire.flush()
            results = 0
            while results < len(pg._BEGIN_WRITE):  # until the server says the lock is taken
                if wire.is_busy():
                    select.select([wire.socket], [], [], 5)
                    wire.consume_input()
                elif wire.get_result() is not None:
                    results += 1
        else:
            session = psycopg.connect(target, **{**pg.SESSION_OPTIONS, "autocommit": False})
            session.execute(pg._BEGIN_WRITE[1])  # the store's write lock, held inside an open transaction
    else:
        db = store.connect(target)
        if register:
            db.register_worker("synthetic", "schnell", None)
        db.session.execute("BEGIN IMMEDIATE")
        db.session.execute("UPDATE workers SET heartbeat_at = heartbeat_at")
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
""")


def frozen_writer(target: str, as_worker: bool, limit: float = 2.0, mid_pipeline: bool = False) -> subprocess.Popen[str]:
    """Start the stand-in and return once it holds the write lock (it is stopped by then, or about to be)."""
    how = "pipeline" if mid_pipeline else "worker" if as_worker else "other"
    proc = subprocess.Popen([sys.executable, "-c", FROZEN, target, how, str(limit)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def timed_submit(url: str) -> tuple[requests.Response, float]:
    started = time.monotonic()
    answer = requests.post(url + "/api/generate", json={"prompt": "past a frozen writer", "steps": 2}, timeout=60)
    return answer, time.monotonic() - started


def test_a_worker_frozen_in_a_write_is_stopped_and_submits_answer_within_the_limit(processes: Processes, db_path):
    url = processes.server("--write-lock-limit", "2")
    frozen = frozen_writer(db_path, as_worker=True)
    try:
        answer, took = timed_submit(url)
        assert answer.status_code == 200, answer.text  # was 503 storage_busy after the 10 s busy wait
        assert took < 6, f"the submit waited {took:.1f} s behind a lock the limit bounds at 2 s"
        assert frozen.wait(timeout=5) == -signal.SIGKILL, "the frozen worker was ended with SIGKILL"
    finally:
        frozen.kill()
    assert f"worker process {frozen.pid} held the queue's write lock" in processes.log(processes.server_proc)
    db = store.connect(db_path)
    try:
        assert db.get(answer.json()["task_id"]) is not None, "the acknowledged task is stored"
    finally:
        db.close()


def test_the_watchdog_names_a_process_that_is_not_a_worker_and_leaves_it_alone(db_path, caplog):
    holder = frozen_writer(db_path, as_worker=False)
    try:
        assert write_lock.holder(db_path) == holder.pid
        watchdog = write_lock.Watchdog(db_path, 1.0, lambda: store.connect(db_path))
        with caplog.at_level(logging.ERROR, "mflux_server"):
            assert watchdog.look(now=0.0) is None
            assert watchdog.look(now=5.0) is None and watchdog.look(now=6.0) is None
        assert holder.poll() is None, "a process that is not a worker is never stopped"
        named = [r.getMessage() for r in caplog.records if str(holder.pid) in r.getMessage()]
        assert len(named) == 1 and "not a worker" in named[0], named  # named once, not at every look
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()
    assert write_lock.holder(db_path) is None, "a dead holder's lock is gone"


def test_a_worker_that_commits_often_is_not_mistaken_for_a_frozen_one(db_path):
    watchdog = write_lock.Watchdog(db_path, 1.0, lambda: store.connect(db_path))
    db = store.connect(db_path)
    busy = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from mflux_server import store
        db = store.connect({db_path!r})
        worker = db.register_worker("synthetic", "schnell", None)
        while True:
            db.heartbeat(worker)
    """)], cwd=Path(__file__).parents[2])
    try:
        time.sleep(1.0)
        killed = []
        for t in range(12):  # 6 s of the watchdog's clock at a writer that never stops writing
            # Real time passes between looks (a quarter second), as it does between the watchdog's own looks:
            # looks milliseconds apart could find the WAL unchanged while the busy writer waited for a core.
            time.sleep(0.25)
            killed.append(watchdog.look(now=t * 0.5))
        assert busy.poll() is None and not any(killed), killed
    finally:
        busy.kill()
        busy.wait()
        db.close()


@pytest.mark.parametrize("mid_pipeline", [False, True], ids=["idle in its transaction", "stopped mid-pipeline"])
def test_on_postgresql_a_session_frozen_in_a_write_is_ended(processes: Processes, postgres_server, mid_pipeline):
    # Idle in its transaction, the server's own timeout ends it; stopped mid-pipeline (before its Sync the session
    # is reading, and that timeout is not armed), the API's watchdog has the server end it.
    limit = 2.0
    url_db = postgres_server.create_database()
    store.open_migrated(url_db).close()
    pg_processes = Processes(processes.workdir, url_db)
    try:
        url = pg_processes.server("--write-lock-limit", str(limit))
        frozen = frozen_writer(url_db, as_worker=True, limit=limit, mid_pipeline=mid_pipeline)
        try:
            answer, took = timed_submit(url)
            assert answer.status_code == 200, answer.text  # waited for the lock without end before
            assert took < limit + 4, f"the submit waited {took:.1f} s behind a session the server ends at {limit} s"
        finally:
            frozen.kill()
            frozen.wait()
        assert pg_processes.server_proc is not None
        if mid_pipeline:
            assert "its client stopped inside a write; ended it" in pg_processes.log(pg_processes.server_proc)
    finally:
        pg_processes.stop_all()
