"""The webhook outbox: rows written with the task's end, leased, signed, retried with backoff, given up after a day."""

from __future__ import annotations

import json
import random
import time

import pytest
from standardwebhooks import Webhook

from mflux_server import store
from mflux_server.core import webhooks
from mflux_server.core.results import acedata_result, native_event
from mflux_server.core.rows import Delivery, DeliveryState
from mflux_server.store import Store
from mflux_server.testing import TEST_WEBHOOK_SECRET, WebhookReceiver
from tests.conftest import images_for, queue_task

HOOK = "https://example.com/hook"


def finish(db: Store, **overrides: object):
    """Queue, claim and complete a task; returns its row as queued."""
    task = queue_task(db, **overrides)
    assert db.claim_next("w", task.model, "synthetic").id == task.id  # type: ignore[union-attr]
    assert db.complete(task.id, "w", images_for(task))
    return task


def test_a_task_ending_records_its_delivery_in_the_same_transaction(db):
    task = finish(db, callback_url=HOOK, link_base="http://server:4030/", count=2)
    [delivery] = db.task_deliveries(task.id)
    assert (delivery.id, delivery.url, delivery.state, delivery.attempts) == (f"msg_{task.id}", HOOK, "pending", 0)
    snapshot = json.loads(delivery.task)
    assert snapshot["status"] == "done" and snapshot["count"] == 2 and snapshot["started_at"] is not None
    # The snapshot outlives the task: fetching its images deletes it, the delivery keeps what it needs.
    db.cancel_or_delete(task.id)
    assert db.get(task.id) is None
    body = native_event(json.loads(db.task_deliveries(task.id)[0].task))
    assert body["type"] == "task.done"
    assert [i["url"] for i in body["data"]["images"]] == [
        f"http://server:4030/api/image?task_id={task.id}&index={i}" for i in range(2)]


def test_every_way_a_task_ends_records_one_delivery_and_tasks_without_callback_none(db):
    plain = finish(db)
    canceled = queue_task(db, callback_url=HOOK)
    db.cancel_or_delete(canceled.id)
    failed = queue_task(db, callback_url=HOOK)
    db.claim_next("w", failed.model, "synthetic")
    db.fail(failed.id, "w", "out of memory")
    assert db.task_deliveries(plain.id) == []
    assert json.loads(db.task_deliveries(canceled.id)[0].task)["status"] == "canceled"
    [delivery] = db.task_deliveries(failed.id)
    assert acedata_result(json.loads(delivery.task))["error"]["message"] == "out of memory"


def test_a_claimed_delivery_is_leased_until_it_expires(db):
    finish(db, callback_url=HOOK)
    first = db.claim_delivery(lease=30, now=1e10)
    assert first is not None and first.attempts == 1
    assert db.claim_delivery(lease=30, now=1e10 + 29) is None, "another deliverer must leave it alone"
    again = db.claim_delivery(lease=30, now=1e10 + 31)
    assert again is not None and again.id == first.id and again.attempts == 2


def fake(attempts: int, created_at: float = 0.0) -> Delivery:
    return Delivery("msg_x", "x", HOOK, "native", "{}", DeliveryState.PENDING, attempts, 0.0, None, None, None,
                    created_at, None)


def test_retries_back_off_exponentially_with_jitter_and_stop_after_a_day():
    rng = random.Random(7)
    delays = [webhooks.retry_at(fake(n), 1000.0, rng) - 1000.0 for n in range(1, 8)]  # type: ignore[operator]
    assert 0 < delays[0] <= 5, "the first retry comes within 5 s"
    assert all(later > earlier for earlier, later in zip(delays, delays[1:], strict=False))
    assert max(webhooks.retry_at(fake(40), 0.0, rng) or 0, 0) <= webhooks.MAX_RETRY_DELAY
    assert webhooks.retry_at(fake(12), webhooks.GIVE_UP_AFTER + 1.0, rng) is None
    spread = {round(webhooks.retry_at(fake(3), 0.0, rng), 3) for _ in range(20)}  # type: ignore[arg-type]
    assert len(spread) > 10, "jitter spreads retries of deliveries that failed together"


def test_the_signature_verifies_with_standard_webhooks(db):
    task = finish(db, callback_url=HOOK, surface="acedata")
    delivery = db.task_deliveries(task.id)[0]
    body, headers = webhooks.signed_request(delivery, TEST_WEBHOOK_SECRET, now=time.time())
    assert headers["webhook-id"] == delivery.id
    parsed = Webhook(TEST_WEBHOOK_SECRET).verify(body, headers)
    assert parsed["success"] is True and parsed["task_id"].replace("-", "") == task.id
    with pytest.raises(Exception, match="signature"):
        Webhook(webhooks.generate_secret()).verify(body, headers)


def test_the_generated_secret_is_made_once_and_kept(db_path):
    first, second = store.connect(db_path), store.connect(db_path)
    made = webhooks.signing_secret(first, None)
    assert made.startswith("whsec_") and webhooks.signing_secret(second, None) == made
    assert webhooks.signing_secret(second, TEST_WEBHOOK_SECRET) == TEST_WEBHOOK_SECRET


def test_a_deliverer_retries_a_failing_receiver_and_records_each_attempt(db_path, db):
    receiver = WebhookReceiver(statuses=(500,))
    try:
        task = finish(db, callback_url=receiver.url)
        clock = [time.time()]
        deliverer = webhooks.Deliverer(lambda: store.connect(db_path), TEST_WEBHOOK_SECRET, allow_private=True,
                                       clock=lambda: clock[0])
        delivery = db.claim_delivery(webhooks.LEASE, clock[0])
        assert delivery is not None and not deliverer.deliver(db, delivery)
        failed = db.task_deliveries(task.id)[0]
        assert (failed.state, failed.last_status, failed.attempts) == ("pending", 500, 1)
        assert "HTTP 500" in (failed.last_error or "") and failed.next_at <= clock[0] + 5
        assert db.claim_delivery(webhooks.LEASE, clock[0]) is None, "not due before its retry time"
        clock[0] = failed.next_at
        retried = db.claim_delivery(webhooks.LEASE, clock[0])
        assert retried is not None and deliverer.deliver(db, retried)
        done = db.task_deliveries(task.id)[0]
        assert (done.state, done.last_status, done.attempts) == ("delivered", 200, 2)
        assert [wid for _, wid in receiver.attempts] == [f"msg_{task.id}"] * 2, "one stable id for de-duplication"
        assert len(receiver.received) == 1 and not receiver.rejected
    finally:
        receiver.close()


def test_a_private_target_is_refused_at_send_time_without_the_opt_in(db_path, db):
    receiver = WebhookReceiver()
    try:
        task = finish(db, callback_url=receiver.url)
        deliverer = webhooks.Deliverer(lambda: store.connect(db_path), TEST_WEBHOOK_SECRET, allow_private=False)
        delivery = db.claim_delivery(webhooks.LEASE)
        assert delivery is not None and not deliverer.deliver(db, delivery)
        assert "loopback" in (db.task_deliveries(task.id)[0].last_error or "")
        assert receiver.attempts == []
    finally:
        receiver.close()


def test_a_delivery_still_failing_after_a_day_is_marked_failed(db_path, db):
    task = finish(db, callback_url="http://127.0.0.1:9/closed")
    deliverer = webhooks.Deliverer(lambda: store.connect(db_path), TEST_WEBHOOK_SECRET, allow_private=True,
                                   clock=lambda: 1e12)  # long after the task ended
    delivery = db.claim_delivery(webhooks.LEASE, 1e12)
    assert delivery is not None and not deliverer.deliver(db, delivery)
    assert db.task_deliveries(task.id)[0].state == "failed"


def test_tasks_kept_for_their_links_are_removed_once_the_links_expire(db):
    linked = finish(db, keep_for=10.0)
    kept = finish(db)
    ended = db.get(linked.id).finished_at  # type: ignore[union-attr]
    waiting = queue_task(db, keep_for=10.0)
    assert db.remove_expired(now=ended + 9) == 0
    assert db.remove_expired(now=ended + 11) == 1
    assert db.get(linked.id) is None
    assert db.get(kept.id) is not None and db.get(waiting.id) is not None
