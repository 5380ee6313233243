"""The server shared by people who don't all trust each other: keys, ownership, priority rights, idempotent
submits, retention, health checks and backups, between real processes."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import threading
import time

import openai
import pytest
import requests

from mflux_server import store
from mflux_server.core.rows import Task
from mflux_server.testing import wait_for

SMALL = {"prompt": "shared", "width": 256, "height": 256, "steps": 2}


def keys(db_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `mflux-server keys …` on the queue."""
    return subprocess.run([sys.executable, "-m", "mflux_server", "keys", *args, "--db", db_path],
                          capture_output=True, text=True, timeout=60)


def new_key(db_path: str, name: str, *flags: str) -> str:
    made = keys(db_path, "create", name, *flags)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_printed_once_listed_without_the_key_and_revoked(processes):
    key = new_key(processes.db_path, "alice", "--priority")
    assert key.startswith("mfx_") and len(key) > 40
    listed = keys(processes.db_path, "list")
    assert "alice" in listed.stdout and "priority" in listed.stdout and key not in listed.stdout
    assert keys(processes.db_path, "create", "alice").returncode == 1, "names are unique"
    bad = keys(processes.db_path, "create", "no spaces here")
    assert bad.returncode == 2 and "a name is 1 to 64" in bad.stderr
    with sqlite3.connect(processes.db_path) as db:
        assert key not in str(db.execute("SELECT * FROM api_keys").fetchall()), "only the hash is stored"
    assert keys(processes.db_path, "revoke", "alice").returncode == 0
    assert "revoked" in keys(processes.db_path, "list").stdout
    assert keys(processes.db_path, "revoke", "alice").returncode == 1


def test_the_first_key_ends_open_access_in_every_running_server_process(processes):
    url = processes.server(http_workers=2)
    for _ in range(8):  # both processes have answered an open request, and keep that no key exists
        assert requests.get(url + "/api/tasks", timeout=10).status_code == 200
    polling = threading.Event()

    def poll() -> None:  # keeps each process's "no key" fresh, so only a NOTIFY can end it soon after the key
        while not polling.wait(0.02):
            requests.get(url + "/api/tasks", timeout=10)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        key = new_key(processes.db_path, "first")
        # On PostgreSQL the key's NOTIFY must reach each process's listener: a moment, not the kept read's second.
        wait_for(lambda: all(requests.get(url + "/api/tasks", timeout=10).status_code == 401 for _ in range(8)),
                 timeout=0.5, interval=0.02, what="open access to end in both processes")
    finally:
        polling.set()
    assert requests.get(url + "/api/tasks", headers=auth(key), timeout=10).status_code == 200


def test_every_route_class_needs_a_live_key_in_its_own_envelope(processes):
    key = new_key(processes.db_path, "bob")
    url = processes.server(http_workers=2)
    routes = [("POST", "/api/generate", SMALL), ("GET", "/api/status?task_id=x", None), ("GET", "/api/tasks", None),
              ("GET", "/api/info", None), ("GET", "/api/models", None), ("HEAD", "/api/events", None),
              ("GET", "/metrics", None)]
    for method, path, body in routes:
        for headers in ({}, auth("mfx_wrong"), {"Authorization": "Basic Ym9iOmJvYg=="}):
            answer = requests.request(method, url + path, json=body, headers=headers, timeout=10)
            assert answer.status_code == 401, (method, path, headers)
            if method != "HEAD":
                assert answer.json()["code"] in ("unauthorized", "invalid_key")
            assert answer.headers["WWW-Authenticate"] == "Bearer"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="mfx_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.models.list()
    assert raised.value.body["type"] == "authentication_error"  # type: ignore[index]
    ace = requests.post(f"{url}/flux/tasks", json={"id": "x"}, timeout=10)
    assert ace.status_code == 401 and ace.json()["error"]["code"] == "invalid_token"
    nebula = requests.post(f"{url}/api/v1/images/generation", json={"prompt": "x"}, timeout=10)
    assert nebula.status_code == 401 and nebula.json()["status"] == "error"
    for open_path in ("/healthz", "/openapi.json", "/", "/ui/app.js", "/swagger"):
        assert requests.get(url + open_path, timeout=10).status_code == 200, open_path
    assert requests.get(f"{url}/api/tasks", headers=auth(key), timeout=10).status_code == 200
    keys(processes.db_path, "revoke", "bob")
    # New connections land on both server processes: the revocation holds in each at once.
    assert {requests.get(f"{url}/api/tasks", headers=auth(key), timeout=10).status_code for _ in range(10)} == {401}


def test_another_keys_tasks_are_absent_and_only_admins_see_all(processes):
    alice, bob = new_key(processes.db_path, "alice"), new_key(processes.db_path, "bob")
    admin = new_key(processes.db_path, "root", "--admin")
    url = processes.server()
    mine = requests.post(f"{url}/api/generate", json=SMALL, headers=auth(alice), timeout=10).json()["task_id"]
    requests.post(f"{url}/api/generate", json=SMALL, headers=auth(bob), timeout=10)
    for method, path in (("GET", f"/api/status?task_id={mine}"), ("GET", f"/api/tasks/{mine}"),
                         ("DELETE", f"/api/tasks/{mine}"), ("GET", f"/api/image?task_id={mine}"),
                         ("GET", f"/api/tasks/{mine}/preview"), ("GET", f"/api/tasks/{mine}/events")):
        answer = requests.request(method, url + path, headers=auth(bob), timeout=10)
        assert answer.status_code == 404 and answer.json()["code"] == "task_not_found", (method, path)
    assert requests.get(f"{url}/api/tasks/{mine}", headers=auth(alice), timeout=10).status_code == 200
    seen = {t["task_id"] for t in requests.get(f"{url}/api/tasks", headers=auth(bob), timeout=10).json()["tasks"]}
    assert mine not in seen and len(seen) == 1
    assert requests.get(f"{url}/api/tasks", headers=auth(admin), timeout=10).json()["total"] == 2
    assert requests.delete(f"{url}/api/tasks/{mine}", headers=auth(admin), timeout=10).json()["result"] == "canceled"
    ace = requests.post(f"{url}/flux/tasks", json={"id": mine}, headers=auth(bob), timeout=10)
    assert ace.status_code == 404


def test_priority_needs_a_key_allowed_to_use_it(processes):
    plain, allowed = new_key(processes.db_path, "plain"), new_key(processes.db_path, "vip", "--priority")
    url = processes.server()
    refused = requests.post(f"{url}/api/generate", json={**SMALL, "priority": True}, headers=auth(plain), timeout=10)
    assert refused.status_code == 403 and refused.json()["field"] == "priority"
    assert requests.post(f"{url}/api/generate", json={**SMALL, "priority": False}, headers=auth(plain),
                         timeout=10).status_code == 200
    assert requests.post(f"{url}/api/generate", json={**SMALL, "priority": True}, headers=auth(allowed),
                         timeout=10).status_code == 200




def test_an_idempotent_retry_after_a_killed_api_answers_the_same_task(processes):
    url = processes.server()
    headers = {"Idempotency-Key": "order-42"}
    first = requests.post(f"{url}/api/generate", json=SMALL, headers=headers, timeout=10).json()
    processes.kill_server()  # as if the answer never reached the client
    url = processes.server()
    again = requests.post(f"{url}/api/generate", json=SMALL, headers=headers, timeout=10).json()
    assert again["task_id"] == first["task_id"]
    assert requests.get(f"{url}/api/tasks", timeout=10).json()["total"] == 1
    reused = requests.post(f"{url}/api/generate", json={**SMALL, "prompt": "other"}, headers=headers, timeout=10)
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"
    files = {"image": ("a.png", b"\x89PNG not really")}
    form = [requests.post(f"{url}/api/generate", data={"prompt": "form"}, files=files, timeout=10,
                          headers={"Idempotency-Key": "form-1"}) for _ in range(2)]
    assert form[0].status_code == form[1].status_code == 422, "the same bad form is refused the same way"


def test_finished_tasks_expire_and_answer_task_expired(processes):
    url = processes.server("--keep-finished", "1", "--housekeeping-interval", "0.5")
    processes.worker(speed=50)
    task = requests.post(f"{url}/api/generate", json=SMALL, timeout=10).json()["task_id"]
    gone = wait_for(lambda: (r := requests.get(f"{url}/api/status", params={"task_id": task}, timeout=5)).status_code
                    == 404 and r.json(), timeout=20, what="the task to expire")  # (a 404 Response is falsy)
    assert gone["code"] == "task_expired"
    assert requests.get(f"{url}/api/status", params={"task_id": "f" * 32}, timeout=5).json()["code"] == "task_not_found"


def test_the_store_bound_keeps_the_newest(processes):
    url = processes.server("--max-store-bytes", "30000", "--housekeeping-interval", "0.3")
    processes.worker(speed=50)
    ids = []
    for n in range(6):
        ids.append(requests.post(f"{url}/api/generate", json={**SMALL, "format": "PNG", "seed": n}, timeout=10).json()["task_id"])
        wait_for(lambda: requests.get(f"{url}/api/status", params={"task_id": ids[-1]}, timeout=5).json()["status"] == "done")
    time.sleep(1.0)
    kept = [requests.get(f"{url}/api/status", params={"task_id": i}, timeout=5).status_code == 200 for i in ids]
    assert kept[-1] and not kept[0], kept
    assert kept == sorted(kept), "the oldest go first"


def test_signed_image_links_open_without_a_key(processes):
    key = new_key(processes.db_path, "carol")
    url = processes.server()
    processes.worker(speed=50)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key)
    link = client.images.generate(prompt="a link", size="256x256", response_format="url").data[0].url
    assert link and "sig=" in link
    assert requests.get(link, timeout=10).status_code == 200, "a webhook receiver or OpenAI client fetches it bare"
    assert requests.get(link.replace("sig=", "sig=0"), timeout=10).status_code == 401
    # The signature covers the delete choice: a keep link cannot be turned into one that removes the task.
    assert "delete=false" in link
    assert requests.get(link.replace("delete=false", "delete=true"), timeout=10).status_code == 401
    assert requests.get(link, timeout=10).status_code == 200, "the task is still there"


def test_readiness_needs_a_writable_queue_and_a_live_worker(processes):
    url = processes.server()
    not_ready = requests.get(f"{url}/readyz", timeout=10)
    assert not_ready.status_code == 503 and "no worker" in not_ready.json()["problems"][0]
    processes.worker()
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}


def test_backup_copies_the_running_queue(processes, tmp_path):
    url = processes.server()
    task = requests.post(f"{url}/api/generate", json=SMALL, timeout=10).json()["task_id"]
    target = tmp_path / "backup.db"
    done = subprocess.run([sys.executable, "-m", "mflux_server", "backup", str(target), "--db", processes.db_path],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(target) as copy:
        assert copy.execute("SELECT id FROM tasks").fetchall() == [(task,)]
    again = subprocess.run([sys.executable, "-m", "mflux_server", "backup", str(target), "--db", processes.db_path],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr


def test_quotas_hold_across_two_server_processes_with_retry_after(processes):
    key = new_key(processes.db_path, "busy")
    url = processes.server("--rate-limit", "20", "--max-queued-per-key", "3", http_workers=2)
    answers = [requests.get(f"{url}/api/tasks", headers=auth(key), timeout=10) for _ in range(30)]  # new connections
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 20 and codes.count(429) == 10, codes
    refused = answers[-1]
    assert refused.json()["code"] == "too_many_requests" and 1 <= int(refused.headers["Retry-After"]) <= 60
    other = new_key(processes.db_path, "calm")
    assert requests.get(f"{url}/api/tasks", headers=auth(other), timeout=10).status_code == 200, "per key"
    for _ in range(3):  # no worker: they stay unfinished
        assert requests.post(f"{url}/api/generate", json=SMALL, headers=auth(other), timeout=10).status_code == 200
    full = requests.post(f"{url}/api/generate", json=SMALL, headers=auth(other), timeout=10)
    assert full.status_code == 429 and full.headers["Retry-After"] == "10" and "max-queued-per-key" in full.json()["message"]
    openai_full = requests.post(f"{url}/v1/images/generations", json={"prompt": "x"}, headers=auth(other), timeout=10)
    assert openai_full.status_code == 429 and openai_full.json()["error"]["type"] == "rate_limit_error"


def test_metrics_parse_and_every_server_process_gives_the_same_figures(processes):
    from prometheus_client.parser import text_string_to_metric_families

    key = new_key(processes.db_path, "ops", "--admin")
    url = processes.server(http_workers=2)
    processes.worker(speed=50)
    ids = [requests.post(f"{url}/api/generate", json=SMALL, headers=auth(key), timeout=10).json()["task_id"] for _ in range(3)]
    doomed = requests.post(f"{url}/api/generate", json={**SMALL, "steps": 50}, headers=auth(key), timeout=10).json()
    requests.delete(f"{url}/api/tasks/{doomed['task_id']}", headers=auth(key), timeout=10)
    wait_for(lambda: all(requests.get(f"{url}/api/status", params={"task_id": i}, headers=auth(key),
                                      timeout=5).json()["status"] == "done" for i in ids), what="the tasks")
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 401
    # The worker's publisher writes step timings in batches, after the task's done: wait for the last batch.
    def steps_counted() -> float:
        text = requests.get(f"{url}/metrics", headers=auth(key), timeout=10).text
        found = re.search(r'^mflux_step_seconds_count\{model="schnell"\} ([0-9.]+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    wait_for(lambda: steps_counted() >= 6, what="every step's timing")
    texts = {requests.get(f"{url}/metrics", headers=auth(key), timeout=10).text for _ in range(6)}
    samples = {}
    for family in text_string_to_metric_families(texts.pop()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("mflux_tasks_finished_total", (("outcome", "done"),))] == 3
    assert samples[("mflux_tasks_finished_total", (("outcome", "canceled"),))] == 1
    assert samples[("mflux_generation_seconds_count", (("model", "schnell"),))] == 3
    assert samples[("mflux_step_seconds_count", (("model", "schnell"),))] >= 6, "2 steps each"
    assert samples[("mflux_queue_wait_seconds_count", (("model", "schnell"),))] >= 3
    assert samples[("mflux_forecast_ratio_count", (("model", "schnell"),))] == 3
    assert samples[("mflux_generation_seconds_bucket", (("le", "+Inf"), ("model", "schnell")))] == 3
    assert samples[("mflux_workers_alive", ())] == 1 and samples[("mflux_database_bytes", ())] > 0
    assert samples[("mflux_tasks", (("model", "schnell"), ("status", "done")))] == 3
    assert not texts or all("mflux_tasks_finished_total" in t for t in texts)


def tasks_of(db_path: str, ids: list[str]) -> dict[str, Task]:
    """The tasks that still exist among these ids, by id (through the store: either store)."""
    db = store.connect(db_path)
    try:
        return {task.id: task for task in (db.get(task_id) for task_id in ids) if task}
    finally:
        db.close()


def started_between(tasks: dict[str, Task], ids: list[str], after: float, before: float) -> list[str]:
    """Those of the tasks that a worker claimed after one moment and before another."""
    return [i for i in ids if tasks[i].started_at and after < tasks[i].started_at < before]


@pytest.mark.parametrize("scheduling", ["auto", "fifo"])
def test_fair_share_lets_a_second_key_through_within_a_task(processes, scheduling):
    heavy, light = new_key(processes.db_path, "heavy"), new_key(processes.db_path, "light")
    url = processes.server("--scheduling", scheduling, "--max-queued-per-key", "100")
    processes.worker(speed=4)  # 2 steps of 256²: about 0.1 s a task
    body = {**SMALL, "steps": 2}
    a_ids = [requests.post(f"{url}/api/generate", json=body, headers=auth(heavy), timeout=10).json()["task_id"]
             for _ in range(50)]
    wait_for(lambda: any(t.finished_at for t in tasks_of(processes.db_path, a_ids).values()),
             what="key A's first task to finish")
    b, acknowledged = [], []
    for _ in range(2):
        b.append(requests.post(f"{url}/api/generate", json=body, headers=auth(light), timeout=10).json())
        acknowledged.append(time.time())
    b_ids = [t["task_id"] for t in b]
    wait_for(lambda: all(t.finished_at for t in tasks_of(processes.db_path, b_ids).values()), timeout=60,
             what="key B's tasks")
    tasks = tasks_of(processes.db_path, a_ids + b_ids)
    # Judged from each B task's acknowledgement: a claim made before it could not see that task (a loaded machine
    # may take longer to answer B's second submit than the worker takes to run B's first).
    overtaken = [started_between(tasks, a_ids, at, tasks[b_id].started_at or 0)
                 for b_id, at in zip(b_ids, acknowledged, strict=True)]
    if scheduling == "auto":  # fair once keys exist
        assert overtaken[0] == [], "no task of A claimed after B's first was acknowledged starts before it"
        # B's second starts one of its own tasks' cost after B's first, where A's next may start too: when the two
        # forecasts are equal (the tie goes to the older task) one task of A goes first, as the forecast says.
        assert len(overtaken[1]) <= 1, "B's second waits for at most one task of A"
        assert b[0]["pos"] == 0 and b[1]["pos"] <= 1, "the forecast sees B's turn"
        assert b[1]["expected_time_seconds"] < 1.5, b[1]
    else:
        assert len(overtaken[0]) > 10, "first in, first out: B waits behind A's queue"
        assert b[0]["pos"] > 10


def test_the_web_ui_cookie_reads_but_never_submits_or_deletes(processes):
    key = new_key(processes.db_path, "erin")
    url = processes.server()
    processes.worker(speed=50)
    cookie = {"mflux_key": key}
    made = requests.get(f"{url}/api/v1/images/generation", json={"prompt": "by cookie"}, cookies=cookie, timeout=30)
    assert made.status_code == 403 and "cookie only reads" in made.text
    assert requests.get(f"{url}/api/tasks", headers=auth(key), timeout=10).json()["total"] == 0
    task_id = requests.post(f"{url}/api/generate", json=SMALL, headers=auth(key), timeout=10).json()["task_id"]
    wait_for(lambda: requests.get(f"{url}/api/status", params={"task_id": task_id}, headers=auth(key),
                                  timeout=5).json()["status"] == "done", what="done")
    assert requests.get(f"{url}/api/image", params={"task_id": task_id}, cookies=cookie, timeout=10).status_code == 200
    still = requests.get(f"{url}/api/status", params={"task_id": task_id}, headers=auth(key), timeout=10)
    assert still.status_code == 200, "an image read by cookie (any page's <img>) does not remove the task"


def test_the_queue_stream_shows_nothing_of_another_keys_task_as_the_queue_moves(processes):
    from mflux_server.testing import read_events

    alice, bob = new_key(processes.db_path, "alice"), new_key(processes.db_path, "bob")
    url = processes.server()
    first, second = (requests.post(f"{url}/api/generate", json=SMALL, headers=auth(alice), timeout=10).json()["task_id"]
                     for _ in range(2))
    seen: list[dict] = []

    def listen() -> None:
        try:
            with requests.get(f"{url}/api/events", params={"task_ids": second}, headers=auth(bob), stream=True,
                              timeout=3) as response:
                for event in read_events(response):
                    seen.append(event)
        except requests.exceptions.ConnectionError:  # the read timeout ends the listening
            pass

    listener = threading.Thread(target=listen)
    listener.start()
    time.sleep(0.5)
    assert requests.delete(f"{url}/api/tasks/{first}", headers=auth(alice), timeout=10).status_code == 200
    listener.join(timeout=10)
    assert [e for e in seen if second in str(e.get("data"))] == [], "no position or wait of alice's task for bob"


def test_the_upscales_a_task_will_queue_count_against_its_keys_quota_and_are_charged_to_its_fair_share(processes):
    key = new_key(processes.db_path, "enlarger")
    url = processes.server("--max-queued-per-key", "4")
    processes.worker("--models", "schnell,dev-controlnet-upscaler", speed=0.01)  # slow: every task stays unfinished
    enlarged = dict(SMALL, model="schnell", upscale={"factor": 2, "steps": 2})
    too_many = requests.post(f"{url}/api/generate", json=dict(enlarged, count=4), headers=auth(key), timeout=10)
    assert too_many.status_code == 422 and too_many.json()["field"] == "count" and "1 + count" in too_many.json()["message"], \
        too_many.json()
    made = requests.post(f"{url}/api/generate", json=dict(enlarged, count=2), headers=auth(key), timeout=10)
    assert made.status_code == 200, made.json()
    assert requests.post(f"{url}/api/generate", json=SMALL, headers=auth(key), timeout=10).status_code == 200
    full = requests.post(f"{url}/api/generate", json=SMALL, headers=auth(key), timeout=10)
    assert full.status_code == 429 and "upscales" in full.json()["message"], "2 tasks, and the 2 upscales one will queue"
    with sqlite3.connect(processes.db_path) as copy:
        (then,) = copy.execute("SELECT then_upscale FROM tasks WHERE id = ?", (made.json()["task_id"],)).fetchone()
    assert json.loads(then)["fair_cost"] > 0, "priced at submit (keys exist: fair scheduling), for the worker to charge"
