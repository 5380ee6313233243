"""Benchmark 11: SQLite and PostgreSQL side by side: claims by 8 processes, dispatch, status at 10,000 queued,
and the duty cycle of 2 workers as 2 "hosts" (separate processes talking TCP to the database)."""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from bench import api_load
from bench.results import Result, median, percentile
from mflux_server import store
from mflux_server.core.rows import NewTask, Status, StoredImage
from mflux_server.testing import Processes, wait_for
from mflux_server.testing_postgres import PostgresServer, why_unavailable

STORES = ("sqlite", "postgresql")
CLAIMERS = 8
PER_IMAGE = 0.25  # seconds per synthetic image in the duty-cycle run, as benchmark 1
# Pollers asking every ~100 ms each (32 of them offer ~300 requests/s): the load a latency is quoted at. Flat
# out, a closed loop of 32 clients waits connections ÷ throughput per request, whatever the store does.
POLL_PAUSE_MS = 100


def tiny(i: int) -> NewTask:
    """A small task: the claim and its writes are what is measured, not generation."""
    return NewTask(prompt=f"tiny {i}", model="schnell", width=64, height=64, steps=1, guidance=3.5, seed=i, count=1,
                   format="PNG", quality=85)


@contextmanager
def queue_on(kind: str, server: PostgresServer | None) -> Iterator[tuple[str, Path]]:
    """A fresh, migrated queue on one store, and a scratch folder for its processes."""
    with tempfile.TemporaryDirectory() as tmp:
        target = str(Path(tmp) / "queue.db") if kind == "sqlite" else server.create_database()  # type: ignore[union-attr]
        store.open_migrated(target).close()
        yield target, Path(tmp)


def _claimer(target: str, worker: str, ready, go, out) -> None:  # type: ignore[no-untyped-def]
    db = store.connect(target)
    ready.put(worker)
    go.wait()
    claimed = []
    while (task := db.claim_next(worker, "schnell", "synthetic")) is not None:
        now = time.time()
        db.complete(task.id, worker, [StoredImage(0, task.seed, "image/png", b"x", now, now)])
        claimed.append(task.id)
    out.put((claimed, time.time()))
    db.close()


def claims(target: str, tasks: int) -> dict:
    """8 processes claim and complete `tasks` tiny tasks as fast as they can; claims per second, double claims."""
    db = store.connect(target)
    db.submit_many([tiny(i) for i in range(tasks)])
    db.close()
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claimer, args=(target, f"c{i}", ready, go, out)) for i in range(CLAIMERS)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    started = time.time()
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    ids = [task_id for claimed, _ in results for task_id in claimed]
    ended = max(at for _, at in results)
    return {"rate": len(ids) / (ended - started), "double": len(ids) - len(set(ids)), "claimed": len(ids),
            "busy": sum(1 for claimed, _ in results if claimed)}


def dispatch(target: str, tmp: Path, samples: int) -> dict:
    """Submit → processing over HTTP with an idle worker (production heartbeat), one task at a time."""
    procs = Processes(tmp, target)
    db = store.connect(target)
    try:
        url = procs.server()
        procs.worker("--heartbeat-interval", "2", "--stale-after", "15", speed=1000.0)
        session = requests.Session()
        latencies = []
        for i in range(samples):
            time.sleep(0.05)  # the worker settles back into its idle wait
            submitted = time.time()
            task_id = session.post(url + "/api/generate", json={"prompt": f"d{i}", "width": 128, "height": 128,
                                                                  "steps": 1}).json()["task_id"]
            started = wait_for(lambda: getattr(db.get(task_id), "started_at", None),  # noqa: B023
                               timeout=10, interval=0.001)
            latencies.append((started - submitted) * 1000)
            wait_for(lambda: db.get(task_id).status == Status.DONE, timeout=10, interval=0.002)  # noqa: B023
    finally:
        db.close()
        procs.stop_all()
    return {"p50": median(latencies), "p99": percentile(latencies, 99)}


def status_load(target: str, tmp: Path, tasks: int, seconds: float, connections: int) -> dict:
    """GET /api/status for random tasks among `tasks` queued, 2 API processes, a real-time worker running: flat
    out for throughput, then paced pollers for latency."""
    ids = api_load.fill_queue(target, tasks)
    if store.is_server_url(target):
        # Planner statistics and the visibility map for the 10,000 rows just written, as autovacuum leaves them
        # within its first minute.
        db = store.connect(target)
        db.session.execute("VACUUM ANALYZE")
        db.close()
    ids_file = tmp / "ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    procs = Processes(tmp, target)
    try:
        url = procs.server(http_workers=2)
        procs.worker(speed=1.0)
        time.sleep(2.0)
        drive = api_load.wrk if shutil.which("wrk") else api_load.python_clients
        load = ids_file if drive is api_load.wrk else ids
        drive(url, load, min(seconds, 5.0), connections)  # warm-up: both processes build their first snapshot
        flat = drive(url, load, seconds, connections)
        paced = drive(url, load, seconds, connections, POLL_PAUSE_MS)
        return {"rate": flat["rate"], "p99_flat": flat["p99"], "p50": paced["p50"], "p99": paced["p99"],
                "paced_rate": paced["rate"], "errors": flat["errors"] + paced["errors"]}
    finally:
        procs.stop_all()


def duty(target: str, tmp: Path, tasks: int) -> dict:
    """Two workers, each its own process and database session (two "hosts"), on `tasks` tasks of PER_IMAGE s."""
    db = store.connect(target)
    db.submit_many([NewTask(prompt=f"duty {i}", model="schnell", width=256, height=256, steps=4,
                                     guidance=3.5, seed=i, count=1, format="JPEG", quality=85) for i in range(tasks)])
    procs = Processes(tmp, target)
    try:
        for _ in range(2):
            procs.worker("--synthetic-step", f"{PER_IMAGE / 4},0,0", "--synthetic-fixed", "0,0", speed=1.0)
        wait_for(lambda: db.status_counts()[Status.DONE] == tasks, timeout=tasks * PER_IMAGE * 3 + 60,
                 interval=0.2, what="every duty-cycle task")
    finally:
        procs.stop_all()
    finished = db.list_tasks(Status.DONE, tasks, 0)[0]
    # Per worker: its generating time over its own span, first claim to last completion (the second worker
    # starts a moment after the first, and one ends a task after the other: neither is the store's doing).
    by_worker: dict[str, list[tuple[float, float, float, float]]] = {}
    for task in finished:
        image = db.fetch_image(task.id, 0)
        if image is not None and task.worker_id and task.started_at and task.finished_at:
            by_worker.setdefault(task.worker_id, []).append((task.started_at, task.finished_at, image.gen_started,
                                                             image.gen_ended))
    db.close()
    duties = []
    for spans in by_worker.values():
        wall = max(end for _, end, _, _ in spans) - min(start for start, _, _, _ in spans)
        duties.append(100 * sum(gen_end - gen_start for _, _, gen_start, gen_end in spans) / wall)
    return {"duty": min(duties), "mean": sum(duties) / len(duties), "workers": len(duties)}


def run(smoke: bool = False) -> Result:
    """Every measurement on SQLite, then on PostgreSQL (a throwaway server started here)."""
    claim_tasks, samples, queued, seconds, duty_tasks = (200, 5, 300, 1.0, 6) if smoke else (4000, 100, 10_000, 15.0, 80)
    result = Result("Two stores: SQLite and PostgreSQL",
                    f"make bench ARGS='--only stores'  ({CLAIMERS} claiming processes on {claim_tasks:,} tiny tasks; "
                    f"{samples} dispatches; status at {queued:,} queued, 32 clients flat out, then polling every "
                    f"~{POLL_PAUSE_MS} ms, {seconds:.0f} s each; "
                    f"2 workers on {duty_tasks} tasks of {PER_IMAGE * 1000:.0f} ms)")
    reason = why_unavailable()
    if reason is not None:
        result.notes.append(f"PostgreSQL not measured: {reason}")
    server = PostgresServer().start() if reason is None else None
    found: dict[str, dict[str, dict]] = {}
    try:
        for kind in STORES if server else ("sqlite",):
            found[kind] = {}
            with queue_on(kind, server) as (target, _tmp):
                found[kind]["claims"] = claims(target, claim_tasks)
            with queue_on(kind, server) as (target, tmp):
                found[kind]["dispatch"] = dispatch(target, tmp, samples)
            with queue_on(kind, server) as (target, tmp):
                found[kind]["status"] = status_load(target, tmp, queued, seconds, 32)
            with queue_on(kind, server) as (target, tmp):
                found[kind]["duty"] = duty(target, tmp, duty_tasks)
    finally:
        if server:
            server.stop()
    for kind, figures in found.items():
        on_pg = kind == "postgresql"
        name = "PostgreSQL" if on_pg else "SQLite"
        claimed = figures["claims"]
        result.add(f"{name}: claims per second, {CLAIMERS} processes (claim + complete)", claimed["rate"], "/s",
                   "≥ 500/s" if on_pg else "", claimed["rate"] >= 500 if on_pg else None)
        result.add(f"{name}: tasks claimed twice", claimed["double"], "", "0", claimed["double"] == 0)
        result.add(f"{name}: submit → processing, p50", figures["dispatch"]["p50"], "ms",
                   "≤ 10 ms" if on_pg else "", figures["dispatch"]["p50"] <= 10 if on_pg else None)
        result.add(f"{name}: submit → processing, p99", figures["dispatch"]["p99"], "ms")
        status = figures["status"]
        result.add(f"{name}: status requests per second at {queued:,} queued (flat out)", status["rate"], "/s")
        result.add(f"{name}: status latency p99, flat out", status["p99_flat"], "ms")
        result.add(f"{name}: status latency p99, pollers every {POLL_PAUSE_MS} ms ({status['paced_rate']:.0f}/s)",
                   status["p99"], "ms", "≤ 50 ms", status["p99"] <= 50)
        result.add(f"{name}: status errors", status["errors"], "", "0", status["errors"] == 0)
        result.add(f"{name}: duty cycle of the lower of 2 workers (its generating ÷ its wall)", figures["duty"]["duty"], "%",
                   "≥ 99%" if on_pg else "", figures["duty"]["duty"] >= 99 if on_pg else None)
    if "postgresql" in found:
        ratio = found["postgresql"]["status"]["rate"] / found["sqlite"]["status"]["rate"]
        result.add("status throughput, PostgreSQL ÷ SQLite", ratio, "×", "≥ 0.70×", ratio >= 0.7)
    result.extra = found
    return result
