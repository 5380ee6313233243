"""End to end: mflux-server and mflux-worker as subprocesses, driven by the original server's client code over HTTP."""

from __future__ import annotations

import io
import subprocess
import time

import pytest
import requests
from PIL import Image

from mflux_server.testing import wait_for
from tests.conftest import submit, wait_status


# The three client functions from the original server's document (shared/seeds), verbatim but for the
# endpoint override it hard-codes.
def mflux_generate_client(mfluxendpoint, prompt, width=1280, height=720, steps=4, count=4, seed=None, format="JPEG", quality=85, priority=False):  # noqa: E501
    data = {
        "prompt": prompt,
        "height": height,
        "width": width,
        "steps": steps,
        "format": format,
        "quality": quality,
        "priority": priority
    }
    if seed is not None:
        data["seed"] = seed
    response = requests.post(mfluxendpoint + "/generate", json=data)
    # parse the response and get the task_id
    json = response.json()
    task_id = json["task_id"]
    return task_id


def mflux_status_ready(mfluxendpoint, task_id):
    response = requests.get(mfluxendpoint + "/status?task_id=" + task_id)
    if response.status_code == 200:
        status = response.json()["status"]
        if status == "done":
            return 0
        else:
            # read the waiting time
            waiting_time = response.json().get("wait_remaining", 1)
            if waiting_time < 1: waiting_time = 1  # noqa: E701
            return waiting_time
    else:
        return -1


def mflux_get_image(mfluxendpoint, task_id):
    response = requests.get(mfluxendpoint + "/image?task_id=" + task_id + "&base64=false&delete=true")
    if response.status_code == 200:
        return response.content
    else:
        return None


@pytest.mark.parametrize("fmt, pil_format, size", [("JPEG", "JPEG", (1280, 720)), ("png", "PNG", (512, 768)),
                                                   ("WEBP", "WEBP", (256, 256))])
def test_original_client_flow(processes, fmt, pil_format, size):
    url = processes.server()
    processes.worker(speed=40.0)
    width, height = size
    task_id = mflux_generate_client(url, "A beautiful landscape", width=width, height=height, steps=4,
                                    seed="1725311496", format=fmt)
    waits = []
    for _ in range(2000):
        waiting_time = mflux_status_ready(url, task_id)
        assert waiting_time != -1
        if waiting_time == 0:
            break
        waits.append(waiting_time)
        time.sleep(0.02)
    imageb = mflux_get_image(url, task_id)
    assert imageb is not None
    image = Image.open(io.BytesIO(imageb))
    assert image.format == pil_format and image.size == (width, height)
    assert mflux_status_ready(url, task_id) == -1  # delete=true removed it


def test_original_curl_examples_work_unchanged(processes):
    url = processes.server()
    processes.worker(speed=40.0)
    body = ('{"prompt": "A beautiful landscape", "seed": "1725311496", "height": 1024, "width": 1024, "steps": 4,'
            ' "guidance": 3.5, "format": "JPEG", "quality": 85, "priority": false}')
    created = subprocess.run(
        ["curl", "-s", "-X", "POST", url + "/api/generate", "-H", "accept: application/json",
         "-H", "Content-Type: application/json", "-d", body], capture_output=True, text=True, check=True)
    import json

    response = json.loads(created.stdout)
    assert set(response) >= {"task_id", "task_length", "expected_time_seconds"}
    wait_status(url, response["task_id"], ("done",))
    image = subprocess.run(["curl", "-s", "-X", "GET", f"{url}/api/image?task_id={response['task_id']}",
                            "-H", "accept: application/json"], capture_output=True, check=True).stdout
    assert Image.open(io.BytesIO(image)).size == (1024, 1024)


def test_queue_positions_and_forecast_over_http(processes):
    url = processes.server()
    ids = [submit(url, steps=8) for _ in range(3)]
    urgent = submit(url, steps=8, priority=True)
    statuses = {i: requests.get(url + "/api/status", params={"task_id": i}).json() for i in ids + [urgent]}
    assert [statuses[i]["pos"] for i in ids] == [1, 2, 3] and statuses[urgent]["pos"] == 0
    waits = [statuses[i]["wait_remaining"] for i in [urgent] + ids]
    assert waits == sorted(waits) and len(set(waits)) == 4
    processes.worker(speed=40.0)
    for i in ids + [urgent]:
        wait_status(url, i, ("done",))
    info = requests.get(url + "/api/info").json()
    assert info["engines"] == ["synthetic"] and info["synthetic"] is True
    assert any("synthetic" in w for w in info["warnings"])
    wait_for(lambda: requests.get(url + "/api/info").json()["forecast"]["measured"], timeout=3, what="measured")


def test_a_canceled_task_over_http(processes):
    url = processes.server()
    task_id = submit(url)
    assert requests.delete(f"{url}/api/tasks/{task_id}").json()["result"] == "canceled"
    body = requests.get(url + "/status", params={"task_id": task_id}).json()
    assert body["status"] == "canceled" and body["wait_remaining"] == 0
    refused = requests.get(url + "/image", params={"task_id": task_id})
    assert refused.status_code == 409 and refused.json()["status"] == "canceled"


def test_docs_work_offline(processes):
    url = processes.server()
    page = requests.get(url + "/swagger")
    assert page.status_code == 200 and "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js"):
        assert requests.get(f"{url}/swagger-assets/{asset}").status_code == 200
    spec = requests.get(url + "/openapi.json").json()
    assert spec["info"]["title"] == "mflux-server"
