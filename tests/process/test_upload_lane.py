"""Over real HTTP to gunicorn: the heavy parts of large requests run in each server process's idle-class upload
helper, whose work (and whose failures) stall no other client, lose nothing and leave nothing behind."""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # a test dependency, without stubs
import requests
from PIL import Image

from mflux_server import store
from mflux_server.api.upload_lane import RESTART_AFTER, UPLOAD_BYTES
from mflux_server.testing import Processes, wait_for


def noise_png(side: int = 512) -> bytes:
    """A PNG that does not compress: side² × 3 bytes, well over the lane's threshold once in a body."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


def large_submit(prompt: str, side: int = 512, **extra: object) -> dict[str, object]:
    body = {"prompt": prompt, "width": 256, "height": 256, "image": base64.b64encode(noise_png(side)).decode(),
            "image_strength": 0.5, **extra}
    assert len(str(body)) > UPLOAD_BYTES
    return body


def helpers(procs: Processes) -> list[psutil.Process]:
    assert procs.server_proc is not None
    family = psutil.Process(procs.server_proc.pid).children(recursive=True)
    return [p for p in family if "mflux_server.api.upload_helper" in " ".join(p.cmdline())]


def ready_helper(procs: Processes, url: str) -> psutil.Process:
    """Send large submits until the helper listens (the first one starts it and waits for it)."""
    def listening() -> psutil.Process | None:
        requests.post(url + "/api/generate", json=large_submit("start the helper"), timeout=30).raise_for_status()
        found = helpers(procs)
        return found[0] if found and Path(found[0].cmdline()[-3]).exists() else None

    return wait_for(listening, timeout=30, interval=0.2, what="the upload helper to listen")


def test_large_requests_are_checked_in_the_idle_class_helper_and_a_frozen_helper_stalls_no_other_client(processes):
    url = processes.server()
    helper = ready_helper(processes, url)
    if hasattr(os, "SCHED_IDLE"):  # Linux: every thread idle-class, so a server process never waits for its slice
        assert {os.sched_getscheduler(thread.id) for thread in helper.threads()} == {os.SCHED_IDLE}
    queue_files = {str(Path(processes.db_path).resolve()), str(Path(processes.db_path).resolve()) + "-wal"}
    assert not queue_files & {f.path for f in helper.open_files()}, "no queue session: it never holds a lock"
    cpu = sum(helper.cpu_times()[:2])
    # 1024²: about 30 ms of decoding, so the growth shows in CPU times counted in 10 ms units (512² took 9 ms and
    # once read as no growth at all).
    answer = requests.post(url + "/api/generate", json=large_submit("checked in the helper", 1024), timeout=60)
    assert answer.status_code == 200, answer.text
    assert sum(helper.cpu_times()[:2]) > cpu, "the image was decoded there"

    helper.send_signal(signal.SIGSTOP)
    answers: list[requests.Response] = []
    sender = threading.Thread(target=lambda: answers.append(
        requests.post(url + "/api/generate", json=large_submit("held by the helper"), timeout=60)))
    sender.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        assert requests.get(url + "/api/tasks", timeout=5).status_code == 200
        small = requests.post(url + "/api/generate", json={"prompt": "small", "width": 256, "height": 256}, timeout=5)
        assert small.status_code == 200, small.text
        assert time.monotonic() - started < 1.0, "the server process answers while its helper is frozen"
        assert not answers, "the large submit waits for the helper"
    finally:
        helper.send_signal(signal.SIGCONT)
    sender.join(timeout=30)
    assert answers[0].status_code == 200, answers[0].text
    assert "held by the helper" in prompts(processes.db_path)

    refused = requests.post(url + "/api/generate", json=large_submit("bad", image_strength=7), timeout=30)
    assert refused.status_code == 422 and refused.headers["Content-Type"] == "application/json"
    assert refused.json()["field"] == "image_strength", refused.text
    broken = large_submit("broken")
    broken["image"] = base64.b64encode(noise_png()[:-5000]).decode()  # truncated: found only by decoding it
    refused = requests.post(url + "/api/generate", json=broken, timeout=30)
    assert refused.status_code == 422 and refused.json()["field"] == "image", refused.text
    assert "not a readable image" in refused.json()["message"], "the helper's refusal, as the process gives it"
    twice = '{"prompt": "a", "prompt": "b", "pad": "' + "x" * UPLOAD_BYTES + '"}'
    refused = requests.post(url + "/api/generate", data=twice, headers={"Content-Type": "application/json"}, timeout=30)
    assert refused.status_code == 422 and refused.json()["field"] == "prompt", "the helper's JSON parse, as the process's"


def test_an_edit_with_four_references_is_stored_as_sent_and_its_retry_answers_its_task(processes):
    url = processes.server()
    helper = ready_helper(processes, url)
    headers = {"Idempotency-Key": "sent twice"}
    body = large_submit("four references", images=[base64.b64encode(noise_png()).decode() for _ in range(4)],
                        model="flux2-klein-4b")
    del body["image"], body["image_strength"]
    cpu = sum(helper.cpu_times()[:2])
    first = requests.post(url + "/api/generate", json=body, headers=headers, timeout=60)
    again = requests.post(url + "/api/generate", json=body, headers=headers, timeout=60)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.json()["task_id"] == again.json()["task_id"], "the idempotent retry answers the task it created"
    assert sum(helper.cpu_times()[:2]) > cpu, "the references were checked in the helper"
    db = store.connect(processes.db_path)
    try:
        stored = db.inputs(first.json()["task_id"])
    finally:
        db.close()
    sent = [base64.b64decode(image) for image in body["images"]]  # type: ignore[union-attr]
    assert [stored[role].data for role in sorted(stored)] == sent, "each reference stored as sent (PNG, upright, RGB)"


def test_a_killed_helper_loses_nothing_and_is_started_again(processes):
    url = processes.server()
    helper = ready_helper(processes, url)
    helper.send_signal(signal.SIGSTOP)
    answers: list[requests.Response] = []
    sender = threading.Thread(target=lambda: answers.append(
        requests.post(url + "/api/generate", json=large_submit("sent to a frozen helper"), timeout=60)))
    sender.start()
    time.sleep(0.5)  # the call is with the helper
    helper.send_signal(signal.SIGKILL)
    sender.join(timeout=30)
    assert answers[0].status_code == 200, "checked in the process instead: the helper's work is pure"
    assert "sent to a frozen helper" in prompts(processes.db_path)

    time.sleep(RESTART_AFTER)
    replacement = ready_helper(processes, url)
    assert replacement.pid != helper.pid


def test_a_stopping_server_ends_its_helper_and_an_orphaned_helper_exits(processes):
    url = processes.server()
    helper = ready_helper(processes, url)
    folder = Path(helper.cmdline()[-3]).parent
    assert processes.server_proc is not None
    processes.server_proc.send_signal(signal.SIGTERM)
    processes.server_proc.wait(timeout=30)
    wait_for(lambda: not psutil.pid_exists(helper.pid) or helper.status() == psutil.STATUS_ZOMBIE, timeout=5,
             what="the helper to exit")
    assert not folder.exists(), "the helper's socket and folder are removed"

    url = processes.server()
    helper = ready_helper(processes, url)
    server = psutil.Process(helper.ppid())
    server.send_signal(signal.SIGKILL)  # no drain: the helper notices its parent is gone
    wait_for(lambda: not psutil.pid_exists(helper.pid) or helper.status() == psutil.STATUS_ZOMBIE, timeout=5,
             what="the orphaned helper to exit")


def prompts(db_path: str) -> set[str]:
    db = store.connect(db_path)
    try:
        return {task.prompt for task in db.list_tasks(None, 100, 0)[0]}
    finally:
        db.close()

