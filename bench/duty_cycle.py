"""Benchmark 1: how much of the wall time the engine spends generating, and the gap between generations."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from bench.results import Result, median, percentile
from mflux_server import store
from mflux_server.core.rows import NewTask, Status
from mflux_server.testing import Processes, wait_for

PER_IMAGE = 0.25  # seconds the synthetic engine takes per image, as the issue fixes it
STEPS = 4
# The worker's closing log line (worker/claim_loop.py: PreviewCost.summary).
PREVIEW_LINE = re.compile(r"previews: (?P<count>\d+) drawn in [\d.]+ ms, (?P<share>[\d.]+)% of")


def run_format(fmt: str, tasks: int, size: int) -> dict:
    """Queue `tasks` tasks, start one worker, and read the generation intervals back from the database."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "queue.db")
        db = store.open_migrated(path)
        db.submit_many([NewTask(prompt=f"duty {i}", model="schnell", width=size, height=size, steps=STEPS,
                                         guidance=3.5, seed=i, count=1, format=fmt, quality=85) for i in range(tasks)])
        procs = Processes(Path(tmp), path)
        try:
            # a fixed 250 ms per image, all of it in the denoising steps
            worker = procs.worker("--synthetic-step", f"{PER_IMAGE / STEPS},0,0", "--synthetic-fixed", "0,0", speed=1.0)
            wait_for(lambda: db.status_counts()[Status.DONE] == tasks, timeout=tasks * PER_IMAGE * 3 + 30,
                     interval=0.2, what="every duty-cycle task")
        finally:
            procs.stop_all()
        previews = PREVIEW_LINE.search(procs.log(worker))
        assert previews is not None, "the worker logs what its previews cost when it stops"
        spans = db.generation_spans()
        finished = db.list_tasks(Status.DONE, tasks, 0)[0]
        first_claim = min(t.started_at for t in finished if t.started_at is not None)
        last_done = max(t.finished_at for t in finished if t.finished_at is not None)
        db.close()
    generating = sum(end - start for start, end in spans)
    gaps = [(spans[i + 1][0] - spans[i][1]) * 1000 for i in range(len(spans) - 1)]
    return {"duty": 100 * generating / (last_done - first_claim), "gap_p50": median(gaps),
            "gap_p99": percentile(gaps, 99), "wall": last_done - first_claim, "generating": generating,
            "previews": int(previews["count"]), "preview_share": float(previews["share"])}


def run(smoke: bool = False) -> Result:
    """Both formats; 200 tasks of 1024² each (smoke: 5 tasks of 256²)."""
    tasks, size = (5, 256) if smoke else (200, 1024)
    result = Result("GPU duty cycle",
                    f"make bench ARGS='--only duty'  ({tasks} tasks, {size}², {PER_IMAGE * 1000:.0f} ms per image)")
    for fmt in ("PNG", "JPEG"):
        found = run_format(fmt, tasks, size)
        result.add(f"{fmt}: duty cycle (generating ÷ wall, first claim → last completion)", found["duty"], "%",
                   "≥ 99%", found["duty"] >= 99)
        result.add(f"{fmt}: gap between generations, p50", found["gap_p50"], "ms", "≤ 5 ms", found["gap_p50"] <= 5)
        result.add(f"{fmt}: gap between generations, p99", found["gap_p99"], "ms")
        result.add(f"{fmt}: previews ({found['previews']} drawn), share of generation time", found["preview_share"], "%",
                   "≤ 1%", found["preview_share"] <= 1)
        result.extra[fmt] = found
    return result
