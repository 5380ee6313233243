"""Benchmark 2: from submit to processing with an idle worker, and the idle worker's CPU use."""

from __future__ import annotations

import time

import psutil
import requests

from bench.results import Result, median, percentile
from mflux_server import store
from mflux_server.core.rows import Status
from mflux_server.store import Store
from mflux_server.testing import fresh_queue, wait_for


def started_at(db: Store, task_id: str) -> float | None:
    """When the worker claimed the task (None while it waits)."""
    task = db.get(task_id)
    return task.started_at if task else None


def status_of(db: Store, task_id: str) -> Status | None:
    """The task's status now (None once deleted)."""
    task = db.get(task_id)
    return task.status if task else None


def run(smoke: bool = False) -> Result:
    """Submit tasks one at a time over HTTP to an idle worker; then watch the idle worker's CPU."""
    samples, idle_seconds = (5, 1.0) if smoke else (200, 20.0)
    result = Result("Dispatch latency", f"make bench ARGS='--only dispatch'  ({samples} submits, {idle_seconds:.0f} s idle)")
    with fresh_queue() as procs:
        db = store.connect(procs.db_path)
        try:
            url = procs.server()
            # the production heartbeat and staleness (the harness's defaults are sped up for the tests)
            worker = procs.worker("--heartbeat-interval", "2", "--stale-after", "15", speed=1000.0)
            session = requests.Session()
            latencies = []
            for i in range(samples):
                time.sleep(0.05)  # let the worker settle back into its idle wait
                submitted = time.time()
                task_id = session.post(url + "/api/generate", json={"prompt": f"d{i}", "width": 128, "height": 128,
                                                                      "steps": 1}).json()["task_id"]
                # wait_for polls right away, so closing over this iteration's task_id is safe
                started = wait_for(lambda: started_at(db, task_id), timeout=10, interval=0.001)  # noqa: B023
                latencies.append((started - submitted) * 1000)
                wait_for(lambda: status_of(db, task_id) == Status.DONE, timeout=10, interval=0.002)  # noqa: B023
            time.sleep(1.0)
            process = psutil.Process(worker.pid)
            before = process.cpu_times()
            time.sleep(idle_seconds)
            after = process.cpu_times()
        finally:
            db.close()
    idle_cpu = 100 * ((after.user - before.user) + (after.system - before.system)) / idle_seconds
    p50, p99 = median(latencies), percentile(latencies, 99)
    result.add("submit → processing, p50", p50, "ms", "≤ 20 ms", p50 <= 20)
    result.add("submit → processing, p99", p99, "ms", "≤ 100 ms", p99 <= 100)
    result.add("idle worker CPU (% of one core)", idle_cpu, "%", "≤ 2%", idle_cpu <= 2)
    return result
