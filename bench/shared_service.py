"""Benchmark 10: what API keys and quotas cost status polling, and a 20,000-task soak under a store bound."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

from bench.api_load import full_queue, python_clients, wrk
from bench.results import Result, median, percentile
from mflux_server.testing import Processes, fresh_queue

SOAK_TASKS = 20_000
SOAK_POLL = 0.01  # seconds a soak client waits between status polls of its task
# Seconds a soak client pauses between tasks (looking at its image). Flat out, the soak saturated this 2-core VM
# (run queue 4-8, 95% busy, a third of it the load generator's own clients), and status p99 then measured the
# CPU scheduler, not the server: see bench/explanations.md "Shared service".
SOAK_THINK = 0.06
STORE_BOUND = 16 << 20  # --max-store-bytes for the soak
WAL_BOUND = 4 << 20  # the WAL: checkpointed past 1 MB, 4 MB at most (the worker's automatic checkpoint) plus a commit
ROWS_ALLOWANCE = 8 << 20  # task rows, events, indexes, remembered expired ids and free pages not yet given back
FILE_BOUND = STORE_BOUND + WAL_BOUND + ROWS_ALLOWANCE


def composition(db_path: str) -> tuple[int, int]:
    """Bytes of the file's pages that hold image data, and bytes of all other pages (rows, indexes, free)."""
    db = sqlite3.connect(db_path)
    try:
        images = db.execute("SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name IN ('images', 'task_inputs')")
        image_bytes = int(images.fetchone()[0])
        page_count, page_size = (db.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count", "page_size"))
    finally:
        db.close()
    return image_bytes, page_count * page_size - image_bytes


def create_key(db_path: str, name: str) -> str:
    """An admin key made with the real command (admin: the benchmark's tasks were queued without a key)."""
    made = subprocess.run([sys.executable, "-m", "mflux_server", "keys", "create", name, "--admin", "--db", db_path],
                          capture_output=True, text=True, check=True)
    return made.stdout.strip().splitlines()[-1]


def server_cpu_seconds(procs: Processes) -> float:
    """CPU seconds (user and system) the API's processes have used so far."""
    assert procs.server_proc is not None
    master = psutil.Process(procs.server_proc.pid)
    total = 0.0
    for process in (master, *master.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def auth_overhead(smoke: bool, rounds: int = 4) -> tuple[dict, dict]:
    """Flat-out status polling at 10,000 queued on two like queues, one open and one with a key, taking turns.

    A/B in turns: on this VM flat-out runs of the same code varied by more than the overhead (3-58% between
    runs), and the drift spoils any before/after comparison; in turns both sides see the same drift. Each side's
    figures are medians of its `rounds` runs: the rate, and the API processes' CPU time per request, which is
    what a check costs (the rate also moves with what else the VM runs).
    """
    tasks, seconds, connections = (300, 1.0, 8) if smoke else (10_000, 5.0, 32)
    use_wrk = shutil.which("wrk") is not None and not smoke
    args = ("--rate-limit", "1000000000")
    with full_queue(tasks, smoke, args) as (open_procs, open_url, ids, ids_file, _w), \
            full_queue(tasks, smoke, args) as (keyed_procs, keyed_url, keyed_ids, keyed_file, _v):
        key = create_key(keyed_procs.db_path, "bench")

        def load(procs: Processes, url: str, ids: list[str], ids_file: Path, key: str | None) -> dict:
            used = server_cpu_seconds(procs)
            if use_wrk:
                found = wrk(url, ids_file, seconds, connections, 0, key)
            else:
                found = python_clients(url, ids, seconds, connections, 0, key)
            return {**found, "cpu_ms": 1000 * (server_cpu_seconds(procs) - used) / max(1, found["total"])}

        # Warm-ups, not counted: the first seconds run slow (see benchmark 3), and each process learns that
        # keys exist and caches the key on first use.
        load(open_procs, open_url, ids, ids_file, None)
        load(keyed_procs, keyed_url, keyed_ids, keyed_file, key)
        sides: dict[str, list[dict]] = {"open": [], "keyed": []}
        for _ in range(rounds):
            sides["open"].append(load(open_procs, open_url, ids, ids_file, None))
            sides["keyed"].append(load(keyed_procs, keyed_url, keyed_ids, keyed_file, key))

    def summary(runs: list[dict]) -> dict:
        rates = [run["rate"] for run in runs]
        return {"rate": median(rates), "rates": rates, "cpu_ms": median([run["cpu_ms"] for run in runs]),
                "errors": sum(run["errors"] for run in runs)}

    return summary(sides["open"]), summary(sides["keyed"])


def soak(tasks: int, clients: int = 4) -> dict:
    """`tasks` small tasks, each fetched with delete=false, under --max-store-bytes; file size and status latency."""
    sizes: list[int] = []
    latencies: list[float] = []
    errors = [0]
    with fresh_queue() as procs:
        url = procs.server("--max-store-bytes", str(STORE_BOUND), "--housekeeping-interval", "1",
                           "--keep-finished", "86400", http_workers=2)
        procs.worker(speed=2000)
        stop = threading.Event()
        latest: list[str] = []

        def watch_size() -> None:
            while not stop.is_set():
                sizes.append(sum(os.path.getsize(p) for p in (procs.db_path, procs.db_path + "-wal") if os.path.exists(p)))
                stop.wait(0.5)

        def poll_status() -> None:
            session = requests.Session()
            while not stop.is_set():
                if latest:
                    started = time.perf_counter()
                    session.get(f"{url}/api/status", params={"task_id": latest[-1]}, timeout=10)
                    latencies.append((time.perf_counter() - started) * 1000)
                stop.wait(0.02)

        def client(count: int) -> None:
            session = requests.Session()
            body = {"prompt": "soak", "width": 256, "height": 256, "steps": 1, "format": "JPEG"}
            for _ in range(count):
                task = session.post(f"{url}/api/generate", json=body, timeout=30).json()["task_id"]
                latest.append(task)
                for _ in range(2000):
                    state = session.get(f"{url}/api/status", params={"task_id": task}, timeout=30).json()["status"]
                    if state == "done":
                        break
                    time.sleep(SOAK_POLL)
                image = session.get(f"{url}/api/image", params={"task_id": task, "delete": "false"}, timeout=30)
                errors[0] += image.status_code != 200
                time.sleep(SOAK_THINK)

        watchers = [threading.Thread(target=watch_size, daemon=True), threading.Thread(target=poll_status, daemon=True)]
        for thread in watchers:
            thread.start()
        started = time.monotonic()
        psutil.cpu_percent()  # starts the machine-wide CPU count that the soak's figure reads at its end
        workers = [threading.Thread(target=client, args=(tasks // clients,)) for _ in range(clients)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        elapsed = time.monotonic() - started
        cpu_busy = psutil.cpu_percent()
        time.sleep(2.5)  # one more sweep
        stop.set()
        final = sizes[-1]
        image_bytes, other_bytes = composition(procs.db_path)
    return {"peak": max(sizes), "final": final, "image_pages": image_bytes, "other_pages": other_bytes,
            "p50": median(latencies), "p99": percentile(latencies, 99),
            "errors": errors[0], "seconds": elapsed, "tasks": tasks, "cpu_busy": cpu_busy}


def run(smoke: bool = False) -> Result:
    """Auth overhead at 10,000 queued, then the soak."""
    tasks = 400 if smoke else SOAK_TASKS
    result = Result("Shared service", f"make bench ARGS='--only shared'  (flat-out status polling at 10,000 queued, "
                    "4 runs of 5 s on a queue without keys in turns with 4 on a like queue with an admin key, its quota "
                    f"counted; then {tasks:,} tasks of 256², each fetched with delete=false, from 4 clients that poll "
                    f"every {SOAK_POLL * 1000:.0f} ms and pause {SOAK_THINK * 1000:.0f} ms between tasks, under "
                    f"--max-store-bytes {STORE_BOUND >> 20} MiB, with a status poller beside them)")
    open_run, keyed = auth_overhead(smoke)
    result.add("status requests per second, no keys (median of 4 runs)", open_run["rate"], "/s")
    result.add("status requests per second, with a key and its quota (median of 4)", keyed["rate"], "/s")
    for side, run_set in (("no keys", open_run), ("with a key", keyed)):
        result.add(f"run-to-run spread, {side} (slowest to fastest)",
                   100 * (max(run_set["rates"]) - min(run_set["rates"])) / run_set["rate"], "%")
    result.add("throughput: fewer requests per second with a key than without",
               100 * (1 - keyed["rate"] / open_run["rate"]), "%")
    result.add("API CPU per status request, no keys (median)", open_run["cpu_ms"], "ms")
    result.add("API CPU per status request, with a key and its quota (median)", keyed["cpu_ms"], "ms")
    overhead = 100 * (keyed["cpu_ms"] / open_run["cpu_ms"] - 1)
    result.add("auth and quota overhead: API CPU per status request", overhead, "%", "≤ 10%", overhead <= 10)
    result.add("errors with the key", keyed["errors"], "", "0", keyed["errors"] == 0)
    soaked = soak(tasks)
    result.add("soak: tasks", soaked["tasks"], "")
    result.add("soak: tasks per second", soaked["tasks"] / soaked["seconds"], "/s")
    result.add("soak: CPU busy, whole machine (server, worker and clients)", soaked["cpu_busy"], "%")
    result.add("soak: image fetch errors", soaked["errors"], "", "0", soaked["errors"] == 0)
    result.add("soak: peak database file (with WAL)", soaked["peak"] / 2**20, "MB",
               f"≤ {FILE_BOUND / 2**20:.0f} MB (store bound + WAL + rows)", soaked["peak"] <= FILE_BOUND)
    result.add("soak: database file at the end", soaked["final"] / 2**20, "MB")
    result.add("soak: of which image pages", soaked["image_pages"] / 2**20, "MB",
               f"≤ {STORE_BOUND / 2**20:.0f} MB (--max-store-bytes)", soaked["image_pages"] <= STORE_BOUND)
    result.add("soak: of which rows, indexes and free pages", soaked["other_pages"] / 2**20, "MB",
               f"≤ {ROWS_ALLOWANCE / 2**20:.0f} MB", soaked["other_pages"] <= ROWS_ALLOWANCE)
    result.add("soak: status latency p50", soaked["p50"], "ms")
    result.add("soak: status latency p99", soaked["p99"], "ms", "≤ 50 ms", soaked["p99"] <= 50)
    return result
