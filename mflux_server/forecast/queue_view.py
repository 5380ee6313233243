"""The queue view: where a task stands and how long it will take, from the cost model and the queue in the store."""

from __future__ import annotations

import bisect
import operator
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Any, NamedTuple

from mflux_server.core import native
from mflux_server.core.rows import ClaimKey, QueueEntry, QueueRead, Status, Task, Worker
from mflux_server.core.scheduling import Variant, expected_load, expected_lora_change
from mflux_server.forecast.arrivals import ARRIVAL_WINDOW, ArrivalLog
from mflux_server.forecast.calibration import CALIBRATION_TASKS, Calibration
from mflux_server.forecast.cost_model import UNMEASURED_SPREAD, CostModel, correlated_sd
from mflux_server.forecast.policy_replay import ModelQueue, Timeline, timeline
from mflux_server.forecast.policy_replay import Worker as ReplayWorker
from mflux_server.forecast.ranges import HIGH_QUANTILE, LOAD_SPREAD, LOW_QUANTILE, Part, combined, normal
from mflux_server.forecast.signal_cache import SignalCache
from mflux_server.store import Store

# Seconds to load a model never loaded here yet (about FLUX.1 from a local SSD, warm-up included).
DEFAULT_LOAD_SECONDS = 15.0
# Seconds between reads of the recent outcomes the range is calibrated with.
CALIBRATION_INTERVAL = 10.0
# Lower than any task's priority: every arrival of a model counts as overtaking (range of a held model's turn).
ANY_PRIORITY = -(2**62)
# Fresh submissions are read past the snapshot each request; beyond this many, fold them into a new one.
MAX_UNSNAPSHOTTED = 32


class Estimate(NamedTuple):
    """Where a task stands in the queue."""

    pos: int  # waiting tasks that will start before it
    running: int  # tasks of its model running now (ahead of it, if it waits)
    seconds: float  # until its images are stored
    low: float = 0.0  # the range around seconds: its 10th percentile
    high: float = 0.0  # and its 90th
    model_low: float = 0.0  # the range before calibration (kept with the task at submit: the calibration learns it)
    model_high: float = 0.0


@dataclass(frozen=True)
class QueueSnapshot:
    """The waiting tasks of each variant (a model and LoRA set) in claim order, with prefix sums of their predicted
    engine time: a worker claims each variant's tasks in claim order, whichever variant it serves first."""

    max_seq: int
    changes: int
    keys: dict[Variant, list[ClaimKey]]
    created: dict[Variant, list[float]]  # when each was submitted (a multi-model worker's policy depends on it)
    prefix: dict[Variant, list[float]]
    cost: CostModel  # the model the prefix sums were priced with
    built_at: float
    # Which shape (model, size, steps, count) each task is, as an index into samples: one task of each shape.
    # A cost model that learned re-prices the queue from these without reading it again (repriced).
    shapes: dict[Variant, list[int]]
    samples: list[QueueEntry]
    # The latest merge of each variant's queue with what was submitted since (queue), for the next request.
    merged: dict[Variant, tuple[Any, CostModel, ModelQueue]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, read: QueueRead, cost: CostModel, now: float) -> QueueSnapshot:
        """Sum predicted times in claim order over a queue read (pure: the read comes from store.read_queue)."""
        keys: dict[Variant, list[ClaimKey]] = {}
        created: dict[Variant, list[float]] = {}
        shapes: dict[Variant, list[int]] = {}
        shape_ids: dict[tuple[str, int, int, int, int], int] = {}
        samples: list[QueueEntry] = []
        for entry in read.entries:
            shape = (entry.model, entry.width, entry.height, entry.steps, entry.count)
            shape_id = shape_ids.get(shape)
            if shape_id is None:
                shape_id = shape_ids[shape] = len(samples)
                samples.append(entry)
            variant = Variant(entry.model, entry.loras)
            variant_keys = keys.get(variant)
            if variant_keys is None:
                variant_keys, shapes[variant], created[variant] = keys.setdefault(variant, []), [], []
            variant_keys.append(ClaimKey.of(entry.priority, entry.seq, entry.fair_tag, entry.fair_start))
            created[variant].append(entry.created_at)
            shapes[variant].append(shape_id)
        return cls(read.max_seq, read.changes, keys, created, _prefix_sums(shapes, samples, cost), cost, now, shapes,
                   samples)

    def repriced(self, cost: CostModel, now: float) -> QueueSnapshot:
        """The same queue priced with another cost model: no read, a sum over each model's queue."""
        return replace(self, prefix=_prefix_sums(self.shapes, self.samples, cost), cost=cost, built_at=now, merged={})

    def extended(self, newer: Sequence[QueueEntry]) -> QueueSnapshot:
        """This snapshot with the tasks submitted since added in claim order, without reading what it holds.

        A flood of submits made a full rebuild (reading every waiting task) every MAX_UNSNAPSHOTTED submits; that
        thread held the GIL most of the time, and the event loop then waited for it at every socket call.
        """
        if not newer:
            return self
        samples = list(self.samples)
        shape_ids = {(e.model, e.width, e.height, e.steps, e.count): i for i, e in enumerate(samples)}
        added: dict[Variant, list[tuple[ClaimKey, float, int]]] = {}
        for entry in newer:
            shape = (entry.model, entry.width, entry.height, entry.steps, entry.count)
            shape_id = shape_ids.get(shape)
            if shape_id is None:
                shape_id = shape_ids[shape] = len(samples)
                samples.append(entry)
            key = ClaimKey.of(entry.priority, entry.seq, entry.fair_tag, entry.fair_start)
            added.setdefault(Variant(entry.model, entry.loras), []).append((key, entry.created_at, shape_id))
        keys, created, shapes, prefix = dict(self.keys), dict(self.created), dict(self.shapes), dict(self.prefix)
        prices = [self.cost.gpu_seconds(sample) for sample in samples]
        for variant, additions in added.items():
            keys[variant], created[variant], shapes[variant] = _inserted(
                self.keys.get(variant, []), self.created.get(variant, []), self.shapes.get(variant, []), additions)
            prefix[variant] = list(accumulate(map(prices.__getitem__, shapes[variant]), initial=0.0))
        return replace(self, max_seq=max(self.max_seq, max(entry.seq for entry in newer)), keys=keys, created=created,
                       prefix=prefix, shapes=shapes, samples=samples, merged={})

    def variants_of(self, model: str) -> list[Variant]:
        """The variants of a model that have tasks in this snapshot (the default set's first when it has)."""
        return sorted(variant for variant in self.keys if variant.model == model)

    def queue(self, variant: Variant, front: ClaimKey | None, newer: Sequence[QueueEntry], cost: CostModel) -> ModelQueue:
        """One variant's waiting queue now: the snapshot less what was claimed since (all before `front`, or
        everything when nothing of it waits), plus what was submitted since (`newer`, of this variant), in claim
        order."""
        keys, created, prefix = self.keys.get(variant, []), self.created.get(variant, []), self.prefix.get(variant, [0.0])
        first = len(keys) if front is None else bisect.bisect_left(keys, front)
        if not newer:  # the common case, and no copy: the replay starts at `first`
            return ModelQueue(keys, created, prefix, first)
        seqs = tuple(entry.seq for entry in newer)
        hit = self.merged.get(variant)
        if hit is not None and hit[0] == (front, seqs) and hit[1] is cost:
            return hit[2]  # status requests between two submits share one merge
        # Merged by inserting the few new tasks into copies of the snapshot's lists: slices, inserts and sums run
        # in C, where building and sorting a tuple per queued task was 5 ms a status request at 10,000 queued.
        merged_keys, merged_created, seconds = _inserted(
            keys[first:], created[first:], list(map(operator.sub, prefix[first + 1:], prefix[first:-1])),
            [(ClaimKey.of(e.priority, e.seq, e.fair_tag, e.fair_start), e.created_at, cost.gpu_seconds(e)) for e in newer])
        merged = ModelQueue(merged_keys, merged_created, list(accumulate(seconds, initial=0.0)))
        self.merged[variant] = ((front, seqs), cost, merged)  # one entry per variant; a plain store is atomic
        return merged

    def queued_seconds(self, variant: Variant, front: ClaimKey | None) -> float:
        """Predicted engine seconds of a variant's tasks here that still wait: from `front` on (none when None)."""
        prefix = self.prefix.get(variant)
        if not prefix or front is None:
            return 0.0
        return prefix[-1] - prefix[bisect.bisect_left(self.keys[variant], front)]

    def ahead(self, variant: Variant, key: ClaimKey) -> tuple[int, float]:
        """A variant's waiting tasks ahead of a claim key, and their summed engine seconds."""
        keys = self.keys.get(variant)
        if not keys:
            return 0, 0.0
        index = bisect.bisect_left(keys, key)
        return index, self.prefix[variant][index]


def _inserted(keys: Sequence[ClaimKey], created: Sequence[float], values: Sequence[Any],
              additions: Sequence[tuple[ClaimKey, float, Any]]) -> tuple[list[ClaimKey], list[float], list[Any]]:
    """Copies of one model's claim keys, submit times and per-task values with the additions inserted in claim
    order (new tasks mostly go last, so each insert is an append)."""
    keys, created, values = list(keys), list(created), list(values)
    for key, at, value in sorted(additions, key=lambda addition: addition[0]):
        index = bisect.bisect_left(keys, key)
        keys.insert(index, key)
        created.insert(index, at)
        values.insert(index, value)
    return keys, created, values


def _prefix_sums(shapes: dict[Variant, list[int]], samples: Sequence[QueueEntry],
                 cost: CostModel) -> dict[Variant, list[float]]:
    """Each variant's running sums of predicted engine seconds, from its tasks' shapes."""
    prices = [cost.gpu_seconds(sample) for sample in samples]
    return {variant: list(accumulate(map(prices.__getitem__, ids), initial=0.0)) for variant, ids in shapes.items()}


class CostCache:
    """The fitted cost model, refit only when the timing stats changed and at most every `interval` seconds."""

    def __init__(self, interval: float) -> None:
        self._lock = threading.Lock()
        self._interval = interval
        self._model: CostModel | None = None
        self._version: tuple[float, int] | None = None
        self._checked_at = 0.0

    def get(self, db: Store, now: float) -> CostModel:
        """The current cost model, as of now."""
        if self._model is not None and now - self._checked_at < self._interval:
            return self._model
        with self._lock:
            version = db.timing_version()
            if self._model is None or version != self._version:
                self._model = CostModel.fit(db.timing_stats())
                self._version = version
            self._checked_at = now
            return self._model


class Forecaster:
    """Keeps a fitted cost model and a recent queue snapshot, so a status request costs a few indexed reads.

    The first snapshot is built on the request that needs it; later ones on a background thread (with a
    connection of its own from `connect`) while requests answer from the previous one, corrected for claims.
    `clock` gives the current Unix time wherever a caller passes no `now`.
    """

    def __init__(self, connect: Callable[[], Store], clock: Callable[[], float] = time.time,
                 refit_interval: float = 0.5, reprice_after: float = 5.0):
        self._connect = connect
        self._clock = clock
        self._costs = CostCache(refit_interval)
        # The worker records timings with every step, so the cost model changes often; a snapshot priced
        # with an older one is re-priced once it is this old.
        self._reprice_after = reprice_after
        self._lock = threading.Lock()
        self._snapshot: QueueSnapshot | None = None
        self._rebuild: Callable[[float], Any] | None = None  # waits for the latest rebuild (settle)
        self._rebuilding = False  # a rebuild is in flight
        self.arrivals = ArrivalLog()
        self._signal_seen = -1  # the PostgreSQL change signal as of the last check that found the queue unmoved
        self.reads = SignalCache()
        self._rebuild_conn: Store | None = None  # the rebuilds' connection, kept between them
        self._replayed: tuple[Any, Any, Timeline] | None = None  # the latest whole-queue replay (_timeline)
        self._calibration = (Calibration(), float("-inf"))  # and when it was read

    def cost_model(self, db: Store, now: float | None = None) -> CostModel:
        """The current cost model."""
        return self._costs.get(db, self._clock() if now is None else now)

    def snapshot(self, db: Store, cost: CostModel, now: float) -> QueueSnapshot:
        """The waiting queue in claim order: rebuilt when tasks left it other than by a claim or re-entered it, and
        re-priced now and then."""
        current = self._snapshot
        if current is None:
            with self._lock:
                if self._snapshot is None:  # nobody built it while we waited for the lock
                    if native.gevent_active():
                        # On an OS thread with a connection of its own (the loop's is in use by other greenlets
                        # meanwhile): only this request waits, the loop's other connections go on.
                        native.call(lambda: self._build_first(self._connect(), cost, now, close=True))
                    else:
                        self._build_first(db, cost, now)
                assert self._snapshot is not None
                return self._snapshot
        if self._queue_moved(db, current):
            self._rebuild_soon(cost)
        elif current.cost is not cost and now - current.built_at >= self._reprice_after:
            # Only the prices are stale: re-priced without reading the queue, a millisecond at 10,000 queued
            # where a rebuild was ~30 ms of Python beside the request loop on a fast VM (the status latency's tail).
            self._rebuild_soon(cost, reprice=True)
        return current

    def _queue_moved(self, db: Store, current: QueueSnapshot) -> bool:
        if db.capabilities.notifies:
            # The LISTEN counter moves with every commit that touches a task: until it does, nothing can have
            # left the queue, and the status request skips even the one-row read.
            signal = db.data_version()
            if signal == self._signal_seen:
                return False
            moved = current.changes != db.queue_changes()
            if not moved:
                self._signal_seen = signal  # read before the counter row, so a change after it is not missed
            return moved
        return current.changes != db.queue_changes()

    def settle(self, timeout: float = 10.0) -> None:
        """Wait for a background rebuild in flight, if any (tests use it to read its outcome)."""
        wait = self._rebuild
        if wait is not None:
            wait(timeout)

    def _build_first(self, db: Store, cost: CostModel, now: float, close: bool = False) -> None:
        try:
            self._snapshot = QueueSnapshot.build(db.read_queue(), cost, now)
            self.arrivals.observe(db.arrivals_since(0, now - ARRIVAL_WINDOW), now, cost)
        finally:
            if close:
                db.close()

    def _rebuild_soon(self, cost: CostModel, reprice: bool = False, extend: bool = False) -> None:
        with self._lock:
            if self._rebuilding:
                return
            # Set before the thread starts: a rebuild can end before start() returns, and the flag it clears
            # must not be set again after that (which stopped every later rebuild).
            self._rebuilding = True
            # An OS thread even under gevent: the rebuild is tens of milliseconds of Python.
            self._rebuild = native.start(lambda: self._rebuild_now(cost, reprice, extend), "queue-snapshot")

    def _rebuild_now(self, cost: CostModel, reprice: bool, extend: bool = False) -> None:
        # One rebuild at a time, so they share one connection: a fresh PostgreSQL session per rebuild cost a
        # backend's start and every statement's preparation again.
        db, self._rebuild_conn = self._rebuild_conn or self._connect(), None
        try:
            now = self._clock()
            current = self._snapshot
            if reprice and current is not None:
                snapshot = current.repriced(cost, now)
            elif extend and current is not None:
                snapshot = current.extended(db.all_waiting_since(current.max_seq))
            else:
                snapshot = QueueSnapshot.build(db.read_queue(), cost, now)
            # Only this thread touches the arrival log now (one rebuild at a time), so no lock is held
            # while it is re-priced: request threads never wait for it.
            self.arrivals.observe(db.arrivals_since(self.arrivals.last_seq, now - ARRIVAL_WINDOW), now, cost)
            self._snapshot = snapshot
        except BaseException:
            db.close()
            raise
        else:
            self._rebuild_conn = db
        finally:
            # No lock: only _rebuild_soon sets it, and only while it is False (a plain store is atomic).
            self._rebuilding = False

    def estimate(self, db: Store, task: Task, workers: int, now: float | None = None,
                 live: Sequence[Worker] = ()) -> Estimate:
        """Where a task stands: waiting tasks and running tasks ahead of it, and seconds until its images are done.

        `live` (the live workers) lets it charge a model switch when no worker serving the task's model holds it.
        """
        now = self._clock() if now is None else now
        cost = self.cost_model(db, now)
        if task.status is Status.PROCESSING:
            remaining = cost.remaining_seconds(task, now)
            share = cost.remaining_gpu_seconds(task, now) / max(cost.gpu_seconds(task), 1e-9)
            low, high = combined(remaining, [normal(remaining, cost.gpu_sd(task) * share)])
            return Estimate(0, 0, remaining, low, high, low, high)
        if task.status is not Status.WAITING:
            return Estimate(0, 0, 0.0)
        key = ClaimKey.of(task.priority, task.seq, task.fair_tag, task.fair_start)
        snap = self.snapshot(db, cost, now)
        serving = [w for w in live if task.model in w.servable]
        if len(serving) == 1 and (len(serving[0].servable) > 1 or self._several_sets(task, serving[0], snap)):
            # One worker switching between models or LoRA sets: replay its claim policy over every queue it serves.
            return self.replayed_estimate(db, task, serving[0], snap, cost, now)
        pos, ahead = 0, 0.0
        for variant in snap.variants_of(task.model):
            front = self.front(db, variant, snap)
            if front is not None:  # the variant's tasks ahead of its front have been claimed since the snapshot
                (tasks, seconds), (gone, gone_seconds) = snap.ahead(variant, key), snap.ahead(variant, front)
                pos, ahead = pos + max(tasks - gone, 0), ahead + max(seconds - gone_seconds, 0.0)
        # Tasks submitted since the snapshot: a rowid range read, so a new task's position is always exact.
        newer = self._waiting_since(db, task, snap.max_seq)
        if len(newer) > MAX_UNSNAPSHOTTED:
            self._rebuild_soon(cost, extend=True)
        prices: dict[tuple[int, int, int, int], float] = {}
        for entry in newer:
            if ClaimKey.of(entry.priority, entry.seq, entry.fair_tag, entry.fair_start) < key:
                shape = (entry.width, entry.height, entry.steps, entry.count)
                if shape not in prices:
                    prices[shape] = cost.gpu_seconds(entry)
                pos += 1
                ahead += prices[shape]
        running_ahead = 0
        running_now = self.reads.get(db, ("running",), lambda: db.running_tasks())
        for running in running_now:
            if running.model != task.model or running.id == task.id:
                continue  # the worker may have claimed this very task since its row was read
            running_ahead += 1
            ahead += cost.remaining_gpu_seconds(running, now)
        # Several workers serving this model drain the queue ahead of us in parallel.
        per_worker = max(ahead, 0.0) / max(workers, 1)
        until_start = self.arrivals.until_start(task.model, task.priority, workers, per_worker)
        switch = self.switch_seconds(db, task, live, running_now, snap, cost, now) if live and not workers else 0.0
        change = self.lora_change_seconds(db, task, running_now, live)
        seconds = until_start + switch + change + cost.task_seconds(task)
        tasks_ahead = (max(pos, 0) + running_ahead) / max(workers, 1)
        parts = self._waiting_parts(task, workers, per_worker, until_start, tasks_ahead, cost)
        parts += [normal(extra, LOAD_SPREAD * extra) for extra in (switch, change) if extra]
        return self._ranged(db, Estimate(max(pos, 0), running_ahead, seconds), parts, now)

    def _ranged(self, db: Store, estimate: Estimate, parts: list[Part], now: float) -> Estimate:
        """A waiting task's estimate with the model's range, and that range calibrated by recent outcomes."""
        model_low, model_high = combined(estimate.seconds, parts)
        low, high = self.calibration(db, now).applied(estimate.seconds, model_low, model_high)
        return estimate._replace(low=low, high=high, model_low=model_low, model_high=model_high)

    def calibration(self, db: Store, now: float) -> Calibration:
        """The calibration from the latest finished tasks, read at most every CALIBRATION_INTERVAL seconds."""
        calibration, read_at = self._calibration
        if now - read_at >= CALIBRATION_INTERVAL or now < read_at:
            calibration = Calibration.of(db.recent_forecasts(CALIBRATION_TASKS))
            self._calibration = (calibration, now)
        return calibration

    def _waiting_parts(self, task: Task, workers: int, ahead: float, until_start: float, tasks_ahead: float,
                       cost: CostModel, turn: tuple[str, float] | None = None) -> list[Part]:
        """The uncertain parts of a waiting task's forecast: overtaking arrivals, the engine time of the work ahead
        (tasks_ahead tasks of about its own relative spread) and of the task itself.

        `turn` (the model a worker holds instead of this task's, and the latest start its --max-affinity-wait
        allows) adds that model's later arrivals: the worker keeps serving them until the bound.
        """
        start = self.arrivals.until_start
        own, own_sd = cost.gpu_seconds(task), cost.gpu_sd(task)
        relative = own_sd / own if own > 0 else UNMEASURED_SPREAD
        longest = ahead
        if turn is not None:
            held, latest = turn
            longest = max(min(start(held, ANY_PRIORITY, 1, ahead, HIGH_QUANTILE), latest), ahead)
        return [Part(until_start, start(task.model, task.priority, workers, ahead, LOW_QUANTILE),
                     start(task.model, task.priority, workers, longest, HIGH_QUANTILE)),
                normal(ahead, correlated_sd(relative * ahead / tasks_ahead, tasks_ahead) if tasks_ahead >= 1 else 0.0),
                normal(own, own_sd)]

    @staticmethod
    def _several_sets(task: Task, worker: Worker, snap: QueueSnapshot) -> bool:
        """Whether a worker serving the task's model has more than one of its LoRA sets to serve or hold: then it
        groups the work by set, and only a replay says when the task starts."""
        sets = {variant.loras for variant in snap.variants_of(task.model)} | {task.loras}
        if worker.model == task.model:
            sets.add(worker.loras)
        return len(sets) > 1

    def lora_change_seconds(self, db: Store, task: Task, running: Sequence[Task], live: Sequence[Worker]) -> float:
        """The measured cost of changing to a task's LoRA set, unless a worker holding its model holds that set
        or runs a task with it (no live worker known: unless it asks for the default set).

        Charged where no replay runs (several workers serve the model): only the task's own change, not how
        grouping by set moves it.
        """
        held = {w.loras for w in live if w.model == task.model and not w.loading}
        held |= {t.loras for t in running if t.model == task.model}
        if task.loras in (held or {""}):
            return 0.0
        loads = self.reads.get(db, ("loads",), db.mean_load_seconds)
        return expected_lora_change(task.model, loads, DEFAULT_LOAD_SECONDS)

    def front(self, db: Store, variant: Variant, snap: QueueSnapshot) -> ClaimKey | None:
        """The claim key of the snapshot's first task of a variant that still waits (None when none does)."""
        # A claim takes the front of its variant's queue in claim order, so every task of the snapshot ahead of the
        # first one still waiting has left the queue since: skipping them keeps a snapshot exact between rebuilds,
        # and claims need none (migration 0012).
        return self.reads.get(db, ("front", variant, snap.max_seq),
                              lambda: db.waiting_front(variant.model, snap.max_seq, variant.loras))

    def _waiting_since(self, db: Store, task: Task, seq: int) -> list[QueueEntry]:
        newer = self.reads.get(db, ("since", task.model, seq), lambda: db.waiting_since(task.model, seq))
        # Sequence numbers follow commit order (writers take the write lock), so a read that holds no task as new
        # as this one was made before it was submitted, and may lack tasks submitted just before it: read again.
        if task.seq > max((entry.seq for entry in newer), default=seq):
            newer = db.waiting_since(task.model, seq)
        return newer

    def replayed_estimate(self, db: Store, task: Task, worker: Worker, snap: QueueSnapshot,
                          cost: CostModel, now: float) -> Estimate:
        """Where a waiting task stands with a worker serving several models or LoRA sets, by replaying its claim
        policy over every variant's queue."""
        own = Variant(task.model, task.loras)
        queues: dict[Variant, ModelQueue] = {}
        for model in worker.servable:
            newer = db.waiting_since(model, snap.max_seq)
            if len(newer) > MAX_UNSNAPSHOTTED:
                self._rebuild_soon(cost, extend=True)
            by_variant: dict[Variant, list[QueueEntry]] = {}
            for entry in newer:
                by_variant.setdefault(Variant(entry.model, entry.loras), []).append(entry)
            variants = {*snap.variants_of(model), *by_variant, *([own] if model == task.model else [])}
            for variant in sorted(variants):
                queues[variant] = snap.queue(variant, self.front(db, variant, snap), by_variant.get(variant, ()), cost)
        key = ClaimKey.of(task.priority, task.seq, task.fair_tag, task.fair_start)
        running = db.running_tasks()
        loads = db.mean_load_seconds()
        free_at = now + sum(cost.remaining_gpu_seconds(t, now) for t in running if t.worker_id == worker.id)
        loaded = Variant(worker.model, worker.loras) if worker.model else None
        if worker.loading:
            loaded = Variant(worker.loading)
            free_at += expected_load(worker.loading, loads, DEFAULT_LOAD_SECONDS) / 2  # about half is left, on average
        replay = ReplayWorker(loaded, free_at, worker.affinity_wait or 0.0, loads, DEFAULT_LOAD_SECONDS)
        replayed = self._timeline(queues, replay)
        start = replayed.start_in(queues, own, key)
        ahead = max(start - now, 0.0)
        until_start = self.arrivals.until_start(task.model, task.priority, 1, ahead)
        running_ahead = sum(1 for t in running if t.model == task.model and t.id != task.id)
        pos = replayed.started_before(queues, start)
        seconds = until_start + cost.task_seconds(task)
        turn = None
        if loaded is not None and loaded != own:  # a change lies ahead (the replay holds its mean), and the held turn
            load = replay.change_seconds(own, loaded)
            # The worker changes early by the change's length, so the task starts within its bound plus the task then
            # running (about one of its own); later arrivals of the held model fill the turn up to there.
            latest = task.created_at + (worker.affinity_wait or 0.0) - now + cost.gpu_seconds(task)
            turn = (loaded.model, max(latest, ahead))
        parts = self._waiting_parts(task, 1, ahead, until_start, pos + running_ahead, cost, turn)
        if turn is not None:
            parts.append(normal(load, LOAD_SPREAD * load))
        return self._ranged(db, Estimate(pos, running_ahead, seconds), parts, now)

    def _timeline(self, queues: dict[Variant, ModelQueue], replay: ReplayWorker) -> Timeline:
        """The replay of the whole queue, shared by every status request until the queue or the worker moves.

        Replayed per request it was most of the event loop's time at 10,000 queued with a few tasks of a second
        model waiting (a stretch per affinity deadline), and the status load collapsed beside it.
        """
        token = (tuple((name, id(queue.keys), id(queue.prefix), queue.first) for name, queue in queues.items()),
                 replay.loaded, round(replay.free_at, 2), replay.affinity_wait, tuple(sorted(replay.loads.items())))
        cached = self._replayed
        if cached is not None and cached[0] == token:
            return cached[2]
        made = timeline(queues, replay)
        # The lists are kept with the token, so that no other list can take their ids while it is cached.
        self._replayed = (token, [(queue.keys, queue.prefix) for queue in queues.values()], made)
        return made

    def switch_seconds(self, db: Store, task: Task, live: Sequence[Worker], running: Sequence[Task],
                       snap: QueueSnapshot, cost: CostModel, now: float) -> float:
        """Seconds before a task whose model no serving worker holds can start, beyond its own model's queue.

        The worker first finishes its running task and keeps serving its loaded model's queue until this task
        has waited its --max-affinity-wait less the load, then loads this task's model (the measured mean load
        time; for a model never loaded here, the mean of those that were, as the worker assumes).
        """
        serving = [w for w in live if task.model in w.servable]
        if not serving:
            return 0.0
        load_seconds = expected_load(task.model, db.mean_load_seconds(), DEFAULT_LOAD_SECONDS)
        if any(w.loading == task.model for w in serving):
            return load_seconds / 2  # already loading: about half of it is left, on average
        waited = now - task.created_at

        def queued(model: str) -> float:  # the snapshot, plus what was submitted since (as for the task's own model)
            newer = db.waiting_since(model, snap.max_seq)
            return (sum(snap.queued_seconds(variant, self.front(db, variant, snap)) for variant in snap.variants_of(model))
                    + sum(map(cost.gpu_seconds, newer)))

        return min(
            sum(cost.remaining_gpu_seconds(t, now) for t in running if t.worker_id == worker.id)
            # the worker starts the load early by its length, so the task starts within the bound
            + min(queued(worker.model), max((worker.affinity_wait or 0.0) - load_seconds - waited, 0.0))
            + load_seconds
            for worker in serving
        )
