"""Live events over real HTTP: a task's stream follows it to done, resumes by Last-Event-ID, and the queue stream."""

from __future__ import annotations

import threading
import time

import requests

from mflux_server.testing import read_events, wait_for


def test_a_task_stream_follows_it_from_waiting_to_done_with_progress_and_previews(processes):
    url = processes.server()
    processes.worker(speed=5)
    task = requests.post(f"{url}/api/generate", json={"prompt": "watched", "steps": 4, "count": 2, "width": 256,
                                                      "height": 256}, timeout=10).json()
    with requests.get(f"{url}/api/tasks/{task['task_id']}/events", stream=True, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = list(read_events(response))  # the stream ends by itself after done
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    steps = [(e["data"]["image"], e["data"]["step"]) for e in events if e["event"] == "progress" and "step" in e["data"]]
    # The publisher writes only the newest step, so a busy machine may skip one; both images must show.
    assert steps == sorted(steps) and {image for image, _ in steps} == {1, 2}, steps
    assert "preview" in kinds, "the synthetic worker publishes previews"
    assert all(int(e["id"]) <= int(f["id"]) for e, f in zip(events, events[1:], strict=False)), "ids only grow"
    done = events[-1]["data"]
    assert len(done["images"]) == 2
    assert requests.get(url + done["images"][1], timeout=5).headers["Content-Type"] == "image/jpeg"
    # Resuming after the first progress event replays exactly what followed it.
    first_progress = next(e for e in events if e["event"] == "progress")
    with requests.get(f"{url}/api/tasks/{task['task_id']}/events", stream=True, timeout=30,
                      headers={"Last-Event-ID": first_progress["id"]}) as response:
        resumed = list(read_events(response))
    later = [e for e in events if int(e["id"]) > int(first_progress["id"])]
    assert [(e["id"], e["event"]) for e in resumed] == [(e["id"], e["event"]) for e in later]


def test_the_queue_stream_shows_positions_moving_and_a_cancel(processes):
    url = processes.server()
    first = requests.post(f"{url}/api/generate", json={"prompt": "first", "steps": 2}, timeout=10).json()
    second = requests.post(f"{url}/api/generate", json={"prompt": "second", "steps": 2}, timeout=10).json()
    seen: list[dict] = []

    def listen() -> None:
        params = {"task_ids": f"{first['task_id']},{second['task_id']}"}
        with requests.get(f"{url}/api/events", params=params, stream=True, timeout=30) as response:
            for event in read_events(response):
                seen.append(event)
                if event["event"] == "progress" and event["data"]["task_id"] == second["task_id"]:
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    wait_for(lambda: len(seen) >= 2, what="the initial state of both tasks")
    assert {e["data"]["task_id"]: e["data"]["position"] for e in seen[:2]} == {first["task_id"]: 0, second["task_id"]: 1}
    assert requests.delete(f"{url}/api/tasks/{first['task_id']}", timeout=5).status_code == 200
    started = time.monotonic()
    listener.join(10)
    assert not listener.is_alive() and time.monotonic() - started < 5
    canceled = [e for e in seen if e["data"]["task_id"] == first["task_id"] and e["event"] == "status"][-1]
    assert canceled["data"]["status"] == "canceled"
    moved = seen[-1]
    assert moved["data"]["task_id"] == second["task_id"] and moved["data"]["position"] == 0, seen
    for event in (seen[0], seen[1], moved):  # the range travels with every forecast
        low, high = event["data"]["wait_range"]
        assert low <= event["data"]["wait_remaining"] <= high and low < high, event
    assert int(moved["id"]) >= int(canceled["id"])


def test_an_unknown_task_stream_is_a_json_404_and_a_bad_last_event_id_a_422(processes):
    url = processes.server()
    missing = requests.get(f"{url}/api/tasks/nope/events", timeout=5)
    assert missing.status_code == 404 and missing.json()["code"] == "task_not_found"
    task = requests.post(f"{url}/api/generate", json={"prompt": "x"}, timeout=10).json()
    bad = requests.get(f"{url}/api/tasks/{task['task_id']}/events", headers={"Last-Event-ID": "12abc"}, timeout=5)
    assert bad.status_code == 422 and bad.json()["field"] == "Last-Event-ID"
    assert requests.get(f"{url}/api/tasks/{task['task_id']}/preview", timeout=5).status_code == 404
