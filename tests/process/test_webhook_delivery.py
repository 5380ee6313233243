"""Webhooks between real processes: a receiver that verifies every signature, an API killed with SIGKILL before the
delivery, a receiver that fails before it answers, and targets the server must refuse."""

from __future__ import annotations

import requests

from mflux_server import store
from mflux_server.testing import TEST_WEBHOOK_SECRET, WebhookReceiver, wait_for

SERVER = ("--webhook-secret", TEST_WEBHOOK_SECRET, "--webhook-allow-private")




def test_a_task_finished_while_the_api_was_killed_is_delivered_when_it_returns(processes):
    receiver = WebhookReceiver()
    try:
        url = processes.server(*SERVER)
        task = requests.post(f"{url}/api/generate", timeout=10, json={
            "prompt": "delivered later", "width": 256, "height": 256, "callback_url": receiver.url}).json()
        processes.kill_server()  # no worker yet: the task ends only after the API is gone
        processes.worker(speed=50)
        db = store.connect(processes.db_path)
        wait_for(lambda: db.task_deliveries(task["task_id"]), what="the delivery to be recorded with the task's end")
        assert db.get(task["task_id"]).status == "done"  # type: ignore[union-attr]
        assert receiver.attempts == [], "nothing can deliver while the API is down"
        processes.server(*SERVER, port=int(url.rsplit(":", 1)[1]))  # back where the image links point
        wait_for(lambda: receiver.received, what="the delivery after the restart")
        _, headers, body = receiver.received[0]
        assert headers["webhook-id"] == f"msg_{task['task_id']}"
        assert body["type"] == "task.done" and body["data"]["task_id"] == task["task_id"]
        image = requests.get(body["data"]["images"][0]["url"], timeout=10)
        assert image.status_code == 200 and image.headers["Content-Type"] == "image/jpeg"
        assert db.task_deliveries(task["task_id"])[0].state == "delivered"
    finally:
        receiver.close()


def test_a_failing_receiver_gets_retries_with_one_id_until_it_answers(processes):
    receiver = WebhookReceiver(statuses=(500, 500))
    try:
        url = processes.server(*SERVER, http_workers=2)  # two deliverers share the outbox: still one delivery
        processes.worker(speed=50)
        task = requests.post(f"{url}/api/generate", timeout=10, json={
            "prompt": "retried", "width": 256, "height": 256, "callback_url": receiver.url}).json()
        status = wait_for(lambda: (s := requests.get(f"{url}/api/status", params={"task_id": task["task_id"]},
                                                     timeout=5).json())["webhook"]["state"] == "delivered" and s,
                          timeout=30, what="the delivery to succeed on the third attempt")
        assert status["webhook"]["attempts"] == 3 and status["webhook"]["last_status"] == 200
        times = [at for at, _ in receiver.attempts]
        assert {wid for _, wid in receiver.attempts} == {f"msg_{task['task_id']}"} and len(times) == 3
        assert times[1] - times[0] <= 5, "the first retry comes within 5 s"
        assert times[2] - times[1] > (times[1] - times[0]) / 2, "retries back off"
        assert len(receiver.received) == 1 and not receiver.rejected
    finally:
        receiver.close()


def test_a_failing_delivery_is_visible_on_the_task(processes):
    url = processes.server(*SERVER)
    processes.worker(speed=50)
    task = requests.post(f"{url}/api/generate", timeout=10, json={
        "prompt": "nobody listens", "width": 256, "height": 256, "callback_url": "http://127.0.0.1:9/closed"}).json()
    hook = wait_for(lambda: (w := requests.get(f"{url}/api/status", params={"task_id": task["task_id"]},
                                               timeout=5).json()["webhook"])["attempts"] >= 1 and w["last_error"] and w,
                    what="a failed attempt")
    assert hook["state"] == "pending" and hook["next_attempt_at"] is not None
    assert "Connection" in hook["last_error"] or "refused" in hook["last_error"].lower()


def test_loopback_targets_are_refused_without_the_opt_in(processes):
    receiver = WebhookReceiver()
    try:
        url = processes.server("--webhook-secret", TEST_WEBHOOK_SECRET)
        refused = requests.post(f"{url}/api/generate", timeout=10, json={"prompt": "x", "callback_url": receiver.url})
        assert refused.status_code == 422
        assert refused.json()["field"] == "callback_url" and "loopback" in refused.json()["message"]
        ace = requests.post(f"{url}/flux/images", timeout=10, json={"prompt": "x", "callback_url": receiver.url})
        assert ace.status_code == 400 and ace.json()["error"]["field"] == "callback_url"
        assert requests.get(f"{url}/api/tasks", timeout=5).json()["total"] == 0, "nothing was queued"
        assert receiver.attempts == []
    finally:
        receiver.close()


def test_the_generated_secret_is_printed_by_the_command_and_signs_deliveries(processes):
    import subprocess
    import sys

    printed = subprocess.run([sys.executable, "-m", "mflux_server", "--db", processes.db_path, "--print-webhook-secret"],
                             capture_output=True, text=True, timeout=60)
    secret = printed.stdout.strip()
    assert printed.returncode == 0 and secret.startswith("whsec_")
    receiver = WebhookReceiver(secret=secret)
    try:
        url = processes.server("--webhook-allow-private")
        processes.worker(speed=50)
        requests.post(f"{url}/api/generate", timeout=10, json={"prompt": "x", "width": 256, "height": 256,
                                                               "callback_url": receiver.url})
        wait_for(lambda: receiver.received or receiver.rejected, what="the delivery")
        assert receiver.received and not receiver.rejected, "signed with the stored secret"
    finally:
        receiver.close()
