"""Benchmark 9: 200 synchronous OpenAI requests waiting beside the paced load, and webhook delivery latency."""

from __future__ import annotations

import json
import shutil
import threading

import requests

from bench.api_load import PACED_PAUSE_MS, add_beside, full_queue, phase
from bench.results import Result, median, percentile
from mflux_server import store
from mflux_server.testing import TEST_WEBHOOK_SECRET, WebhookReceiver, fresh_queue, wait_for

WAITERS = 200
WEBHOOKS = 300


def open_waiters(url: str, count: int, answers: list[int]) -> list[threading.Thread]:
    """Start `count` OpenAI image requests that wait for their images (at the back of the queue)."""
    def ask() -> None:
        try:
            answers.append(requests.post(f"{url}/v1/images/generations", json={"prompt": "waiting", "size": "512x512"},
                                         timeout=600).status_code)
        except requests.RequestException:
            answers.append(-1)  # cut when the benchmark stops the server

    threads = [threading.Thread(target=ask, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def waiting_tasks(db_path: str) -> int:
    """Tasks submitted through the OpenAI surface so far (they are ordinary tasks in the queue)."""
    db = store.connect(db_path)
    try:
        return int(db.session.execute("SELECT count(*) FROM tasks WHERE surface = 'openai'").fetchone()[0])
    finally:
        db.close()


def delivery_latencies(count: int) -> tuple[list[float], int]:
    """Submit `count` tasks with a callback to a local receiver; the ms from each task's end to its arrival."""
    receiver = WebhookReceiver()
    try:
        with fresh_queue() as procs:
            url = procs.server("--webhook-secret", TEST_WEBHOOK_SECRET, "--webhook-allow-private", http_workers=2)
            procs.worker(speed=20)
            session = requests.Session()
            for _ in range(count):
                session.post(f"{url}/api/generate", timeout=10, json={"prompt": "hook", "width": 256, "height": 256,
                                                                      "steps": 2, "callback_url": receiver.url})
            wait_for(lambda: len(receiver.received) + len(receiver.rejected) >= count, timeout=300,
                     what="every webhook")
            db = store.connect(procs.db_path)
            ended = {row[0]: json.loads(row[1])["finished_at"] for row in db.session.execute("SELECT id, task FROM deliveries")}
            db.close()
        latencies = [(at - ended[headers["webhook-id"]]) * 1000 for at, headers, _ in receiver.received]
        return latencies, len(receiver.rejected)
    finally:
        receiver.close()


def run(smoke: bool = False) -> Result:
    """10,000 queued, 200 OpenAI requests waiting, then benchmark 3's paced load; then 300 webhooks timed."""
    tasks, seconds, connections, waiters, hooks = (300, 2.0, 8, 20, 20) if smoke else (10_000, 20.0, 32, WAITERS, WEBHOOKS)
    use_wrk = shutil.which("wrk") is not None and not smoke
    result = Result("Compatible surfaces and webhooks", f"make bench ARGS='--only surfaces'  ({tasks:,} queued; "
                    f"benchmark 3's paced load for {seconds:.0f} s alone, then again beside {waiters} OpenAI "
                    f"/v1/images/generations requests waiting for their images; then {hooks} tasks with a "
                    "callback_url to a local receiver that verifies each signature)")
    answers: list[int] = []
    with full_queue(tasks, smoke, ("--sync-timeout", "3600")) as (procs, url, ids, ids_file, _):
        # The same load first without the waiters: this machine's own tail, measured in the same run.
        alone = phase(url, ids, ids_file, seconds, connections, PACED_PAUSE_MS, use_wrk)
        open_waiters(url, waiters, answers)
        queued = wait_for(lambda: (n := waiting_tasks(procs.db_path)) >= waiters and n, timeout=120, what="the waiters' tasks")
        paced = phase(url, ids, ids_file, seconds, connections, PACED_PAUSE_MS, use_wrk)
        still_waiting = waiters - len(answers)
    result.add("OpenAI requests waiting, as queued tasks", queued, "", f"{waiters}", queued == waiters)
    result.add("of them still waiting after the load (none dropped)", still_waiting, "", f"{waiters}",
               still_waiting == waiters)
    add_beside(result, alone, paced)
    latencies, rejected = delivery_latencies(hooks)
    result.add("webhooks received with a valid signature", len(latencies), "", f"{hooks}", len(latencies) == hooks)
    result.add("signatures refused by the receiver", rejected, "", "0", rejected == 0)
    result.add("delivery latency after the task ended, p50", median(latencies), "ms")
    p99 = percentile(latencies, 99)
    result.add("delivery latency after the task ended, p99", p99, "ms", "≤ 200 ms", p99 <= 200)
    return result
