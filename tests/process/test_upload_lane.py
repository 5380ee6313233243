"""Over real HTTP to gunicorn: large bodies are handled by each server process's niced upload helper, whose work
(and whose failures) stall no other client, lose nothing and leave nothing behind."""

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
from mflux_server.api.upload_lane import HELPER_NICENESS, RESTART_AFTER, UPLOAD_BYTES
from mflux_server.testing import Processes, wait_for


def noise_png(side: int = 512) -> bytes:
    """A PNG that does not compress: side² × 3 bytes, well over the lane's threshold once in a body."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


def large_submit(prompt: str, **extra: object) -> dict[str, object]:
    body = {"prompt": prompt, "width": 256, "height": 256, "image": base64.b64encode(noise_png()).decode(),
            "image_strength": 0.5, **extra}
    assert len(str(body)) > UPLOAD_BYTES
    return body


def helpers(procs: Processes) -> list[psutil.Process]:
    assert procs.server_proc is not None
    family = psutil.Process(procs.server_proc.pid).children(recursive=True)
    return [p for p in family if "mflux_server.api.upload_lane" in " ".join(p.cmdline())]


def ready_helper(procs: Processes, url: str) -> psutil.Process:
    """Send large submits until the helper listens (the first one starts it and is handled in the process)."""
    def listening() -> psutil.Process | None:
        requests.post(url + "/api/generate", json=large_submit("start the helper"), timeout=30).raise_for_status()
        found = helpers(procs)
        return found[0] if found and Path(found[0].cmdline()[-2]).exists() else None

    return wait_for(listening, timeout=30, interval=0.2, what="the upload helper to listen")


def test_a_large_submit_goes_to_the_niced_helper_and_a_frozen_helper_stalls_no_other_client(processes):
    url = processes.server()
    helper = ready_helper(processes, url)
    assert helper.nice() == HELPER_NICENESS
    helper.send_signal(signal.SIGSTOP)
    answers: list[requests.Response] = []
    sender = threading.Thread(target=lambda: answers.append(
        requests.post(url + "/api/generate", json=large_submit("held by the helper"), timeout=60)))
    sender.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        assert requests.get(url + "/api/tasks", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0, "the server process answers while its helper is frozen"
        assert not answers, "the large submit waits in the helper, not in the server process"
    finally:
        helper.send_signal(signal.SIGCONT)
    sender.join(timeout=30)
    answer = answers[0]
    assert answer.status_code == 200, answer.text
    db = store.connect(processes.db_path)
    try:
        task = db.get(answer.json()["task_id"])
        assert task is not None and task.prompt == "held by the helper"
    finally:
        db.close()
    assert len(answer.raw.headers.getlist("Date")) == 1, "the relay passes one Date header, not the helper's too"
    assert int(answer.headers["Content-Length"]) == len(answer.content), "the answer's length goes along"

    refused = requests.post(url + "/api/generate", json=large_submit("bad", image_strength=7), timeout=30)
    assert refused.status_code == 422 and refused.headers["Content-Type"] == "application/json"
    assert refused.json()["field"] == "image_strength", refused.text


def test_the_helpers_submits_are_written_on_a_thread_at_the_servers_priority(processes):
    url = processes.server()
    helper = ready_helper(processes, url)
    server_nice = psutil.Process(helper.ppid()).nice()
    niceness = {thread.id: psutil.Process(thread.id).nice() for thread in helper.threads()}
    assert niceness[helper.pid] == server_nice + HELPER_NICENESS, "the helper's loop (parsing, checks) is niced"
    writers = [tid for tid, nice in niceness.items() if nice == server_nice]
    assert len(writers) == 1, f"one thread at the server's priority: {niceness}"

    def writer_cpu() -> float:
        times = next(t for t in helper.threads() if t.id == writers[0])
        return float(times.user_time + times.system_time)

    before = writer_cpu()
    headers = {"Idempotency-Key": "sent twice"}
    body = large_submit("written at full priority", images=[base64.b64encode(noise_png()).decode() for _ in range(4)],
                        model="flux2-klein-4b")
    del body["image"], body["image_strength"]
    first = requests.post(url + "/api/generate", json=body, headers=headers, timeout=60)
    again = requests.post(url + "/api/generate", json=body, headers=headers, timeout=60)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.json()["task_id"] == again.json()["task_id"], "the idempotent retry answers the task it created"
    for n in range(8):
        answer = requests.post(url + "/api/generate", json={**body, "prompt": f"written {n}"}, timeout=60)
        assert answer.status_code == 200, answer.text
    assert "written 7" in prompts(processes.db_path)
    # Nine stores of four 786 KB references: the thread that wrote them spent CPU on it; an idle one spends none.
    assert writer_cpu() > before, "the references were written on the full-priority thread"


def test_a_killed_helper_loses_nothing_says_when_the_outcome_is_unknown_and_is_started_again(processes):
    url = processes.server()  # no worker: a synchronous edit waits in the helper
    helper = ready_helper(processes, url)
    helper.send_signal(signal.SIGSTOP)
    answers: list[requests.Response] = []
    sender = threading.Thread(target=lambda: answers.append(
        requests.post(url + "/api/generate", json=large_submit("sent to a frozen helper"), timeout=60)))
    sender.start()
    time.sleep(0.5)  # the body (1 MB) fills the socket's buffers: the helper never has it whole
    helper.send_signal(signal.SIGKILL)
    sender.join(timeout=30)
    assert answers[0].status_code == 200, "handled in the process, since the helper never had all of it"

    time.sleep(RESTART_AFTER)
    replacement = ready_helper(processes, url)
    assert replacement.pid != helper.pid
    sender, waiting = edit_waiting_in_helper(url, processes.db_path, "lost with the helper")
    replacement.send_signal(signal.SIGKILL)
    sender.join(timeout=30)
    lost = waiting[0]
    message = lost.json()["error"]["message"]
    assert lost.status_code == 503 and "may or may not" in message and "Idempotency-Key" in message, lost.text
    assert "sent to a frozen helper" in prompts(processes.db_path), "nothing acknowledged was lost"


def test_a_stopping_server_answers_a_wait_held_by_its_helper_and_the_helper_goes_too(processes):
    url = processes.server()  # no worker: the wait stays open until the server stops
    helper = ready_helper(processes, url)
    folder = Path(helper.cmdline()[-2]).parent
    sender, answers = edit_waiting_in_helper(url, processes.db_path, "waiting in the helper")
    assert processes.server_proc is not None
    processes.server_proc.send_signal(signal.SIGTERM)
    sender.join(timeout=30)
    message = answers[0].json()["error"]["message"]
    assert answers[0].status_code == 503 and "the task goes on as " in message, answers[0].text
    processes.server_proc.wait(timeout=30)
    wait_for(lambda: not psutil.pid_exists(helper.pid) or helper.status() == psutil.STATUS_ZOMBIE, timeout=5,
             what="the helper to exit")
    assert not folder.exists(), "the lane's socket and folder are removed"


def edit_waiting_in_helper(url: str, db_path: str, prompt: str) -> tuple[threading.Thread, list[requests.Response]]:
    """A synchronous OpenAI edit with a large image, sent on a thread; returns once its task is queued (with no
    worker it then waits in the helper) with the thread and the list its answer lands in."""
    answers: list[requests.Response] = []
    files = {"image": ("big.png", noise_png(), "image/png")}
    sender = threading.Thread(target=lambda: answers.append(requests.post(
        url + "/v1/images/edits", data={"prompt": prompt, "size": "256x256"}, files=files, timeout=60)))
    sender.start()
    wait_for(lambda: prompt in prompts(db_path), what="the edit queued")
    return sender, answers


def prompts(db_path: str) -> set[str]:
    db = store.connect(db_path)
    try:
        return {task.prompt for task in db.list_tasks(None, 100, 0)[0]}
    finally:
        db.close()
