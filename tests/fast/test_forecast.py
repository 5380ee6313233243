"""The forecast: monotone in steps, pixels, count and queue; a measured model replaces the prior."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest

from mflux_server import store
from mflux_server.core.rows import ClaimKey, QueueEntry, QueueRead, Task, Timing, WaitingHead
from mflux_server.core.scheduling import Variant, choose_variant, expected_load, expected_lora_change
from mflux_server.forecast.arrivals import (
    MAX_PRIORITY_LOAD,
    MIN_ARRIVAL_SPAN,
    OVERTAKING_QUANTILE,
    ArrivalLog,
)
from mflux_server.forecast.cost_model import (
    PRIOR,
    CostModel,
    FitShape,
    KindModel,
    megapixels,
)
from mflux_server.forecast.numerics import poisson_quantile
from mflux_server.forecast.policy_replay import ModelQueue, timeline
from mflux_server.forecast.policy_replay import Worker as ReplayWorker
from mflux_server.forecast.queue_view import Estimate, Forecaster, QueueSnapshot
from tests.conftest import new_task as task
from tests.conftest import queue_task

# Every forecaster here reads this clock, fixed when the module loads, so no test races wall time.
NOW = time.time()


def record(db, model: str, width: int, height: int, kind: str, seconds: list[float]) -> None:
    db.record_timings(model, width, height, [Timing(kind, tuple(seconds))])


def forecaster_for(db_path: str, **options) -> Forecaster:
    """A forecaster on the test's queue, as the API builds one, reading the fixed clock."""
    return Forecaster(connect=lambda: store.connect(db_path), clock=lambda: NOW, **options)


def current(db, task_id: str) -> Task:
    found = db.get(task_id)
    assert found is not None
    return found


def settled(forecaster: Forecaster, db, task_id: str, workers: int = 1) -> Estimate:
    """The estimate once any rebuild the first call started has finished."""
    forecaster.estimate(db, current(db, task_id), workers)
    forecaster.settle()
    return forecaster.estimate(db, current(db, task_id), workers)


def test_more_steps_pixels_or_images_take_longer():
    cost = CostModel.fit([])
    base = cost.task_seconds(task())
    assert cost.task_seconds(task(steps=8)) > base
    assert cost.task_seconds(task(width=1024, height=1024)) > base
    assert cost.gpu_seconds(task(count=2)) == pytest.approx(2 * cost.gpu_seconds(task()))
    # encoding overlaps the next generation, so a task pays for its last encode only
    assert cost.task_seconds(task()) - cost.gpu_seconds(task()) == pytest.approx(cost.parts("schnell", 512, 512)["encode"])


def test_prior_is_used_before_any_measurement():
    cost = CostModel.fit([])
    a, b, c = PRIOR["step"]
    assert cost.parts("schnell", 1024, 1024)["step"] == pytest.approx(a + b + c)
    assert not cost.measured


def test_more_tasks_ahead_means_a_longer_wait(db, db_path):
    forecaster = forecaster_for(db_path, refit_interval=0)
    first = queue_task(db)
    second = queue_task(db)
    urgent = queue_task(db, priority=1)
    waits = {t.id: forecaster.estimate(db, current(db, t.id), workers=1).seconds for t in (first, second, urgent)}
    assert waits[urgent.id] < waits[first.id] < waits[second.id]
    cost = CostModel.fit([])
    # urgent and first are ahead of it; one urgent arrival in 30 s makes a later overtaker unlikely enough
    # (none counted while P(none) = exp(-rate × wait) is at least the quantile) that it is not counted
    assert math.exp(-1 / MIN_ARRIVAL_SPAN * 2 * cost.gpu_seconds(task())) >= OVERTAKING_QUANTILE
    assert waits[second.id] == pytest.approx(2 * cost.gpu_seconds(task()) + cost.task_seconds(task()))
    # the urgent task itself waits only for itself: nothing can overtake it
    assert waits[urgent.id] == pytest.approx(cost.task_seconds(task()))


def test_running_task_remaining_shrinks_with_progress(db, db_path):
    forecaster = forecaster_for(db_path, refit_interval=0)
    queue_task(db, steps=10)
    running = db.claim_next("w", "schnell", "synthetic")
    waiting = queue_task(db, steps=10)
    db.record_progress(running.id, "w", 0, 2, NOW - 0.1)
    early = forecaster.estimate(db, current(db, waiting.id), workers=1).seconds
    db.record_progress(running.id, "w", 0, 8, NOW - 0.1)
    late = forecaster.estimate(db, current(db, waiting.id), workers=1).seconds
    step = CostModel.fit([]).parts("schnell", 512, 512)["step"]
    assert early - late == pytest.approx(6 * step, rel=1e-12)  # exact: both read the same clock


def test_measured_timings_replace_the_prior(db, db_path):
    forecaster = forecaster_for(db_path, refit_interval=0, reprice_after=0)
    t = queue_task(db, width=512, height=512, steps=4)
    prior = forecaster.estimate(db, current(db, t.id), workers=1).seconds
    for kind, seconds in (("step", 0.25), ("before", 0.1), ("after", 0.05), ("encode", 0.01)):
        record(db, "schnell", 512, 512, kind, [seconds] * 5)
    measured = forecaster.estimate(db, current(db, t.id), workers=1).seconds
    assert measured == pytest.approx(0.1 + 4 * 0.25 + 0.05 + 0.01)
    assert measured != pytest.approx(prior)
    assert forecaster.cost_model(db).measured


def test_fit_recovers_a_quadratic_cost_and_extrapolates():
    a, b, c = 0.05, 0.3, 0.4
    rnd = random.Random(1)
    samples = {}
    for side in (512, 768, 1024, 1280):
        mp = megapixels(side, side)
        values = [(a + b * mp + c * mp * mp) * (1 + rnd.uniform(-0.05, 0.05)) for _ in range(5)]
        samples[mp] = (sum(values) / len(values), len(values))
    model = KindModel.fit(PRIOR["step"], samples)
    for side in (640, 1536):  # unseen sizes, inside and beyond the measured range
        mp = megapixels(side, side)
        assert model.seconds(mp) == pytest.approx(a + b * mp + c * mp * mp, rel=0.05)


def test_one_measured_size_scales_the_prior_for_the_others():
    mp = megapixels(512, 512)
    prior_value = PRIOR["step"][0] + PRIOR["step"][1] * mp + PRIOR["step"][2] * mp * mp
    model = KindModel.fit(PRIOR["step"], {mp: (prior_value / 10, 4)})
    big = megapixels(1024, 1024)
    assert model.seconds(big) == pytest.approx(sum(PRIOR["step"]) / 10)


def test_an_unmeasured_model_borrows_this_machines_speed(db):
    record(db, "schnell", 512, 512, "step", [0.01] * 5)
    cost = CostModel.fit(db.timing_stats())
    prior = CostModel.fit([])
    assert cost.parts("dev", 512, 512)["step"] < prior.parts("dev", 512, 512)["step"] / 5


def test_a_model_never_run_is_forecast_from_its_familys_curve_not_other_families(db):
    # schnell measured at four sizes on a quadratic curve unlike the prior; qwen-image (another family) much slower.
    curve = (0.05, 0.3, 0.9)
    for side in (512, 768, 1024, 1280):
        mp = megapixels(side, side)
        record(db, "schnell", side, side, "step", [curve[0] + curve[1] * mp + curve[2] * mp * mp] * 5)
        record(db, "schnell", side, side, "after", [0.01 * side] * 5)  # the decode, a second kind
    record(db, "qwen-image", 1024, 1024, "step", [9.0] * 5)
    cost = CostModel.fit(db.timing_stats())
    mp = megapixels(896, 896)
    expected = curve[0] + curve[1] * mp + curve[2] * mp * mp
    # dev shares schnell's transformer: forecast from schnell's measurements, at an unmeasured size
    assert cost.parts("dev", 896, 896)["step"] == pytest.approx(expected, rel=0.03)
    assert cost.parts("filipstrand/FLUX.1-Krea-dev-mflux-4bit", 896, 896)["step"] == pytest.approx(expected, rel=0.03)
    # every kind is learned per family, the decode too
    assert cost.parts("dev", 1024, 1024)["after"] == pytest.approx(10.24, rel=0.01)
    # a model of a third family with nothing measured borrows the machine's mean speed, not schnell's curve alone
    assert cost.parts("z-image", 896, 896)["step"] != pytest.approx(expected, rel=0.03)


def test_a_model_measured_at_one_size_follows_its_familys_shape(db):
    # klein 4B measured at many sizes; 9B (same family, twice as slow) at one size only.
    for side in (512, 768, 1024, 1280, 1536):
        mp = megapixels(side, side)
        record(db, "flux2-klein-4b", side, side, "step", [0.02 + 0.1 * mp * mp] * 5)
    record(db, "flux2-klein-9b", 1024, 1024, "step", [2 * 0.12] * 5)
    cost = CostModel.fit(db.timing_stats())
    for side in (512, 1536):
        mp = megapixels(side, side)
        assert cost.parts("flux2-klein-9b", side, side)["step"] == pytest.approx(2 * (0.02 + 0.1 * mp * mp), rel=0.03)
    # and the 9B's own measurement does not move the 4B's forecast
    assert cost.parts("flux2-klein-4b", 1024, 1024)["step"] == pytest.approx(0.12, rel=0.01)


def test_a_stalled_step_counts_at_most_three_times_the_typical_one(db):
    # One image's steps on a fresh machine: kernel compilation makes step 1 take 43 s against 0.55 s.
    record(db, "schnell", 1024, 1024, "step", [43.0, 0.55, 0.56, 0.54])
    record(db, "schnell", 1024, 1024, "step", [0.55] * 4)
    record(db, "schnell", 1024, 1024, "step", [30.0])  # a later stall, judged against the stored mean
    (stat,) = [s for s in db.timing_stats() if s.kind == "step"]
    mean = stat.total / stat.n
    assert stat.n == 9
    assert mean < 0.55 * 1.7  # unclipped, the mean would be 8.4 s
    assert mean > 0.55  # the stalls still count, bounded
    # a genuinely slower size is not an outlier: it is a different key
    record(db, "schnell", 1536, 1536, "step", [1.4] * 3)
    assert CostModel.fit(db.timing_stats()).parts("schnell", 1536, 1536)["step"] == pytest.approx(1.4)


def test_several_workers_share_the_queue_ahead(db, db_path):
    forecaster = forecaster_for(db_path, refit_interval=0)
    for _ in range(4):
        queue_task(db)
    last = queue_task(db)
    one = forecaster.estimate(db, current(db, last.id), workers=1).seconds
    two = forecaster.estimate(db, current(db, last.id), workers=2).seconds
    cost = CostModel.fit([])
    gpu, own = cost.gpu_seconds(task()), cost.task_seconds(task())
    assert one == pytest.approx(4 * gpu + own) and two == pytest.approx(2 * gpu + own)


def test_a_task_claimed_since_the_snapshot_is_counted_once(db, db_path):
    forecaster = forecaster_for(db_path, refit_interval=60)
    queue_task(db, steps=10)
    last = queue_task(db)
    before = forecaster.estimate(db, current(db, last.id), workers=1)
    assert before.pos == 1 and before.running == 0
    db.claim_next("w", "schnell", "synthetic")  # the snapshot still lists it as waiting
    after = forecaster.estimate(db, current(db, last.id), workers=1)
    assert (after.pos, after.running) == (0, 1)
    assert after.seconds == pytest.approx(before.seconds, rel=1e-12)


def test_tasks_that_left_the_queue_since_the_snapshot_are_not_counted(db, db_path):
    gate = threading.Event()  # holds the background rebuild, so estimates must answer from the stale snapshot

    def slow_connect():
        gate.wait(10)
        return store.connect(db_path)

    forecaster = Forecaster(connect=slow_connect, clock=lambda: NOW, refit_interval=60)
    first, second, third = (queue_task(db, steps=s) for s in (10, 20, 30))
    last = queue_task(db)
    try:
        assert forecaster.estimate(db, current(db, last.id), workers=1).pos == 3
        built = forecaster._snapshot
        claimed = db.claim_next("w", "schnell", "synthetic")
        assert claimed.id == first.id and db.complete(claimed.id, "w", [])
        assert db.claim_next("w", "schnell", "synthetic").id == second.id
        after = forecaster.estimate(db, current(db, last.id), workers=1)
        assert forecaster._snapshot is built
        assert (after.pos, after.running) == (1, 1)
        cost = CostModel.fit([])
        running = cost.remaining_gpu_seconds(current(db, second.id), NOW)
        assert after.seconds == pytest.approx(running + cost.gpu_seconds(third) + cost.task_seconds(last), rel=1e-12)
    finally:
        gate.set()


def test_background_rebuilds_share_one_connection(db, db_path):
    opened = []

    def counting_connect():
        opened.append(store.connect(db_path))
        return opened[-1]

    forecaster = Forecaster(connect=counting_connect, clock=lambda: NOW, refit_interval=60)
    tasks = [queue_task(db) for _ in range(4)]
    for done in range(3):
        forecaster.estimate(db, current(db, tasks[-1].id), workers=1)
        forecaster.settle()
        built = forecaster._snapshot
        assert db.cancel_or_delete(tasks[done].id) is not None
        assert settled(forecaster, db, tasks[-1].id).pos == 2 - done
        assert forecaster._snapshot is not built  # each cancel moved the queue: rebuilt
    assert len(opened) == 1, "each rebuild opened a connection of its own"


def test_a_rebuild_that_ends_before_its_start_returns_does_not_stop_later_ones(db, db_path, monkeypatch):
    from mflux_server.core import native

    started = native.start

    def at_once(target, name):  # the thread runs to its end before start() returns, as it can
        if name != "queue-snapshot":  # PostgreSQL's listener thread never ends: started as usual
            return started(target, name)
        target()
        return lambda timeout: None

    monkeypatch.setattr(native, "start", at_once)
    forecaster = forecaster_for(db_path, refit_interval=60)
    tasks = [queue_task(db) for _ in range(4)]
    forecaster.estimate(db, current(db, tasks[-1].id), workers=1)
    for done in range(3):
        built = forecaster._snapshot
        assert db.cancel_or_delete(tasks[done].id) is not None
        assert settled(forecaster, db, tasks[-1].id).pos == 2 - done
        assert forecaster._snapshot is not built, f"no rebuild after cancel {done + 1}"


def test_claims_keep_the_snapshot_and_it_stays_exact(db, db_path):
    forecaster = forecaster_for(db_path, refit_interval=60)
    tasks = [queue_task(db, steps=s) for s in (10, 20, 30, 40)]
    changes = db.queue_changes()
    forecaster.estimate(db, current(db, tasks[-1].id), workers=1)
    built = forecaster._snapshot
    cost = CostModel.fit([])
    for claimed in range(3):
        assert db.claim_next("w", "schnell", "synthetic").id == tasks[claimed].id
        after = forecaster.estimate(db, current(db, tasks[-1].id), workers=1)
        forecaster.settle()
        assert forecaster._snapshot is built  # no rebuild for a claim
        assert (after.pos, after.running) == (2 - claimed, claimed + 1)
        front = forecaster.front(db, Variant("schnell"), built)
        assert built.queued_seconds(Variant("schnell"), front) == pytest.approx(
            sum(cost.gpu_seconds(t) for t in tasks[claimed + 1:]), rel=1e-12)
    assert db.queue_changes() == changes
    assert db.release(tasks[0].id, "w")  # back in the queue: a change the snapshot cannot see
    assert db.queue_changes() == changes + 1
    assert settled(forecaster, db, tasks[-1].id).pos == 1
    assert forecaster._snapshot is not built


def test_tasks_submitted_since_the_snapshot_are_seen(db, db_path):
    forecaster = forecaster_for(db_path, refit_interval=60)
    normal = queue_task(db)
    forecaster.estimate(db, current(db, normal.id), workers=1)  # builds the snapshot
    urgent = queue_task(db, priority=1)
    newest = queue_task(db)
    assert forecaster.estimate(db, current(db, normal.id), workers=1).pos == 1
    assert forecaster.estimate(db, current(db, newest.id), workers=1).pos == 2
    assert forecaster.estimate(db, current(db, urgent.id), workers=1).pos == 0
    assert forecaster._snapshot.max_seq == normal.seq  # answered without a rebuild


def test_the_snapshot_is_rebuilt_only_when_tasks_leave_or_reenter_the_queue(db, db_path):
    forecaster = forecaster_for(db_path, refit_interval=60)
    first = queue_task(db)
    second = queue_task(db)
    forecaster.estimate(db, current(db, second.id), workers=1)
    built = forecaster._snapshot
    queue_task(db)
    forecaster.estimate(db, current(db, second.id), workers=1)
    assert forecaster._snapshot is built
    db.cancel_or_delete(first.id)
    assert forecaster.estimate(db, current(db, second.id), workers=1).pos == 0  # exact before the rebuild
    forecaster.settle()
    assert forecaster._snapshot is not built
    assert forecaster.estimate(db, current(db, second.id), workers=1).pos == 0


def test_a_cost_model_that_learned_reprices_the_snapshot_without_reading_the_queue(db, db_path, monkeypatch):
    forecaster = forecaster_for(db_path, refit_interval=0, reprice_after=0)
    tasks = [queue_task(db, steps=s, width=w, height=w) for s, w in ((4, 512), (8, 512), (4, 1024), (4, 512))]
    queue_task(db, model="dev")
    db.claim_next("w", "schnell", "synthetic")  # taken since the snapshot: still skipped after re-pricing
    forecaster.estimate(db, current(db, tasks[-1].id), workers=1)
    forecaster.settle()
    built = forecaster._snapshot
    reads = []
    monkeypatch.setattr(type(db), "read_queue", lambda c: reads.append(c) or pytest.fail("the queue was read again"))
    for kind, seconds in (("step", 0.02), ("before", 0.1), ("after", 0.05), ("encode", 0.01)):
        record(db, "schnell", 512, 512, kind, [seconds] * 5)
    learned = settled(forecaster, db, tasks[-1].id)
    repriced = forecaster._snapshot
    assert repriced is not built and repriced.cost is not built.cost and not reads
    assert repriced.keys is built.keys  # the same queue, priced again
    monkeypatch.undo()
    # Exactly what a snapshot built afresh with the learned model holds, and the estimate that follows from it.
    fresh = forecaster_for(db_path, refit_interval=0)
    assert fresh.estimate(db, current(db, tasks[-1].id), workers=1) == learned
    assert fresh._snapshot.prefix == repriced.prefix
    cost = CostModel.fit(db.timing_stats())
    assert learned.pos == 2 and learned.seconds == pytest.approx(
        sum(cost.gpu_seconds(t) for t in tasks[1:3]) + cost.remaining_gpu_seconds(current(db, tasks[0].id), NOW)
        + cost.task_seconds(tasks[-1]), rel=1e-12)


def test_a_constant_cost_measured_at_three_close_sizes_does_not_extrapolate_wildly():
    # Regression: an exact quadratic through three noisy points of a constant once forecast 160× too much.
    samples = {megapixels(512, 512): (0.0104, 2), megapixels(512, 640): (0.0098, 2), megapixels(640, 640): (0.0101, 1)}
    model = KindModel.fit(PRIOR["before"], samples)
    for side in (1024, 1536):
        assert model.seconds(megapixels(side, side)) == pytest.approx(0.01, rel=0.1)
    assert model.shape in (FitShape.SCALED_PRIOR, FitShape.CONSTANT)


def test_the_shape_is_chosen_by_leave_one_out_error():
    quadratic = {megapixels(s, s): (0.1 + 0.2 * megapixels(s, s) ** 2, 3) for s in (512, 768, 1024, 1280, 1536)}
    assert KindModel.fit(PRIOR["step"], quadratic).shape is FitShape.QUADRATIC
    linear = {megapixels(s, s): (0.1 + 0.2 * megapixels(s, s), 3) for s in (512, 768, 1024, 1280, 1536)}
    assert KindModel.fit(PRIOR["encode"], linear).shape in (FitShape.LINEAR, FitShape.SCALED_PRIOR)


def test_poisson_quantile():
    # medians: 0 below ln 2, then about the mean
    assert [poisson_quantile(m, 0.5) for m in (0.0, 0.5, 0.69, 0.7, 1.0, 2.5, 10.0)] == [0, 0, 0, 1, 1, 2, 10]
    # Poisson(2): P(0) = 0.135, P(<=1) = 0.406, P(<=2) = 0.677
    assert [poisson_quantile(2.0, q) for q in (0.1, 0.3, 0.5, 0.6, 0.7)] == [0, 1, 2, 2, 3]
    # the normal approximation above a mean of 200 joins the exact sum without a jump
    exact, approximate = poisson_quantile(199.9, 0.3), poisson_quantile(200.1, 0.3)
    assert 0 <= approximate - exact <= 1


def test_recent_priority_arrivals_lengthen_the_wait_of_normal_tasks_only(db, db_path):
    forecaster = forecaster_for(db_path, refit_interval=60)
    record(db, "schnell", 512, 512, "step", [0.25] * 10)
    for kind in ("before", "after", "encode"):
        record(db, "schnell", 512, 512, kind, [0.0] * 10)
    ahead = [queue_task(db) for _ in range(20)]
    last = queue_task(db)
    calm = forecaster.estimate(db, current(db, last.id), workers=1).seconds
    assert calm == pytest.approx(21.0)  # 20 s ahead, 1 s its own
    # six urgent 1 s tasks were submitted over the last minute: 0.1 a second, so during a wait of ~20 s
    # 2 are expected and the 30th percentile is 1 (T = 20 + 1 → 21 s, 2.1 expected → still 1)
    for i in range(6):
        urgent = queue_task(db, now=NOW - 60 + i * 10, priority=1)
        db.cancel_or_delete(urgent.id)  # gone from the queue, still part of the arrival history
    stretched = settled(forecaster, db, last.id).seconds
    assert OVERTAKING_QUANTILE == 0.3
    assert stretched == pytest.approx(20.0 + 1.0 + 1.0, rel=0.01)
    near = forecaster.estimate(db, current(db, ahead[1].id), workers=1).seconds
    assert near == pytest.approx(1.0 + 1.0)  # 1 s ahead: an overtaker is unlikely (0.1 expected), none counted
    mine = queue_task(db, priority=1)
    assert forecaster.estimate(db, current(db, mine.id), workers=1).seconds == pytest.approx(1.0)


def test_the_arrival_load_is_repriced_when_the_model_learns(db, db_path):
    forecaster = forecaster_for(db_path, refit_interval=0, reprice_after=0)
    for _ in range(3):
        db.cancel_or_delete(queue_task(db, priority=1).id)
    queue_task(db)
    last = queue_task(db)
    db.claim_next("w", "schnell", "synthetic")  # something runs ahead of the last task
    forecaster.estimate(db, current(db, last.id), workers=1)
    at_prior = 3 * CostModel.fit([]).gpu_seconds(task()) / MIN_ARRIVAL_SPAN
    assert forecaster.arrivals.overtaking_load("schnell", 0, 1) == pytest.approx(min(at_prior, MAX_PRIORITY_LOAD))
    for kind, seconds in (("step", 0.01), ("before", 0.0), ("after", 0.0), ("encode", 0.0)):
        record(db, "schnell", 512, 512, kind, [seconds] * 5)
    settled(forecaster, db, last.id)
    assert forecaster.arrivals.overtaking_load("schnell", 0, 1) == pytest.approx(3 * 4 * 0.01 / MIN_ARRIVAL_SPAN)


def _queue(*tasks: tuple[int, float, float]):
    """A ModelQueue from (seq, created_at, seconds) in claim order, all normal priority."""
    from mflux_server.core.rows import ClaimKey
    from mflux_server.forecast.policy_replay import ModelQueue

    prefix = [0.0]
    for _, _, seconds in tasks:
        prefix.append(prefix[-1] + seconds)
    return ModelQueue([ClaimKey.of(0, seq) for seq, _, _ in tasks], [at for _, at, _ in tasks], prefix)


def test_the_replay_delays_a_loaded_models_task_by_the_other_models_turn_and_two_loads():
    from mflux_server.core.rows import ClaimKey
    from mflux_server.forecast.policy_replay import Worker, start_time

    # schnell loaded, 60 tasks of 3 s; one dev task submitted at 0; bound 120 s, loads 15 s.
    queues = {Variant("schnell"): _queue(*[(i + 2, 1.0, 3.0) for i in range(60)]), Variant("dev"): _queue((1, 0.0, 3.0))}
    worker = Worker(Variant("schnell"), 0.0, 120.0, {"schnell": 15.0, "dev": 15.0}, 15.0)
    # dev falls due at 105 s (its load is started early); the schnell task claimed at 105 runs to 108
    assert start_time(queues, Variant("dev"), ClaimKey.of(0, 1), worker) == pytest.approx(108 + 15)
    # the 40th schnell task: 35 run before the switch + dev's load and task + schnell's load back + 4 more
    assert start_time(queues, Variant("schnell"), ClaimKey.of(0, 41), worker) == pytest.approx(36 * 3 + 15 + 3 + 15 + 3 * 3)
    # with a bound of 0 (first in, first out) dev goes first, and schnell pays the switch there and back
    fifo = Worker(Variant("schnell"), 0.0, 0.0, {"schnell": 15.0, "dev": 15.0}, 15.0)
    assert start_time(queues, Variant("dev"), ClaimKey.of(0, 1), fifo) == pytest.approx(15)
    assert start_time(queues, Variant("schnell"), ClaimKey.of(0, 2), fifo) == pytest.approx(15 + 3 + 15)


def test_a_priority_task_of_another_model_is_served_before_the_loaded_models_normal_work():
    from mflux_server.core.rows import ClaimKey
    from mflux_server.forecast.policy_replay import ModelQueue, Worker, start_time

    urgent = ModelQueue([ClaimKey.of(1, 50)], [10.0], [0.0, 2.0])
    queues = {Variant("schnell"): _queue(*[(i + 1, 0.0, 3.0) for i in range(10)]), Variant("dev"): urgent}
    worker = Worker(Variant("schnell"), 5.0, 120.0, {}, 15.0)  # schnell's running task ends at 5 s; no load measured yet
    assert start_time(queues, Variant("dev"), ClaimKey.of(1, 50), worker) == pytest.approx(5 + 15)
    assert start_time(queues, Variant("schnell"), ClaimKey.of(0, 1), worker) == pytest.approx(5 + 15 + 2 + 15)


def test_until_start_remembers_solutions_within_a_tenth_of_a_percent_and_forgets_them_on_observe():
    from mflux_server.core.rows import Arrival

    cost = CostModel.fit([])
    log = ArrivalLog()
    urgent = [Arrival(n, "schnell", 1, 1024, 1024, 4, 1, NOW - 300 + n * 3) for n in range(100)]
    log.observe(urgent, NOW, cost)

    def exact(ahead):
        return log._solve("schnell", 0, 1, ahead, OVERTAKING_QUANTILE)

    for ahead in (3.7, 41.23, 1234.567, 98765.4):
        assert log.until_start("schnell", 0, 1, ahead) == pytest.approx(exact(ahead), rel=1e-3)
        assert log.until_start("schnell", 0, 1, ahead) > ahead, "overtakers lengthen the wait"
    before = log.until_start("schnell", 0, 1, 500.0)
    log.observe([Arrival(200 + n, "schnell", 1, 1024, 1024, 4, 4, NOW) for n in range(100)], NOW, cost)
    assert log.until_start("schnell", 0, 1, 500.0) > before, "a heavier load is solved afresh, not read from the cache"


def test_a_models_queue_merged_with_later_submits_is_the_claim_order_and_is_reused():
    rng = random.Random(5)
    cost = CostModel.fit([])

    def entry(seq: int) -> QueueEntry:
        return QueueEntry("schnell", rng.choice([0, 0, 0, 5]), seq, rng.choice([256, 512, 1024]), 512,
                          rng.choice([2, 4]), 1, 1000.0 + seq, rng.choice([0.0, 1.0, 2.0]))

    old = sorted((entry(seq) for seq in range(1, 400)),
                 key=lambda e: ClaimKey.of(e.priority, e.seq, e.fair_tag, e.fair_start))
    snap = QueueSnapshot.build(QueueRead(old, 399, 1), cost, 0.0)
    keys = snap.keys[Variant("schnell")]
    front = keys[37]  # 37 tasks claimed since the snapshot
    newer = [entry(seq) for seq in range(400, 430)]  # some of higher priority, some with smaller fair tags
    merged = snap.queue(Variant("schnell"), front, newer, cost)
    expected = sorted([(k, old_entry.created_at, cost.gpu_seconds(old_entry))
                       for k, old_entry in zip(keys, old, strict=True) if k >= front]
                      + [(ClaimKey.of(e.priority, e.seq, e.fair_tag, e.fair_start), e.created_at, cost.gpu_seconds(e))
                         for e in newer])
    assert merged.keys[merged.first:] == [k for k, _, _ in expected]
    assert merged.created[merged.first:] == [at for _, at, _ in expected]
    running = 0.0
    for i, (_, _, seconds) in enumerate(expected):
        running += seconds
        assert math.isclose(merged.prefix[merged.first + i + 1] - merged.prefix[merged.first], running)
    assert snap.queue(Variant("schnell"), front, newer, cost) is merged, "the next status request reuses the merge"
    assert snap.queue(Variant("schnell"), front, newer[:-1], cost) is not merged, "another submit set is merged anew"


def test_a_flood_of_submits_extends_the_snapshot_without_reading_the_queue_again(db, db_path, monkeypatch):
    forecaster = forecaster_for(db_path, refit_interval=60)
    first = [queue_task(db, steps=4 + i % 3, priority=i % 2) for i in range(20)]
    watched = first[-1]
    forecaster.estimate(db, current(db, watched.id), workers=1)
    built = forecaster._snapshot
    flood = [queue_task(db, model=("schnell", "dev")[i % 2], priority=(0, 0, 1)[i % 3], width=256 + 64 * (i % 4))
             for i in range(80)]  # past MAX_UNSNAPSHOTTED, with urgent ones that go ahead of older tasks
    monkeypatch.setattr(type(db), "read_queue", lambda c: pytest.fail("the whole queue was read again"))
    forecaster.estimate(db, current(db, watched.id), workers=1)
    forecaster.settle()
    extended = forecaster._snapshot
    assert extended is not built and extended.max_seq == flood[-1].seq
    monkeypatch.undo()
    fresh = forecaster_for(db_path, refit_interval=60)
    for each in (watched, flood[0], flood[-1], flood[31]):
        assert fresh.estimate(db, current(db, each.id), workers=1) == \
            forecaster.estimate(db, current(db, each.id), workers=1), "exactly what a fresh build says"
    assert fresh._snapshot.keys == extended.keys and fresh._snapshot.created == extended.created
    assert {m: pytest.approx(p) for m, p in fresh._snapshot.prefix.items()} == extended.prefix


def claimed_one_by_one(queues: dict[Variant, ModelQueue], worker: ReplayWorker) -> dict[tuple[Variant, ClaimKey], float]:
    """The claim policy run task by task, as the worker runs it (choose_variant before every claim, a load leaving
    the default LoRA set): when each waiting task starts. The oracle the whole-queue replay, which skips ahead in
    stretches, must agree with."""
    pointers = {name: queue.first for name, queue in queues.items()}
    loaded, now, starts = worker.loaded, worker.free_at, {}
    while True:
        heads = [WaitingHead(name.model, -queues[name].keys[i].neg_priority, queues[name].keys[i].seq,
                             queues[name].created[i], len(queues[name].keys) - i, len(queues[name].keys) - i, name.loras)
                 for name, i in pointers.items() if i < len(queues[name].keys)]
        choice = choose_variant(heads, loaded, list({name.model for name in queues}), now, worker.affinity_wait,
                                worker.loads)
        if choice is None:
            return starts
        if loaded is None or choice.model != loaded.model:
            now += expected_load(choice.model, worker.loads, worker.default_load)
            loaded = Variant(choice.model)
        if choice.loras != loaded.loras:
            now += expected_lora_change(choice.model, worker.loads, worker.default_load)
            loaded = choice
        queue, index = queues[choice], pointers[choice]
        starts[(choice, queue.keys[index])] = now
        now += queue.prefix[index + 1] - queue.prefix[index]
        pointers[choice] = index + 1


def test_one_replay_of_the_whole_queue_gives_every_tasks_start_as_claiming_task_by_task_does():
    rng = random.Random(11)
    for trial in range(80):
        queues = {}
        seqs = iter(rng.sample(range(100_000), 160))  # sequence numbers are unique across the queue
        variants = [Variant("schnell"), Variant("dev"), Variant("flux2-klein-4b"), Variant("dev", '[["ink",1.0]]'),
                    Variant("dev", '[["oil",0.5]]')]
        for variant in rng.sample(variants, rng.choice([2, 3, 4])):
            entries = sorted((ClaimKey.of(rng.choice([0, 0, 0, 1]), next(seqs), rng.choice([0.0, 0.0, 3.0])),
                              1000.0 + rng.uniform(0, 300), rng.uniform(1, 30)) for _ in range(rng.randrange(0, 40)))
            prefix = [0.0]
            for _, _, seconds in entries:
                prefix.append(prefix[-1] + seconds)
            queues[variant] = ModelQueue([k for k, _, _ in entries], [c for _, c, _ in entries], prefix,
                                         rng.randrange(0, 3) if entries else 0)
        worker = ReplayWorker(rng.choice([None, *queues]), 1200.0 + rng.uniform(0, 200), rng.choice([0.0, 60.0, 600.0]),
                              {"schnell": 20.0, "dev+loras": rng.choice([2.0, 9.0])}, 15.0)
        whole, expected = timeline(queues, worker), claimed_one_by_one(queues, worker)
        for variant, queue in queues.items():
            for key in queue.keys[queue.first:]:
                at = expected[(variant, key)]
                assert whole.start_in(queues, variant, key) == pytest.approx(at, abs=1e-6), (trial, variant, key)
                assert whole.started_before(queues, at) == sum(1 for t in expected.values() if t < at - 1e-6), \
                    (trial, variant, key)
