"""Benchmark 14: are the forecast's ranges calibrated? Coverage, width and MAPE on three replayed traces."""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench import traces
from bench.forecast_accuracy import mape
from bench.results import Result
from mflux_server import store
from mflux_server.core.rows import Status
from mflux_server.testing import fresh_queue, wait_for

SKIP = 10  # the first tasks teach the cost model; they are not counted
COVERAGE = (75.0, 90.0)  # a range that is always right is too wide
MAX_WIDTH = 40.0  # median (p90 − p10) ÷ the point forecast, on the steady trace, in percent


@dataclass
class Seen:
    """One task of a replay as its client saw it: the forecast at submit and while it waited."""

    index: int
    task_id: str
    submitted: float
    expected: float
    expected_range: tuple[float, float]
    samples: list[tuple[float, float, float, float, str]] = field(default_factory=list)  # (at, point, low, high, status)
    ended: bool = False


@dataclass
class Replay:
    """What a trace's replay measured, in model seconds."""

    seen: list[Seen]
    finished: dict[str, float]  # task id -> when its images were stored (done tasks only)
    model_ranges: dict[str, tuple[float, float]]  # task id -> the range before calibration, as stored at submit


def replay(trace: traces.Trace) -> Replay:
    """Run a trace against the real API and one synthetic worker, sampling every unfinished task's forecast."""
    seen: list[Seen] = []
    lock = threading.Lock()
    with fresh_queue() as procs, tempfile.TemporaryDirectory() as folder:
        url = procs.server()
        procs.worker(*trace.worker_args, *traces.write_profiles(trace, Path(folder)), speed=trace.speed)
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(url, seen, lock, stop), daemon=True)
        sampler.start()
        db = store.connect(procs.db_path)
        picks = random.Random(3)
        start = time.monotonic()
        session = requests.Session()
        for at, action in trace.actions:
            time.sleep(max(start + at / trace.speed - time.monotonic(), 0))
            if "submit" in action:
                sent = time.time()
                body = requests.post(url + "/api/generate", json=action["submit"], timeout=30).json()
                assert "task_id" in body, (action, body)
                with lock:
                    seen.append(Seen(len(seen), body["task_id"], sent, body["expected_time_seconds"],
                                     tuple(body["expected_time_range"])))  # type: ignore[arg-type]
            else:
                status = Status.PROCESSING if action["cancel"] == "running" else Status.WAITING
                candidates = db.list_tasks(status, 100, 0)[0]
                if candidates:
                    session.delete(f"{url}/api/tasks/{picks.choice(candidates).id}", timeout=10)
        ids = [s.task_id for s in seen]

        def ended() -> bool:
            return all((t := db.get(i)) is not None and t.status in (Status.DONE, Status.CANCELED, Status.ERROR) for i in ids)

        wait_for(ended, timeout=600, interval=0.2, what=f"{trace.name} trace")
        stop.set()
        sampler.join()
        rows = {i: db.get(i) for i in ids}
        model_ranges = {r[0]: (r[1], r[2]) for r in db.session.execute(
            "SELECT id, forecast_low, forecast_high FROM tasks WHERE forecast_low IS NOT NULL").fetchall()}
        db.close()
    finished = {i: t.finished_at for i, t in rows.items() if t is not None and t.status is Status.DONE and t.finished_at}
    return Replay(seen, finished, model_ranges)


def sample(url: str, seen: list[Seen], lock: threading.Lock, stop: threading.Event) -> None:
    """Read the status of up to four unfinished tasks every 50 ms, timing each at the request's midpoint."""
    session = requests.Session()
    picks = random.Random(7)
    while not stop.is_set():
        with lock:
            candidates = [s for s in seen if not s.ended]
        for task in picks.sample(candidates, min(4, len(candidates))):
            sent = time.time()
            try:
                body = session.get(url + "/api/status", params={"task_id": task.task_id}, timeout=10).json()
            except requests.RequestException:  # a kept-alive connection closed under us: next round
                continue
            if body["status"] in ("waiting", "processing"):
                task.samples.append(((sent + time.time()) / 2, body["wait_remaining"], *body["wait_range"], body["status"]))
            else:
                task.ended = True
        stop.wait(0.05)


def inside(low: float, high: float, actual: float) -> bool:
    """Whether an actual time fell inside a range (a millisecond of rounding allowed)."""
    return low - 1e-3 <= actual <= high + 1e-3


def score(trace: traces.Trace, run: Replay, result: Result, width_target: bool) -> dict[str, float]:
    """Add one trace's figures to the result: MAPE, coverage at submit and while waiting, median width."""
    counted = [s for s in run.seen if s.index >= SKIP and s.task_id in run.finished]
    at_submit = [(s, run.finished[s.task_id] - s.submitted) for s in counted]
    waiting = [(point, low, high, run.finished[s.task_id] - at) for s in counted
               for at, point, low, high, status in s.samples if status == "waiting"]
    error = mape([(s.expected, actual) for s, actual in at_submit])
    covered_submit = 100 * statistics.fmean(inside(*s.expected_range, actual) for s, actual in at_submit)
    covered_waiting = 100 * statistics.fmean(inside(low, high, actual) for _, low, high, actual in waiting) if waiting else 0.0
    width = 100 * statistics.median((s.expected_range[1] - s.expected_range[0]) / s.expected for s, _ in at_submit
                                    if s.expected > 0)
    below = 100 * statistics.fmean(actual < s.expected_range[0] - 1e-3 for s, actual in at_submit)
    name = trace.name
    result.add(f"{name}: MAPE of expected_time_seconds at submit", error, "%")
    ok = COVERAGE[0] <= covered_submit <= COVERAGE[1]
    result.add(f"{name}: inside expected_time_range at submit", covered_submit, "%", "75–90%", ok)
    ok = COVERAGE[0] <= covered_waiting <= COVERAGE[1]
    result.add(f"{name}: inside wait_range while waiting", covered_waiting, "%", "75–90%", ok)
    result.add(f"{name}:   share finished before the range at submit (of all)", below, "%")
    if width_target:
        result.add(f"{name}: median range width ÷ forecast at submit", width, "%", f"≤ {MAX_WIDTH:g}%", width <= MAX_WIDTH)
    else:
        result.add(f"{name}: median range width ÷ forecast at submit", width, "%")
    return {"tasks": len(counted), "samples": len(waiting), "canceled": len(run.seen) - len(run.finished)}


def run(smoke: bool = False, only: str | None = None) -> Result:
    """Replay the steady, switching and H100 traces; report each one's calibration."""
    chosen = [traces.steady(16), traces.switching(16), traces.h100(16, speed=40.0)] if smoke else \
        [traces.steady(320), traces.switching(240), traces.h100(160, load=0.6, speed=6.0)]
    chosen = [t for t in chosen if only is None or t.name == only]
    result = Result("Forecast ranges", "make bench ARGS='--only ranges'  (" + "; ".join(
        f"{t.name}: {t.description}" for t in chosen) + ")")
    result.extra = {}
    for trace in chosen:
        replayed = replay(trace)
        result.extra[trace.name] = replayed
        counts = score(trace, replayed, result, width_target=trace.name == "steady")
        result.notes.append(f"{trace.name}: {counts['tasks']} tasks and {counts['samples']} samples while waiting "
                            f"counted (the first {SKIP} left out; {counts['canceled']} canceled or failed).")
    return result
