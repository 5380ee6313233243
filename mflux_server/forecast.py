"""The cost model: how long a task takes, fitted to the worker's measured timings, and how long a task waits."""

from __future__ import annotations

import bisect
import math
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from mflux_server import store

KINDS = ("step", "before", "after", "encode")

# Seconds per kind as a + b·mp + c·mp², mp = width·height / 2**20, used until the worker has measured
# anything. Roughly FLUX.1 at 8-bit on an M2-class Mac: 1024² costs ~3.5 s a step, ~2 s of prompt
# encoding before the loop, ~1 s of VAE decoding after it, and a few hundredths of a second to encode.
PRIOR: dict[str, tuple[float, float, float]] = {
    "step": (0.5, 2.0, 1.0),
    "before": (2.0, 0.0, 0.0),
    "after": (0.2, 0.8, 0.0),
    "encode": (0.01, 0.04, 0.0),
}
# Fresh submissions are read past the snapshot each request; beyond this many, fold them into a new one.
MAX_UNSNAPSHOTTED = 200
# A size measured this many times is forecast from its own mean rather than from the fitted curve.
MIN_SAMPLES_FOR_MEAN = 3


def megapixels(width: int, height: int) -> float:
    """Pixel count in units of 2**20."""
    return width * height / 2**20


def _poly(coef: tuple[float, float, float], mp: float) -> float:
    return coef[0] + coef[1] * mp + coef[2] * mp * mp


def _solve3(m: list[list[float]], v: list[float]) -> tuple[float, float, float] | None:
    """Solve a 3×3 linear system by Cramer's rule; None when it is singular."""

    def det(a: list[list[float]]) -> float:
        return (
            a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
        )

    d = det(m)
    if abs(d) < 1e-12:
        return None
    out = []
    for col in range(3):
        replaced = [[v[r] if c == col else m[r][c] for c in range(3)] for r in range(3)]
        out.append(det(replaced) / d)
    return (out[0], out[1], out[2])


@dataclass
class KindModel:
    """The fitted cost of one kind (step, before, after, encode) for one model."""

    prior: tuple[float, float, float]
    means: dict[float, tuple[float, int]] = field(default_factory=dict)  # mp -> (mean seconds, n)
    coef: tuple[float, float, float] | None = None
    ratio: float | None = None

    @classmethod
    def fit(cls, prior: tuple[float, float, float], samples: dict[float, tuple[float, int]]) -> "KindModel":
        """Fit a + b·mp + c·mp² with three or more sizes, else scale the prior to what was measured."""
        model = cls(prior=prior, means=samples)
        if not samples:
            return model
        weighted = [(mp, mean, n) for mp, (mean, n) in samples.items()]
        ratios = [(mean / _poly(prior, mp), n) for mp, mean, n in weighted if _poly(prior, mp) > 0]
        if ratios:
            model.ratio = sum(r * n for r, n in ratios) / sum(n for _, n in ratios)
        if len(samples) >= 3:
            # Weighted least squares on [1, mp, mp²]; weights sqrt(n) so one size can't drown the rest.
            m = [[0.0] * 3 for _ in range(3)]
            v = [0.0] * 3
            for mp, mean, n in weighted:
                w = math.sqrt(n)
                x = (1.0, mp, mp * mp)
                for i in range(3):
                    v[i] += w * x[i] * mean
                    for j in range(3):
                        m[i][j] += w * x[i] * x[j]
            model.coef = _solve3(m, v)
        return model

    def seconds(self, mp: float) -> float:
        """Predicted seconds at this pixel count."""
        measured = self.means.get(mp)
        if measured and measured[1] >= MIN_SAMPLES_FOR_MEAN:
            return measured[0]
        if self.coef is not None:
            fitted = _poly(self.coef, mp)
            lo, hi = min(self.means), max(self.means)
            # Trust the curve inside the measured range; outside it, only while it stays plausible.
            if fitted > 0 and (lo <= mp <= hi or fitted <= 4 * _poly(self.prior, mp) * (self.ratio or 1)):
                return fitted
        if self.ratio is not None:
            return _poly(self.prior, mp) * self.ratio
        return _poly(self.prior, mp)


@dataclass
class CostModel:
    """Per model name, the fitted cost of each kind; predicts task durations."""

    kinds: dict[str, dict[str, KindModel]]
    measured: bool

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> "CostModel":
        """Fit every (model, kind) from aggregated timing rows."""
        grouped: dict[tuple[str, str], dict[float, tuple[float, int]]] = {}
        for row in rows:
            mp = megapixels(row["width"], row["height"])
            grouped.setdefault((row["model"], row["kind"]), {})[mp] = (row["total"] / row["n"], row["n"])
        kinds: dict[str, dict[str, KindModel]] = {}
        for (model, kind), samples in grouped.items():
            kinds.setdefault(model, {})[kind] = KindModel.fit(PRIOR[kind], samples)
        return cls(kinds=kinds, measured=bool(rows))

    def kind(self, model: str, kind: str) -> KindModel:
        """The fitted cost of one kind, falling back to the prior when this model was never measured."""
        fitted = self.kinds.get(model, {}).get(kind)
        if fitted is not None:
            return fitted
        # Another model measured on this machine says more about its speed than the prior does.
        others = [m[kind] for m in self.kinds.values() if kind in m and m[kind].ratio is not None]
        ratio = sum(o.ratio for o in others) / len(others) if others else None
        return KindModel(prior=PRIOR[kind], ratio=ratio)

    def parts(self, model: str, width: int, height: int) -> dict[str, float]:
        """Seconds for one step and for each fixed cost, at this size."""
        mp = megapixels(width, height)
        return {kind: self.kind(model, kind).seconds(mp) for kind in KINDS}

    def gpu_seconds(self, task: dict[str, Any]) -> float:
        """Seconds a task keeps the engine busy; encoding runs beside the next generation, so it is not here."""
        p = self.parts(task["model"], task["width"], task["height"])
        return task["count"] * (p["before"] + task["steps"] * p["step"] + p["after"])

    def task_seconds(self, task: dict[str, Any]) -> float:
        """Seconds from a task's start until its images are stored: the generation, then its last encode."""
        return self.gpu_seconds(task) + self.parts(task["model"], task["width"], task["height"])["encode"]

    def remaining_gpu_seconds(self, task: dict[str, Any], now: float) -> float:
        """Seconds until a running task frees the engine, from its reported step and when that step finished."""
        p = self.parts(task["model"], task["width"], task["height"])
        steps, step = task["steps"], task["step"]
        elapsed = max(0.0, now - (task["step_at"] or task["started_at"] or now))
        if step <= 0:
            current = max(p["before"] + p["step"] - elapsed, 0.0) + (steps - 1) * p["step"] + p["after"]
        elif step < steps:
            current = max(p["step"] - elapsed, 0.0) + (steps - step - 1) * p["step"] + p["after"]
        else:
            current = max(p["after"] - elapsed, 0.0)
        later_images = max(task["count"] - task["image_index"] - 1, 0)
        return current + later_images * (p["before"] + steps * p["step"] + p["after"])

    def remaining_seconds(self, task: dict[str, Any], now: float) -> float:
        """Seconds until a running task's images are stored."""
        encode = self.parts(task["model"], task["width"], task["height"])["encode"]
        return self.remaining_gpu_seconds(task, now) + encode


class Estimate(NamedTuple):
    """Where a task stands in the queue."""

    pos: int  # waiting tasks that will start before it
    running: int  # tasks of its model running now (ahead of it, if it waits)
    seconds: float  # until its images are stored


def claim_key(task: dict[str, Any]) -> tuple[int, int]:
    """Sort key of claim order: higher priority first, then first in."""
    return (-task["priority"], task["seq"])


@dataclass(frozen=True)
class QueueSnapshot:
    """The waiting tasks of each model in claim order, with prefix sums of their predicted engine time."""

    max_seq: int
    changes: int
    keys: dict[str, list[tuple[int, int]]]
    prefix: dict[str, list[float]]

    @classmethod
    def build(cls, conn: sqlite3.Connection, cost: CostModel) -> "QueueSnapshot":
        """Read every waiting task once (an index-only scan) and sum predicted times in claim order."""
        cursor = conn.cursor()
        cursor.row_factory = None  # plain tuples: several times cheaper than sqlite3.Row for 10,000 rows
        cursor.execute("BEGIN")  # one read snapshot for all three statements
        try:
            rows = cursor.execute(store.sql("waiting_queue")).fetchall()
            max_seq = cursor.execute(store.sql("max_seq")).fetchone()[0]
            changes = cursor.execute(store.sql("queue_changes")).fetchone()[0]
        finally:
            cursor.execute("COMMIT")
        keys: dict[str, list[tuple[int, int]]] = {}
        prefix: dict[str, list[float]] = {}
        shapes: dict[tuple, float] = {}
        for model, priority, seq, width, height, steps, count in rows:
            shape = (model, width, height, steps, count)
            seconds = shapes.get(shape)
            if seconds is None:
                seconds = shapes[shape] = cost.gpu_seconds(
                    {"model": model, "width": width, "height": height, "steps": steps, "count": count})
            model_keys = keys.get(model)
            if model_keys is None:
                model_keys, prefix[model] = keys.setdefault(model, []), [0.0]
            model_prefix = prefix[model]
            model_keys.append((-priority, seq))
            model_prefix.append(model_prefix[-1] + seconds)
        return cls(max_seq=max_seq, changes=changes, keys=keys, prefix=prefix)

    def ahead(self, model: str, key: tuple[int, int]) -> tuple[int, float]:
        """Waiting tasks ahead of a claim key, and their summed engine seconds."""
        keys = self.keys.get(model, [])
        index = bisect.bisect_left(keys, key)
        return index, self.prefix[model][index] if keys else 0.0

    def seconds_of(self, model: str, key: tuple[int, int]) -> float | None:
        """The predicted engine seconds of a task that was waiting in this snapshot, or None."""
        keys = self.keys.get(model, [])
        index = bisect.bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            return self.prefix[model][index + 1] - self.prefix[model][index]
        return None


class Forecaster:
    """Keeps a fitted CostModel and a recent QueueSnapshot, so a status request costs a few indexed reads."""

    def __init__(self, min_refit_interval: float = 0.5, connect: Callable[[], sqlite3.Connection] | None = None):
        self._lock = threading.Lock()
        self._model: CostModel | None = None
        self._version: tuple[float, int] | None = None
        self._checked_at = 0.0
        self._interval = min_refit_interval
        self._snapshot: QueueSnapshot | None = None
        self._snapshot_model: CostModel | None = None
        # With a connection factory, a stale snapshot is rebuilt on a background thread while requests
        # keep answering from the previous one (corrected for claims), so no request pays for the rebuild.
        self._connect = connect
        self._rebuilding = False

    def model(self, conn: sqlite3.Connection) -> CostModel:
        """The current cost model; checks for new timings at most every min_refit_interval seconds."""
        now = time.monotonic()
        if self._model is not None and now - self._checked_at < self._interval:
            return self._model
        with self._lock:
            version = store.timing_version(conn)
            if self._model is None or version != self._version:
                self._model = CostModel.from_rows(store.timing_rows(conn))
                self._version = version
            self._checked_at = now
            return self._model

    def snapshot(self, conn: sqlite3.Connection, cost: CostModel) -> QueueSnapshot:
        """The waiting queue priced with the current model; rebuilt when tasks left or re-entered the queue."""
        current = self._snapshot
        if current is not None and self._snapshot_model is cost and current.changes == store.queue_changes(conn):
            return current
        if current is not None and self._snapshot_model is cost and self._connect is not None:
            self._rebuild_soon(cost)
            return current
        with self._lock:
            if self._snapshot is current:  # nobody rebuilt it while we waited for the lock
                self._store(QueueSnapshot.build(conn, cost), cost)
            return self._snapshot

    def _rebuild_soon(self, cost: CostModel) -> None:
        with self._lock:
            start = not self._rebuilding
            self._rebuilding = True
        if start:
            threading.Thread(target=self._rebuild, args=(cost,), name="queue-snapshot", daemon=True).start()

    def _store(self, snapshot: QueueSnapshot, cost: CostModel) -> None:
        self._snapshot, self._snapshot_model = snapshot, cost

    def _rebuild(self, cost: CostModel) -> None:
        conn = self._connect()
        try:
            snapshot = QueueSnapshot.build(conn, cost)
            with self._lock:
                self._store(snapshot, cost)
        finally:
            conn.close()
            self._rebuilding = False

    def estimate(self, conn: sqlite3.Connection, task: dict[str, Any], workers: int) -> "Estimate":
        """Where a task stands: waiting tasks and running tasks ahead of it, and seconds until its images are done."""
        cost = self.model(conn)
        now = time.time()
        if task["status"] == "processing":
            return Estimate(0, 0, cost.remaining_seconds(task, now))
        if task["status"] != "waiting":
            return Estimate(0, 0, 0.0)
        model, key = task["model"], claim_key(task)
        snap = self.snapshot(conn, cost)
        pos, ahead = snap.ahead(model, key)
        # Tasks submitted since the snapshot: a rowid range read, so a new task's position is always exact.
        newer = store.waiting_since(conn, model, snap.max_seq)
        if len(newer) > MAX_UNSNAPSHOTTED and self._connect is not None:
            self._rebuild_soon(cost)
        for row in newer:
            if claim_key(row) < key:
                pos += 1
                ahead += cost.gpu_seconds(row)
        running_ahead = 0
        for running in store.running_tasks(conn):
            if running["model"] != model or running["id"] == task["id"]:
                continue  # the worker may have claimed this very task since its row was read
            running_ahead += 1
            ahead += cost.remaining_gpu_seconds(running, now)
            queued = snap.seconds_of(model, claim_key(running))
            if queued is not None and claim_key(running) < key:  # claimed since the snapshot: count it once
                pos -= 1
                ahead -= queued
        # Several workers serving this model drain the queue ahead of us in parallel.
        seconds = max(ahead, 0.0) / max(workers, 1) + cost.task_seconds(task)
        return Estimate(max(pos, 0), running_ahead, seconds)

    def wait_seconds(self, conn: sqlite3.Connection, task: dict[str, Any], workers: int) -> float:
        """Seconds until this task's images are done: what runs and waits ahead of it, then itself."""
        return self.estimate(conn, task, workers).seconds
