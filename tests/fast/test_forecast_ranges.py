"""The forecast's range: [p10, p90] from the measured spread, overtaking arrivals, loads and the work ahead."""

from __future__ import annotations

import random
import statistics
from dataclasses import replace

import pytest

from mflux_server.core.rows import Arrival, ForecastOutcome, Status, Timing, TimingStat
from mflux_server.forecast.arrivals import OVERTAKING_QUANTILE, ArrivalLog
from mflux_server.forecast.calibration import MIN_CALIBRATION_TASKS, Calibration
from mflux_server.forecast.cost_model import RUN_CORRELATION, UNMEASURED_SPREAD, CostModel, correlated_sd
from mflux_server.forecast.ranges import HIGH_QUANTILE, LOW_QUANTILE, Part, combined, normal
from tests.conftest import new_task as task
from tests.conftest import queue_task
from tests.fast.test_forecast import NOW, current, forecaster_for, settled


def stat(seconds: list[float], width: int = 1024, kind: str = "step", model: str = "schnell") -> TimingStat:
    return TimingStat(model, width, width, kind, len(seconds), sum(seconds), sum(s * s for s in seconds))


def test_the_relative_spread_is_what_was_measured_around_the_fit():
    rnd = random.Random(3)
    samples = [rnd.gauss(1.0, 0.1) for _ in range(400)]
    fitted = CostModel.fit([stat(samples)]).kind("schnell", "step")
    assert fitted.relative_sd(1.0) == pytest.approx(statistics.pstdev(samples) / statistics.fmean(samples), rel=1e-6)
    steady = CostModel.fit([stat([1.0] * 50)]).kind("schnell", "step")
    assert steady.relative_sd(1.0) == pytest.approx(0.0, abs=1e-6)
    assert CostModel.fit([]).kind("schnell", "step").relative_sd(1.0) == UNMEASURED_SPREAD


def test_a_size_measured_too_rarely_for_its_own_mean_counts_the_fits_miss_as_spread():
    # Three sizes on a line and a fourth, measured once, 30% above it: forecast from the fit, it misses by ~30%.
    stats = [stat([0.5 * (w / 1024) ** 2 + 0.5] * 5, width=w) for w in (512, 768, 1024)] + [stat([1.3 * 1.625], width=1280)]
    fitted = CostModel.fit(stats).kind("schnell", "step")
    assert fitted.relative_sd((1280 / 1024) ** 2) > 0.15
    assert fitted.relative_sd(1.0) == pytest.approx(0.0, abs=1e-6), "a size at its own mean has no miss"


def test_a_family_sibling_never_run_here_borrows_the_familys_spread():
    rnd = random.Random(4)
    cost = CostModel.fit([stat([rnd.gauss(0.6, 0.06) for _ in range(200)], model="schnell")])
    assert cost.kind("dev", "step").relative_sd(1.0) == pytest.approx(cost.kind("schnell", "step").relative_sd(1.0))
    assert cost.kind("dev", "step").relative_sd(1.0) == pytest.approx(0.1, rel=0.2)


def test_a_tasks_spread_grows_with_its_steps_but_shrinks_relative_to_its_time():
    rnd = random.Random(5)
    cost = CostModel.fit([stat([rnd.gauss(0.6, 0.06) for _ in range(200)]),
                          stat([rnd.gauss(0.1, 0.01) for _ in range(50)], kind="before"),
                          stat([rnd.gauss(0.1, 0.01) for _ in range(50)], kind="after")])
    short, long = task(width=1024, height=1024, steps=2), task(width=1024, height=1024, steps=40)
    assert cost.gpu_sd(long) > cost.gpu_sd(short)
    assert cost.gpu_sd(long) / cost.gpu_seconds(long) < cost.gpu_sd(short) / cost.gpu_seconds(short)
    # Shared machine state keeps a floor: a long task's relative spread never falls below √ρ of a step's.
    step_relative = cost.kind("schnell", "step").relative_sd(1.0)
    assert cost.gpu_sd(long) / cost.gpu_seconds(long) > step_relative * RUN_CORRELATION ** 0.5 * 0.9


def test_correlated_sums_lie_between_independent_and_fully_shared():
    for n in (1, 4, 30):
        assert n ** 0.5 * 2.0 <= correlated_sd(2.0, n) + 1e-12
        assert correlated_sd(2.0, n) <= n * 2.0 + 1e-12
    assert correlated_sd(2.0, 1) == pytest.approx(2.0)
    assert correlated_sd(2.0, 0) == 0.0


def test_combining_keeps_each_side_and_adds_independent_parts_in_quadrature():
    low, high = combined(100.0, [Part(10.0, 10.0, 40.0), Part(50.0, 47.0, 54.0)])
    assert low == pytest.approx(97.0)
    assert high == pytest.approx(100.0 + (30.0 ** 2 + 4.0 ** 2) ** 0.5)
    assert combined(1.0, [normal(1.0, 5.0)])[0] == 0.0, "never below zero"
    assert combined(7.0, []) == (7.0, 7.0)


def urgent_arrivals(sizes: list[int]) -> list[Arrival]:
    return [Arrival(n, "schnell", 1, size, size, 4, 1, NOW - 300 + n * 300 / len(sizes)) for n, size in enumerate(sizes)]


def test_overtaking_makes_the_range_wider_above_than_below_and_size_variety_wider_still():
    cost = CostModel.fit([])
    even, varied = ArrivalLog(), ArrivalLog()
    even.observe(urgent_arrivals([1024] * 40), NOW, cost)
    # The same mean engine time per arrival, from very different sizes.
    small, large = cost.gpu_seconds(task(width=256, height=256)), cost.gpu_seconds(task(width=1536, height=1536))
    mean = cost.gpu_seconds(task(width=1024, height=1024))
    share = (mean - small) / (large - small)
    sizes = [1536 if i < round(40 * share) else 256 for i in range(40)]
    varied.observe(urgent_arrivals(sizes), NOW, cost)
    for log in (even, varied):
        low, point, high = (log.until_start("schnell", 0, 1, 60.0, q) for q in (LOW_QUANTILE, OVERTAKING_QUANTILE,
                                                                                  HIGH_QUANTILE))
        assert 60.0 <= low <= point < high
        assert high - point > point - low, "overtaking is skewed: often little, sometimes much"
    assert varied.until_start("schnell", 0, 1, 60.0, HIGH_QUANTILE) > even.until_start("schnell", 0, 1, 60.0, HIGH_QUANTILE)
    assert varied.until_start("schnell", 0, 1, 60.0) == pytest.approx(even.until_start("schnell", 0, 1, 60.0), rel=0.05), \
        "the point forecast keeps its count quantile alone"
    assert even.until_start("schnell", 1, 1, 60.0, HIGH_QUANTILE) == 60.0, "nothing overtakes the top priority"


def test_a_waiting_tasks_range_holds_its_forecast_and_widens_with_measured_noise(db, db_path):
    for _ in range(5):
        queue_task(db, width=1024, height=1024, steps=8)
    last = queue_task(db, width=1024, height=1024, steps=8)
    tight = settled(forecaster_for(db_path), db, last.id)
    assert tight.low < tight.seconds < tight.high
    rnd = random.Random(6)
    db.record_timings("schnell", 1024, 1024, [Timing("step", tuple(rnd.uniform(0.1, 1.1) for _ in range(60)))])
    noisy = settled(forecaster_for(db_path), db, last.id)
    assert noisy.low < noisy.seconds < noisy.high
    assert (noisy.high - noisy.low) / noisy.seconds > (tight.high - tight.low) / tight.seconds, \
        "steps measured at ±83% give a wider range than the unmeasured prior's"
    steady = random.Random(7)
    db.record_timings("schnell", 1024, 1024, [Timing("step", tuple(0.6 + steady.uniform(-0.001, 0.001) for _ in range(2000)))])
    calm = settled(forecaster_for(db_path), db, last.id)
    assert (calm.high - calm.low) / calm.seconds < (noisy.high - noisy.low) / noisy.seconds


def test_a_running_tasks_range_holds_what_is_left(db, db_path):
    running = queue_task(db, width=1024, height=1024, steps=20)
    db.claim_next("w", "schnell", "synthetic")
    estimate = forecaster_for(db_path).estimate(db, current(db, running.id), 1)
    assert estimate.low < estimate.seconds < estimate.high
    ended = forecaster_for(db_path).estimate(db, replace(current(db, running.id), status=Status.DONE), 1)
    assert (ended.seconds, ended.low, ended.high) == (0.0, 0.0, 0.0)


def test_submit_status_and_task_views_carry_the_range_and_the_schema_documents_it(client):
    db = client.application.extensions["mflux_sessions"].get()
    client.post("/api/generate", json={"prompt": "runs", "steps": 20})
    db.claim_next("w", "schnell", "synthetic")
    for _ in range(3):
        client.post("/api/generate", json={"prompt": "waits", "steps": 20})
    body = client.post("/api/generate", json={"prompt": "mine", "steps": 20}).json
    low, high = body["expected_time_range"]
    assert low < body["expected_time_seconds"] < high
    assert body["wait_range"] == body["expected_time_range"]
    status = client.get("/api/status", query_string={"task_id": body["task_id"]}).json
    assert status["wait_range"][0] <= status["wait_remaining"] <= status["wait_range"][1]
    view = client.get(f"/api/tasks/{body['task_id']}").json
    assert view["wait_range"][0] < view["wait_remaining"] < view["wait_range"][1]
    client.delete(f"/api/tasks/{body['task_id']}")
    assert client.get("/api/status", query_string={"task_id": body["task_id"]}).json["wait_range"] == [0.0, 0.0]
    schemas = client.get("/openapi.json").json["components"]["schemas"]
    assert "p10, p90" in schemas["TaskStatus"]["properties"]["wait_range"]["description"]
    assert schemas["GenerateResponse"]["properties"]["expected_time_range"]["type"] == "array"


def test_the_cli_progress_line_prints_the_range_beside_the_forecast():
    from mflux_server.client.cli import progress_line

    assert progress_line({"event": "status", "status": "waiting", "position": 3, "wait_remaining": 40.2,
                          "wait_range": [30.4, 55.1]}) == "queued: 3 ahead, ~40 s, 30–55 s"
    # At submit the answer names them expected_time_*; a range that rounds to one number is not repeated.
    assert progress_line({"pos": 0, "expected_time_seconds": 2.2, "expected_time_range": [1.9, 2.4]}) == "queued: 0 ahead, ~2 s"
    running = progress_line({"event": "progress", "status": "processing", "image": 1, "count": 2, "step": 5, "steps": 10,
                             "wait_remaining": 12.0, "wait_range": [10.0, 15.0]})
    assert running is not None and running.endswith("~12 s, 10–15 s left")


def outcome(point: float, took: float) -> ForecastOutcome:
    return ForecastOutcome(point, took)


def test_calibration_replaces_the_models_range_by_what_recent_tasks_took_as_a_share_of_their_forecast():
    rnd = random.Random(8)
    # The model said ±10% but tasks took ±40%: the range becomes the forecast times the ratios' 10th and 90th
    # percentiles, and holds four in five of such tasks, one in ten below.
    missed = [outcome(100.0, rnd.uniform(60.0, 140.0)) for _ in range(200)]
    wide = Calibration.of(missed)
    low, high = wide.applied(50.0, 45.0, 55.0)  # another forecast: the same shares of it
    assert low == pytest.approx(50.0 * wide.low_ratio) and high == pytest.approx(50.0 * wide.high_ratio)
    low, high = wide.applied(100.0, 90.0, 110.0)
    assert 0.78 <= statistics.fmean(low <= o.took <= high for o in missed) <= 0.85
    assert 0.08 <= statistics.fmean(o.took < low for o in missed) <= 0.12, "one in ten below, as a 10th percentile"
    # Ranges of ±50% around times that stay within ±5%: as narrow as the times were.
    calm = [outcome(100.0, rnd.uniform(95.0, 105.0)) for _ in range(200)]
    low, high = Calibration.of(calm).applied(100.0, 50.0, 150.0)
    assert 94.0 < low <= 100.0 <= high < 106.0
    assert 0.78 <= statistics.fmean(low <= o.took <= high for o in calm) <= 0.85
    # Every task took twice its forecast: the range reaches there, and still holds the forecast shown beside it.
    slow = Calibration.of([outcome(10.0, 20.0 + n / 100) for n in range(50)])
    assert slow.applied(10.0, 9.0, 11.0) == pytest.approx((10.0, 20.45), abs=0.01)


def test_calibration_gives_a_forecast_the_spread_of_recent_tasks_whose_model_range_was_alike():
    rnd = random.Random(9)
    # Half the tasks were sure things (model range up to +10%, took ±5%), half waited behind a burst (model range
    # up to +100%, took 0.5× to 2×). Pooled, the burst's tasks would fall outside far more than one in five.
    sure = [ForecastOutcome(100.0, rnd.uniform(95.0, 105.0), 110.0) for _ in range(100)]
    burst = [ForecastOutcome(100.0, rnd.uniform(50.0, 200.0), 200.0) for _ in range(100)]
    calibration = Calibration.of(sure + burst)
    for kind, high in ((sure, 110.0), (burst, 200.0)):
        low_end, high_end = calibration.applied(100.0, 90.0, high)
        assert 0.75 <= statistics.fmean(low_end <= o.took <= high_end for o in kind) <= 0.88
    assert calibration.applied(100.0, 90.0, 110.0)[1] < 106.0, "a sure thing's range stays narrow"
    pooled = Calibration.of([ForecastOutcome(o.point, o.took) for o in sure + burst])
    low_end, high_end = pooled.applied(100.0, 90.0, 200.0)
    assert statistics.fmean(low_end <= o.took <= high_end for o in burst) < 0.7, "what the halves are for"
    # A half with too few tasks, and a forecast without a model range, take the pooled ratios.
    lopsided = Calibration.of(sure + burst[:MIN_CALIBRATION_TASKS - 1])
    assert lopsided.wide is None and lopsided.narrow is not None
    assert lopsided.applied(100.0, 90.0, 200.0) == pytest.approx((100.0 * lopsided.low_ratio, 100.0 * lopsided.high_ratio))


def test_calibration_waits_for_enough_finished_tasks():
    few = [outcome(10.0, 30.0)] * (MIN_CALIBRATION_TASKS - 1)
    assert Calibration.of(few) == Calibration(0.0, 0.0, MIN_CALIBRATION_TASKS - 1)
    assert Calibration.of(few).applied(10.0, 9.0, 11.0) == (9.0, 11.0), "the model's range until then"
    enough = Calibration.of(few + [outcome(10.0, 30.0)])
    assert (enough.low_ratio, enough.high_ratio) == pytest.approx((3.0, 3.0))
    assert enough.applied(10.0, 9.0, 11.0) == pytest.approx((10.0, 30.0))


def test_a_submit_keeps_the_models_range_and_later_forecasts_learn_from_what_tasks_took(client):
    db = client.application.extensions["mflux_sessions"].get()
    worker = db.register_worker("synthetic", "schnell", None)  # a live worker: the forecast is recorded
    client.post("/api/generate", json={"prompt": "runs", "steps": 20})
    db.claim_next(worker, "schnell", "synthetic")
    first = client.post("/api/generate", json={"prompt": "waits", "steps": 20}).json
    stored = db.session.execute("SELECT forecast_seconds, forecast_low, forecast_high FROM tasks WHERE id = ?",
                                (first["task_id"],)).fetchone()
    assert stored[0] == pytest.approx(first["expected_time_seconds"], abs=1e-3)
    assert stored[1] < stored[0] < stored[2]
    assert [stored[1], stored[2]] == pytest.approx(first["expected_time_range"], abs=1e-3), "no calibration yet"
    # Twenty finished tasks that each took three times their forecast: the next range reaches that far.
    for n in range(MIN_CALIBRATION_TASKS):
        done = queue_task(db, now=NOW - 100 - n)
        db.set_forecast(done.id, 10.0, (9.0, 11.0))
        db.session.execute("UPDATE tasks SET status = 'done', started_at = created_at, finished_at = created_at + 30 "
                           "WHERE id = ?", (done.id,))
    forecaster = client.application.extensions["mflux_forecaster"]
    forecaster._calibration = (forecaster._calibration[0], float("-inf"))  # read again now, not in 10 s
    later = client.post("/api/generate", json={"prompt": "after", "steps": 20}).json
    low, high = later["expected_time_range"]
    assert high >= later["expected_time_seconds"] * 2.9, later


def test_the_compound_poisson_quantiles_match_a_simulation():
    from mflux_server.forecast.numerics import compound_poisson_quantile

    rnd = random.Random(9)
    for expected, mean, sd in ((1.5, 1.0, 1.0), (6.0, 2.0, 1.0)):
        sums = []
        for _ in range(20000):
            count, clock = 0, rnd.expovariate(1.0)
            while clock < expected:
                count, clock = count + 1, clock + rnd.expovariate(1.0)
            sums.append(sum(rnd.gammavariate((mean / sd) ** 2, sd * sd / mean) for _ in range(count)))
        sums.sort()
        for q in (LOW_QUANTILE, HIGH_QUANTILE):
            simulated = sums[int(q * len(sums))]
            assert compound_poisson_quantile(expected, mean, sd, q) == pytest.approx(simulated, abs=0.1 * mean + 0.08 * simulated)
