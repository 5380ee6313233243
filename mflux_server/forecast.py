"""The cost model: how long a task takes, fitted to the worker's measured timings, and how long a task waits."""

from __future__ import annotations

import bisect
import functools
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, NamedTuple

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
# Higher-priority tasks that arrive while a task waits also go ahead of it. From the last ARRIVAL_WINDOW
# seconds of submissions we know their rate and mean engine time; a waiting task's forecast adds the
# OVERTAKING_QUANTILE-th percentile of the Poisson number of such arrivals during its wait, times their
# mean time. Overtaking work is skewed (often little, sometimes much: sizes vary and every overtaker
# lengthens the wait), and the forecast with the smallest expected relative error of a skewed quantity
# lies below its median: on the benchmark trace the 30th percentile cut the error at submit from 9.7% to
# 8.6% (bench/explanations.md). Their load is capped so a burst cannot make forecasts explode.
OVERTAKING_QUANTILE = 0.3
ARRIVAL_WINDOW = 600.0
MIN_ARRIVAL_SPAN = 30.0
MAX_PRIORITY_LOAD = 0.8
# Fresh submissions are read past the snapshot each request; beyond this many, fold them into a new one.
MAX_UNSNAPSHOTTED = 32
# A size measured this many times is forecast from its own mean rather than from the fitted curve.
MIN_SAMPLES_FOR_MEAN = 3


def megapixels(width: int, height: int) -> float:
    """Pixel count in units of 2**20."""
    return width * height / 2**20


def _poly(coef: tuple[float, float, float], mp: float) -> float:
    return coef[0] + coef[1] * mp + coef[2] * mp * mp


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Solve a small linear system by Gaussian elimination with partial pivoting; None when singular."""
    n = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= factor * a[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][c] * out[c] for c in range(r + 1, n))) / a[r][r]
    return out


Point = tuple[float, float, float]  # (mp, mean seconds, weight)


def _fit_poly(points: list[Point], degree: int) -> tuple[float, float, float] | None:
    """Weighted least squares of seconds on 1, mp, … mp^degree; coefficients padded to (a, b, c)."""
    size = degree + 1
    m = [[0.0] * size for _ in range(size)]
    v = [0.0] * size
    for mp, mean, weight in points:
        x = [mp**k for k in range(size)]
        for i in range(size):
            v[i] += weight * x[i] * mean
            for j in range(size):
                m[i][j] += weight * x[i] * x[j]
    solved = _solve(m, v)
    if solved is None:
        return None
    return tuple(solved + [0.0] * (3 - size))  # type: ignore[return-value]


def _fit_ratio(points: list[Point], prior: tuple[float, float, float]) -> tuple[float, float, float]:
    """The prior's shape, scaled to the measurements."""
    ratios = [(mean / _poly(prior, mp), weight) for mp, mean, weight in points if _poly(prior, mp) > 0]
    ratio = sum(r * w for r, w in ratios) / sum(w for _, w in ratios) if ratios else 1.0
    return (prior[0] * ratio, prior[1] * ratio, prior[2] * ratio)


@dataclass
class KindModel:
    """The fitted cost of one kind (step, before, after, encode) for one model."""

    prior: tuple[float, float, float]
    means: dict[float, tuple[float, int]] = field(default_factory=dict)  # mp -> (mean seconds, n)
    coef: tuple[float, float, float] | None = None
    ratio: float | None = None
    shape: str = "prior"

    @classmethod
    def fit(cls, prior: tuple[float, float, float], samples: dict[float, tuple[float, int]]) -> KindModel:
        """Pick, by leave-one-out error over the measured sizes, the scaled prior or a polynomial of degree 0–2."""
        model = cls(prior=prior, means=samples)
        if not samples:
            return model
        # Relative weights (we care about percentage error), damped in the sample count.
        points = [(mp, mean, math.sqrt(n) / mean**2) for mp, (mean, n) in samples.items() if mean > 0]
        if not points:
            return model
        scaled = _fit_ratio(points, prior)
        model.ratio = _poly(scaled, 1.0) / _poly(prior, 1.0) if _poly(prior, 1.0) else None
        candidates = {"scaled prior": lambda pts: _fit_ratio(pts, prior)}
        for degree in range(3):
            candidates[f"degree {degree}"] = lambda pts, d=degree: _fit_poly(pts, d)
        best, best_error = "scaled prior", None
        for name, fitter in candidates.items():
            params = 1 if name == "scaled prior" else int(name[-1]) + 1
            if len(points) < params + 1:
                continue  # too few sizes to judge this shape by leaving one out
            error = 0.0
            for i, (mp, mean, weight) in enumerate(points):
                coef = fitter(points[:i] + points[i + 1:])
                predicted = _poly(coef, mp) if coef else -1.0
                error += weight * mean**2 * (((predicted - mean) / mean) ** 2 if predicted > 0 else 100.0)
            if best_error is None or error < best_error * 0.98:  # a more complex shape must clearly win
                best, best_error = name, error
        model.coef = candidates[best](points) or scaled
        model.shape = best
        return model

    def seconds(self, mp: float) -> float:
        """Predicted seconds at this pixel count."""
        measured = self.means.get(mp)
        if measured and measured[1] >= MIN_SAMPLES_FOR_MEAN:
            return measured[0]
        if self.coef is not None and self.means:
            # Inside the measured sizes, trust the fit. Beyond them, polynomials can run wild: carry the fit's
            # level at the nearest edge along the prior's shape, unless the fit's own curve stays within 2× of that.
            edge = min(max(mp, min(self.means)), max(self.means))
            fitted = _poly(self.coef, edge)
            if fitted > 0:
                if edge == mp or _poly(self.prior, edge) <= 0:
                    return fitted
                along_prior = fitted * _poly(self.prior, mp) / _poly(self.prior, edge)
                own = _poly(self.coef, mp)
                return own if along_prior / 2 <= own <= along_prior * 2 else along_prior
        if self.ratio is not None:
            return _poly(self.prior, mp) * self.ratio
        return _poly(self.prior, mp)


@dataclass
class CostModel:
    """Per model name, the fitted cost of each kind; predicts task durations."""

    kinds: dict[str, dict[str, KindModel]]
    measured: bool

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> CostModel:
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


@functools.lru_cache(maxsize=4096)
def poisson_quantile(mean: float, q: float) -> int:
    """The smallest k with P(Poisson(mean) <= k) >= q (exact up to a mean of 200, normal approximation above)."""
    if mean <= 0:
        return 0
    if mean > 200:
        return max(int(mean + NormalDist().inv_cdf(q) * math.sqrt(mean) + 0.5), 0)
    term = cumulative = math.exp(-mean)
    k = 0
    while cumulative < q:
        k += 1
        term *= mean / k
        cumulative += term
    return k


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
    def build(cls, conn: sqlite3.Connection, cost: CostModel) -> QueueSnapshot:
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


class Forecaster:
    """Keeps a fitted CostModel and a recent QueueSnapshot, so a status request costs a few indexed reads."""

    def __init__(self, min_refit_interval: float = 0.5, connect: Callable[[], sqlite3.Connection] | None = None,
                 reprice_after: float = 5.0):
        self._lock = threading.Lock()
        self._model: CostModel | None = None
        self._version: tuple[float, int] | None = None
        self._checked_at = 0.0
        self._interval = min_refit_interval
        self._snapshot: QueueSnapshot | None = None
        self._snapshot_model: CostModel | None = None
        self._built_at = 0.0
        self._reprice_after = reprice_after
        # With a connection factory, a stale snapshot is rebuilt on a background thread while requests
        # keep answering from the previous one (corrected for claims), so no request pays for the rebuild.
        self._connect = connect
        self._rebuilding = False
        self._arrivals: deque[tuple[float, int, tuple]] = deque()  # (created_at, priority, (model, w, h, steps, count))
        self._arrivals_seq = 0
        self._arrival_load: dict[str, dict[int, tuple[float, float]]] = {}

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
        """The waiting queue in claim order, rebuilt when tasks left or re-entered it, and re-priced now and then.

        The worker records timings with every step, so the cost model changes often; re-pricing waits until
        the snapshot is reprice_after seconds old. With a connection factory every rebuild after the first
        runs on a background thread, and requests answer from the previous snapshot meanwhile.
        """
        current = self._snapshot
        if current is not None:
            moved = current.changes != store.queue_changes(conn)
            repriced = self._snapshot_model is not cost and time.monotonic() - self._built_at >= self._reprice_after
            if not (moved or repriced):
                return current
            if self._connect is not None:
                self._rebuild_soon(cost)
                return current
        with self._lock:
            if self._snapshot is current:  # nobody rebuilt it while we waited for the lock
                self._store(QueueSnapshot.build(conn, cost), cost)
                self._observe_arrivals(conn, cost)
            return self._snapshot

    def _rebuild_soon(self, cost: CostModel) -> None:
        with self._lock:
            start = not self._rebuilding
            self._rebuilding = True
        if start:
            threading.Thread(target=self._rebuild, args=(cost,), name="queue-snapshot", daemon=True).start()

    def _store(self, snapshot: QueueSnapshot, cost: CostModel) -> None:
        self._snapshot, self._snapshot_model, self._built_at = snapshot, cost, time.monotonic()

    def _observe_arrivals(self, conn: sqlite3.Connection, cost: CostModel) -> None:
        """Extend the arrival log to the newest task and recompute each priority's recent load."""
        now = time.time()
        for row in store.arrivals_since(conn, self._arrivals_seq, now - ARRIVAL_WINDOW):
            shape = (row["model"], row["width"], row["height"], row["steps"], row["count"])
            self._arrivals.append((row["created_at"], row["priority"], shape))
            self._arrivals_seq = row["seq"]
        # created_at need not grow with seq (clocks step), so prune and measure by time, not by position.
        self._arrivals = deque(a for a in self._arrivals if a[0] >= now - ARRIVAL_WINDOW)
        oldest = min((a[0] for a in self._arrivals), default=now - ARRIVAL_WINDOW)
        span = max(now - oldest, MIN_ARRIVAL_SPAN)
        # Priced with the current model every time: prices from an earlier model (the prior) would linger.
        prices: dict[tuple, float] = {}
        load: dict[str, dict[int, tuple[float, float]]] = {}  # model -> priority -> (arrivals/s, engine s/s)
        for _, priority, shape in self._arrivals:
            seconds = prices.get(shape)
            if seconds is None:
                model, width, height, steps, count = shape
                seconds = prices[shape] = cost.gpu_seconds(
                    {"model": model, "width": width, "height": height, "steps": steps, "count": count})
            by_priority = load.setdefault(shape[0], {})
            rate, work = by_priority.get(priority, (0.0, 0.0))
            by_priority[priority] = (rate + 1 / span, work + seconds / span)
        self._arrival_load = load

    def overtaking_load(self, model: str, priority: int, workers: int) -> float:
        """Engine seconds per second of recent arrivals that would go ahead of a task with this priority."""
        load = sum(work for p, (_, work) in self._arrival_load.get(model, {}).items() if p > priority)
        return min(load / max(workers, 1), MAX_PRIORITY_LOAD)

    def with_overtaking(self, model: str, priority: int, workers: int, ahead: float) -> float:
        """Seconds until a task starts: the work ahead now plus a low percentile of the later arrivals that overtake it."""
        higher = [(rate, work) for p, (rate, work) in self._arrival_load.get(model, {}).items() if p > priority]
        rate = sum(r for r, _ in higher) / max(workers, 1)
        if rate <= 0 or ahead <= 0:
            return ahead
        # Mean engine seconds per overtaker, from the capped load; then T = ahead + quantile(Poisson(rate·T))·mean
        # is found by iterating upwards from T = ahead, which converges because the load is below 1.
        mean_seconds = self.overtaking_load(model, priority, workers) / rate
        start = ahead
        for _ in range(64):
            # Rounded so the cache of quantiles stays small; a thousandth of an arrival changes nothing.
            later = poisson_quantile(round(rate * start, 3), OVERTAKING_QUANTILE) * mean_seconds
            if ahead + later <= start:
                break
            start = ahead + later
        return start

    def _rebuild(self, cost: CostModel) -> None:
        conn = self._connect()
        try:
            snapshot = QueueSnapshot.build(conn, cost)
            # Only this thread touches the arrival log now (one rebuild at a time), so no lock is held
            # while it is re-priced: request threads never wait for it.
            self._observe_arrivals(conn, cost)
            with self._lock:
                self._store(snapshot, cost)
        finally:
            conn.close()
            self._rebuilding = False

    def estimate(self, conn: sqlite3.Connection, task: dict[str, Any], workers: int) -> Estimate:
        """Where a task stands: waiting tasks and running tasks ahead of it, and seconds until its images are done."""
        cost = self.model(conn)
        now = time.time()
        if task["status"] == "processing":
            return Estimate(0, 0, cost.remaining_seconds(task, now))
        if task["status"] != "waiting":
            return Estimate(0, 0, 0.0)
        model, key = task["model"], claim_key(task)
        snap = self.snapshot(conn, cost)
        # The worker claims in claim order, so every task of the snapshot ahead of the first one still waiting
        # has left the queue since: skipping them keeps a snapshot exact between rebuilds.
        front = store.waiting_front(conn, model, snap.max_seq)
        pos, ahead = snap.ahead(model, key)
        if front is None:
            pos, ahead = 0, 0.0
        else:
            gone, gone_seconds = snap.ahead(model, claim_key(front))
            pos, ahead = max(pos - gone, 0), max(ahead - gone_seconds, 0.0)
        # Tasks submitted since the snapshot: a rowid range read, so a new task's position is always exact.
        newer = store.waiting_since(conn, model, snap.max_seq)
        if len(newer) > MAX_UNSNAPSHOTTED and self._connect is not None:
            self._rebuild_soon(cost)
        prices: dict[tuple, float] = {}
        for row in newer:
            if claim_key(row) < key:
                shape = (row["model"], row["width"], row["height"], row["steps"], row["count"])
                if shape not in prices:
                    prices[shape] = cost.gpu_seconds(row)
                pos += 1
                ahead += prices[shape]
        running_ahead = 0
        for running in store.running_tasks(conn):
            if running["model"] != model or running["id"] == task["id"]:
                continue  # the worker may have claimed this very task since its row was read
            running_ahead += 1
            ahead += cost.remaining_gpu_seconds(running, now)
        # Several workers serving this model drain the queue ahead of us in parallel.
        until_start = self.with_overtaking(model, task["priority"], workers, max(ahead, 0.0) / max(workers, 1))
        seconds = until_start + cost.task_seconds(task)
        return Estimate(max(pos, 0), running_ahead, seconds)
