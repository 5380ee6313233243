"""Scheduling by variant: a model with a LoRA set is claimed as a unit, within the same starvation bound."""

from __future__ import annotations

import pytest

from mflux_server import store
from mflux_server.core.rows import WaitingHead, lora_set_text
from mflux_server.core.scheduling import LORA_CHANGE, Variant, choose_variant, expected_load, switch_lead
from tests.conftest import queue_task

INK = lora_set_text((("ink", 1.0),))
PAPER = lora_set_text((("paper", 0.5),))


def head(model: str, loras: str, seq: int, age: float, images: int = 1, priority: int = 0) -> WaitingHead:
    return WaitingHead(model, priority, seq, 1000.0 - age, 1, images, loras)


def test_the_held_lora_set_keeps_its_work_while_it_waits():
    heads = [head("dev", PAPER, 1, 50, images=9), head("dev", INK, 2, 10)]
    assert choose_variant(heads, Variant("dev", INK), ["dev"], 1000.0, 120) == Variant("dev", INK)
    # Without its own work waiting, another set of the held model goes before another model with more work.
    others = [head("schnell", "", 3, 10, images=20), head("dev", PAPER, 1, 10)]
    assert choose_variant(others, Variant("dev", INK), ["dev", "schnell"], 1000.0, 120) == Variant("dev", PAPER)


def test_a_set_that_waited_past_the_bound_less_its_change_cost_is_served_first():
    heads = [head("dev", INK, 5, 10), head("dev", PAPER, 1, 100)]
    loaded = Variant("dev", INK)
    assert choose_variant(heads, loaded, ["dev"], 1000.0, 120) == loaded
    # The change is measured at 30 s: the paper task falls due 30 s early, so the change ends within the bound.
    measured = {"dev": 60.0, "dev" + LORA_CHANGE: 30.0}
    assert choose_variant(heads, loaded, ["dev"], 1000.0, 120, measured) == Variant("dev", PAPER)
    assert switch_lead(Variant("dev", PAPER), loaded, measured) == 30.0
    # Never measured, a change is charged as the model's reload; a model switch as its load.
    assert switch_lead(Variant("dev", PAPER), loaded, {"dev": 60.0}) == 60.0
    assert switch_lead(Variant("schnell"), loaded, measured) == expected_load("schnell", measured, 0.0) == 60.0


def test_a_higher_priority_wins_over_the_held_set_and_the_default_set_is_a_variant_of_its_own():
    heads = [head("dev", INK, 1, 10, images=5), head("dev", "", 2, 5, priority=1)]
    assert choose_variant(heads, Variant("dev", INK), ["dev"], 1000.0, 120) == Variant("dev", "")
    assert choose_variant([head("qwen-image", INK, 1, 999)], Variant("dev"), ["dev"], 1000.0, 120) is None


def test_a_claim_by_lora_set_takes_that_sets_next_task_on_either_store(store_db):
    db = store.connect(store_db)
    try:
        first = queue_task(db, model="dev", loras=INK, prompt="ink 1")
        queue_task(db, model="dev", loras=PAPER, prompt="paper 1")
        queue_task(db, model="dev", loras=INK, prompt="ink 2")
        queue_task(db, model="schnell", loras=INK, prompt="schnell ink")
        heads = {(h.model, h.loras): (h.tasks, h.seq) for h in db.waiting_heads()}
        assert heads == {("dev", INK): (2, first.seq), ("dev", PAPER): (1, first.seq + 1),
                         ("schnell", INK): (1, first.seq + 3)}
        assert db.claim_next("w", "dev", "synthetic", loras=PAPER).prompt == "paper 1"
        assert db.claim_next("w", "dev", "synthetic", loras=PAPER) is None
        assert [db.claim_next("w", "dev", "synthetic", loras=INK).prompt for _ in range(2)] == ["ink 1", "ink 2"]
        assert db.claim_next("w", "dev", "synthetic", loras="") is None
        assert db.claim_next("w", "schnell", "synthetic").prompt == "schnell ink", "without loras: any set"
    finally:
        db.close()


def test_the_claim_by_lora_set_is_one_index_lookup_without_a_sort(db):
    if db.capabilities.notifies:
        return  # the plan test is SQLite's; PostgreSQL runs the same statement through the same index
    sql = db._queries["claim_next_variant"].sql
    inner = sql[sql.index("(SELECT") + 1:sql.rindex(")")]
    plan = " | ".join(row[3] for row in db.session.execute("EXPLAIN QUERY PLAN " + inner, {"model": "dev", "loras": ""}))
    assert "USING INDEX tasks_variant_queue (model=? AND loras=?)" in plan and "TEMP B-TREE" not in plan, plan
    front = db._queries["waiting_front"].sql  # the forecast's read of a variant's first waiting task
    plan = " | ".join(row[3] for row in db.session.execute("EXPLAIN QUERY PLAN " + front,
                                                           {"model": "dev", "loras": "", "seq": 5}))
    assert "USING INDEX tasks_variant_queue (model=? AND loras=?)" in plan and "TEMP B-TREE" not in plan, plan


def test_the_forecast_charges_the_measured_change_to_a_tasks_lora_set_unless_it_is_running(db, db_path):
    from mflux_server.forecast.queue_view import Forecaster

    forecaster = Forecaster(connect=lambda: store.connect(db_path), clock=lambda: 1000.0, refit_interval=0)
    db.record_load("schnell" + LORA_CHANGE, 30.0)
    plain, inked = queue_task(db, prompt="plain"), queue_task(db, prompt="ink", loras=INK)
    alone = {t.prompt: forecaster.estimate(db, db.get(t.id), 1, now=1000.0).seconds for t in (plain, inked)}
    ahead = forecaster.cost_model(db).gpu_seconds(plain)
    assert alone["ink"] - alone["plain"] == pytest.approx(ahead + 30.0), "the plain task first, then the change to ink"
    db.claim_next("w", "schnell", "synthetic")  # the plain task runs: the worker holds the default set
    later = queue_task(db, prompt="ink 2", loras=INK)
    before_change = forecaster.estimate(db, db.get(later.id), 1, now=1000.0).seconds
    db.claim_next("w", "schnell", "synthetic", loras=INK)  # now ink runs: no change ahead of ink 2
    assert before_change - forecaster.estimate(db, db.get(later.id), 1, now=1000.0).seconds > 29.0



def test_an_idle_worker_holding_a_set_is_not_charged_a_change_to_it(db, db_path):
    from mflux_server.forecast.queue_view import Forecaster

    forecaster = Forecaster(connect=lambda: store.connect(db_path), clock=lambda: 1000.0, refit_interval=0)
    db.record_load("schnell" + LORA_CHANGE, 30.0)
    worker = db.register_worker("synthetic", "schnell", None)
    inked = db.get(queue_task(db, prompt="ink", loras=INK).id)

    def seconds() -> float:
        return forecaster.estimate(db, inked, 1, now=1000.0, live=db.live_workers(60)).seconds  # 1: it holds schnell

    charged = seconds()
    db.worker_loras(worker, INK)
    assert charged - seconds() == pytest.approx(30.0), "the worker holds ink: no change ahead"
    db.worker_loading(worker, "schnell", None, ["schnell"])  # a (re)load holds the default set again
    assert seconds() == pytest.approx(charged)


def test_a_worker_taking_hub_loras_without_a_library_groups_its_work_by_set(db, db_path):
    from mflux_server.core.settings import Settings
    from mflux_server.worker.claim_loop import ClaimLoop
    from mflux_server.worker.engines.synthetic import SyntheticEngine

    paper = queue_task(db, model="dev", loras=PAPER, prompt="paper")
    queue_task(db, model="dev", loras=INK, prompt="ink")
    loop = ClaimLoop(Settings(db=db_path, lora_hub=True), SyntheticEngine("dev"), "w", db,
                     None, None, None)  # type: ignore[arg-type]
    loop.loras = INK
    assert loop.claim().prompt == "ink", "the held set's task first, though the other set's was queued before it"
    assert loop.claim().id == paper.id


def grouped_queue(db, db_path, bound: float = 3600.0):
    """A worker holding ink with a bound of `bound` seconds, the change of set measured at 30 s, and five waiting
    tasks of one shape submitted at 300 s (before the 10-minute arrival window of a forecast at 1000 s): paper, ink,
    paper, ink, then the default set. Returns the forecaster, the tasks by name and an estimate at 1000 s."""
    from mflux_server.forecast.queue_view import Forecaster

    forecaster = Forecaster(connect=lambda: store.connect(db_path), clock=lambda: 1000.0, refit_interval=0)
    db.record_load("dev" + LORA_CHANGE, 30.0)
    worker = db.register_worker("synthetic", "dev", None, affinity_wait=bound)
    db.worker_loras(worker, INK)
    tasks = {name: queue_task(db, now=300.0, model="dev", prompt=name,
                              loras={"paper": PAPER, "ink": INK}.get(name.split()[0], ""))
             for name in ["paper 1", "ink 1", "paper 2", "ink 2", "plain"]}

    def estimate(name: str):
        return forecaster.estimate(db, db.get(tasks[name].id), 1, now=1000.0, live=db.live_workers(60))

    return forecaster, tasks, estimate


def test_a_worker_grouping_by_set_is_replayed_so_each_task_is_forecast_after_the_sets_served_first(db, db_path):
    forecaster, tasks, estimate = grouped_queue(db, db_path)
    cost = forecaster.cost_model(db)
    one, own = cost.gpu_seconds(tasks["ink 1"]), cost.task_seconds(tasks["ink 1"])  # every task has the same shape
    # The worker holds ink: both ink tasks, a change to paper (the set with more work), both paper tasks, then the
    # change to the default set and the plain task; nothing has waited past the bound. No recent arrivals: the
    # replay is the whole forecast.
    expected = {"ink 1": (0, 0), "ink 2": (1, 0), "paper 1": (2, 30), "paper 2": (3, 30), "plain": (4, 60)}
    for name, (pos, changes) in expected.items():
        got = estimate(name)
        assert (got.pos, got.seconds) == (pos, pytest.approx(pos * one + changes + own, rel=1e-6)), name


def test_the_queue_read_with_each_tasks_lora_set_stays_one_index_only_scan_on_postgresql(store_db):
    db = store.connect(store_db)
    try:
        if not db.capabilities.notifies:
            return  # SQLite reads the rows for the fair tags anyway; the plan test is PostgreSQL's
        with db.session.transaction():
            db.session.execute("SET LOCAL enable_seqscan = off")  # an empty table is otherwise read whole
            plan = " | ".join(row[0] for row in db.session.execute("EXPLAIN " + db._queries["waiting_queue"].sql))
        assert "Index Only Scan using tasks_queue" in plan and "Sort" not in plan, plan
    finally:
        db.close()
