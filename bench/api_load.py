"""Benchmarks 3 and 5: /api/status under 32 concurrent clients with 10,000 queued tasks; peak RSS meanwhile."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import requests

from bench.results import Result, median, percentile
from mflux_server import store
from mflux_server.core.rows import NewTask
from mflux_server.testing import Processes

WRK_SCRIPT = """
%s
local ids = {}
for line in io.lines("%s") do ids[#ids + 1] = line end
math.randomseed(os.time())
local pause_ms = %s
request = function()
  return wrk.format("GET", "/api/status?task_id=" .. ids[math.random(#ids)])
end
if pause_ms > 0 then
  -- paced clients: an exponential pause between a response and the next request (Poisson-like arrivals)
  delay = function() return -math.log(1 - math.random()) * pause_ms end
end
"""
# Per-connection mean pause that offers ~1,150 requests/s from 32 connections at a few ms of latency.
PACED_PAUSE_MS = 22
SUBMIT_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"prompt": "more", "width": 512, "height": 512}'
wrk.headers["Content-Type"] = "application/json"
delay = function() return %d end
"""
SUBMITTERS = 2
SUBMIT_INTERVAL_MS = 100
# Writing 10,000 rows leaves the page cache busy and the processes cold for a few seconds: measured
# windows in that time ran at a quarter of the steady rate, so the load starts after this pause.
SETTLE_SECONDS = 5.0


def fill_queue(path: str, tasks: int) -> list[str]:
    """Insert waiting tasks of mixed sizes and priorities in one transaction; returns their ids."""
    db = store.open_migrated(path)
    rnd = random.Random(3)
    tasks_to_add = [NewTask(prompt=f"load {i}", model="schnell", width=rnd.choice([512, 768, 1024]),
                            height=rnd.choice([512, 1024]), steps=rnd.randint(2, 8), guidance=3.5, seed=i,
                            count=rnd.randint(1, 2), format="JPEG", quality=85, priority=int(rnd.random() < 0.2))
                    for i in range(tasks)]
    ids = db.submit_many(tasks_to_add)
    db.close()
    return ids


def wrk_command(url: str, script: Path, seconds: float, connections: int, threads: int = 2) -> list[str]:
    """The wrk command line for a Lua script."""
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "-s", str(script), url]


def wrk(url: str, ids_file: Path, seconds: float, connections: int, pause_ms: float = 0, key: str | None = None) -> dict:
    """Drive GET /api/status for random tasks with wrk (flat out, or paced; with an API key if given); returns
    rate, latencies, errors."""
    script = ids_file.with_suffix(".lua")
    header = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    script.write_text(WRK_SCRIPT % (header, ids_file, pause_ms))
    out = subprocess.run(wrk_command(url, script, seconds, connections), capture_output=True, text=True,
                         check=True).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> dict:
    """Rate, p50, p99 (ms), errors and request count from wrk --latency output."""

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    sockets = [(kind, int(n)) for kind, n in re.findall(r"(connect|read|write|timeout) (\d+)", out)]
    kinds = [f"{kind} {n}" for kind, n in sockets if n] + ([f"non-2xx {non_2xx}"] if non_2xx else [])
    return {"rate": rate, "p50": ms("50"), "p99": ms("99"), "errors": non_2xx + sum(n for _, n in sockets),
            "error_kinds": kinds, "total": total, "raw": out}


def python_clients(url: str, ids: list[str], seconds: float, connections: int, pause_ms: float = 0,
                   key: str | None = None) -> dict:
    """The same load from Python threads (the smoke run, or where wrk is not installed); slower than wrk."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    latencies: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                ok = session.get(url + "/api/status", params={"task_id": random.choice(ids)}, headers=headers,
                                 timeout=5).status_code == 200
            except requests.RequestException:
                ok = False
            latencies.append((time.perf_counter() - started) * 1000)
            errors[0] += not ok
            if pause_ms:
                time.sleep(random.expovariate(1000 / pause_ms))

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rate": len(latencies) / seconds, "p50": median(latencies), "p99": percentile(latencies, 99),
            "errors": errors[0], "total": len(latencies)}


class PeakRss:
    """Samples the resident memory of processes (and their children) until stopped; keeps each one's peak."""

    def __init__(self, roots: dict[str, int], interval: float = 0.2):
        self.roots = roots
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.interval = interval

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name, pid in self.roots.items():
                try:
                    root = psutil.Process(pid)
                    family = [(name, root)] + [(f"{name} child {c.pid}", c) for c in root.children()]
                    for label, proc in family:
                        rss = proc.memory_info().rss / 2**20
                        self.peaks[label] = max(self.peaks.get(label, 0.0), rss)
                except psutil.NoSuchProcess:
                    pass

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def submitter(url: str, stop: threading.Event, latencies: list[float], errors: list[int], interval: float) -> None:
    """Submit a task every `interval` seconds, timing each POST."""
    session = requests.Session()
    while not stop.is_set():
        started = time.perf_counter()
        response = session.post(url + "/api/generate", json={"prompt": "more", "width": 512, "height": 512}, timeout=10)
        latencies.append((time.perf_counter() - started) * 1000)
        errors[0] += response.status_code != 200
        stop.wait(interval)


def phase(url: str, ids: list[str], ids_file: Path, seconds: float, connections: int, pause_ms: float,
          use_wrk: bool) -> dict:
    """One load phase: pollers (flat out, or paced) plus two submitters; returns both sides' figures."""
    if use_wrk:
        # A second wrk submits: Python clients on these 2 busy cores would add their own CPU waits to the
        # latency they measure (observed: a few ms at p50).
        script = ids_file.with_name("submit.lua")
        script.write_text(SUBMIT_SCRIPT % SUBMIT_INTERVAL_MS)
        submits = subprocess.Popen(wrk_command(url + "/api/generate", script, seconds, SUBMITTERS, threads=1),
                                   stdout=subprocess.PIPE, text=True)
        load = wrk(url, ids_file, seconds, connections, pause_ms)
        posted = parse_wrk(submits.communicate()[0])
        load.update(submit_p50=posted["p50"], submit_p99=posted["p99"], submits=posted["total"],
                    errors=load["errors"] + posted["errors"],
                    error_kinds=[f"status {k}" for k in load["error_kinds"]] + [f"submit {k}" for k in posted["error_kinds"]])
        return load
    stop = threading.Event()
    submit_ms: list[float] = []
    submit_errors = [0]
    submitters = [threading.Thread(target=submitter, args=(url, stop, submit_ms, submit_errors, SUBMIT_INTERVAL_MS / 1000))
                  for _ in range(SUBMITTERS)]
    for t in submitters:
        t.start()
    load = python_clients(url, ids, seconds, connections, pause_ms)
    stop.set()
    for t in submitters:
        t.join()
    load.update(submit_p50=median(submit_ms), submit_p99=percentile(submit_ms, 99), submits=len(submit_ms),
                errors=load["errors"] + submit_errors[0],
                error_kinds=[f"{name} failed {n}" for name, n in (("status", load["errors"]), ("submit", submit_errors[0]))
                             if n])
    return load


def add_beside(result: Result, alone: dict, paced: dict, ratio: float | None = None) -> None:
    """Benchmark 3's paced figures beside other load, with the same load alone in the same run for reference
    (`ratio`: the p99 ratio when it was measured otherwise than from these two phases)."""
    ratio = paced["p99"] / alone["p99"] if ratio is None else ratio
    result.add("paced status requests per second beside them", paced["rate"], "/s", "≥ 1,000/s", paced["rate"] >= 1000)
    result.add("status latency p99 of the same load without them", alone["p99"], "ms")
    result.add("status latency p99 beside them", paced["p99"], "ms", "≤ 50 ms", paced["p99"] <= 50)
    result.add("p99 beside them ÷ p99 without them", ratio, "×", "≤ 1.25", ratio <= 1.25)
    result.add("submit latency p50 beside them", paced["submit_p50"], "ms", "≤ 10 ms", paced["submit_p50"] <= 10)
    result.add("errors of the other clients", paced["errors"], "", "0", paced["errors"] == 0)


@contextmanager
def full_queue(tasks: int, smoke: bool, server_args: tuple[str, ...] = (), worker_args: tuple[str, ...] = ()
               ) -> Iterator[tuple[Processes, str, list[str], Path, subprocess.Popen[bytes]]]:
    """`tasks` waiting tasks, the API (2 processes) and a real-time worker: yields the processes, the URL, the task
    ids (also written to a file, one per line, for wrk) and the worker."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "queue.db")
        ids = fill_queue(path, tasks)
        ids_file = Path(tmp) / "ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        procs = Processes(Path(tmp), path)
        try:
            url = procs.server(*server_args, http_workers=2)
            worker = procs.worker(*worker_args, speed=1.0)  # real-time synthetic tasks: the queue stays ~10,000 deep
            time.sleep(0 if smoke else SETTLE_SECONDS)
            yield procs, url, ids, ids_file, worker
        finally:
            procs.stop_all()


def run(smoke: bool = False) -> Result:
    """10,000 queued tasks and a running worker; 32 pollers flat out, then paced, each with 2 submitters, 30 s."""
    tasks, seconds, connections = (300, 1.0, 8) if smoke else (10_000, 30.0, 32)
    use_wrk = shutil.which("wrk") is not None and not smoke
    driver = "wrk" if use_wrk else "Python threads"
    result = Result("API under load", f"make bench ARGS='--only load'  ({tasks:,} queued, {connections} pollers via "
                                      f"{driver} for {seconds:.0f} s flat out, then {seconds:.0f} s paced; 2 submitters)")
    with full_queue(tasks, smoke) as (procs, url, ids, ids_file, worker):
        with PeakRss({"API": procs.server_proc.pid, "worker": worker.pid}) as memory:
            flat = phase(url, ids, ids_file, seconds, connections, 0, use_wrk)
            paced = phase(url, ids, ids_file, seconds, connections, PACED_PAUSE_MS, use_wrk)
    for name, found in (("flat out", flat), ("paced", paced)):
        result.add(f"{name}: status requests per second", found["rate"], "/s", "≥ 1,000/s", found["rate"] >= 1000)
        result.add(f"{name}: status latency p50", found["p50"], "ms")
        result.add(f"{name}: status latency p99", found["p99"], "ms", "≤ 50 ms", found["p99"] <= 50)
        result.add(f"{name}: errors (non-2xx, socket, failed submits)", found["errors"], "", "0", found["errors"] == 0)
        result.add(f"{name}: submit latency p50, {tasks:,} queued", found["submit_p50"], "ms", "≤ 10 ms",
                   found["submit_p50"] <= 10)
        result.add(f"{name}: submit latency p99", found["submit_p99"], "ms")
    result.extra["requests"] = flat["total"] + paced["total"]
    memory_result = Result("Memory", result.command + " (RSS sampled every 0.2 s during benchmark 3)")
    children = sorted(k for k in memory.peaks if k.startswith("API child"))
    labels = {"API": "API, gunicorn master", "worker": "worker (synthetic engine)"}
    labels.update({k: f"API, server process {i + 1} of {len(children)}" for i, k in enumerate(children)})
    for key, peak in sorted(memory.peaks.items(), key=lambda kv: labels[kv[0]]):
        memory_result.add(f"peak RSS, {labels[key]}", peak, "MB", "≤ 100 MB", peak <= 100)
    result.extra["memory"] = memory_result
    if not use_wrk:
        result.notes.append("Python-thread clients share the 2 cores with the server, so these figures understate it.")
    return result
