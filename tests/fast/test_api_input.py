"""Every input rule of the API gives a JSON 4xx naming the field; the original server's request shapes are accepted."""

from __future__ import annotations

import base64

import pytest

from mflux_server.core.rows import Status
from tests.conftest import images_for

ORIGINAL_BODY = {"prompt": "A beautiful landscape", "seed": "1725311496", "height": 1024, "width": 1024, "steps": 4,
             "guidance": 3.5, "format": "JPEG", "quality": 85, "priority": False}


@pytest.mark.parametrize("prefix", ["/api", ""])
def test_original_request_is_accepted_at_both_paths(client, prefix):
    response = client.post(prefix + "/generate", json=ORIGINAL_BODY)
    assert response.status_code == 200, response.json
    body = response.json
    assert len(body["task_id"]) == 32
    assert body["task_length"] == 0
    assert body["expected_time_seconds"] > 0
    assert body["seed"] == 1725311496 and body["status"] == "waiting" and body["format"] == "JPEG"
    status = client.get(f"{prefix}/status?task_id={body['task_id']}").json
    assert status["status"] == "waiting" and status["pos"] == 0 and status["wait_remaining"] > 0


def test_task_length_counts_running_and_waiting_ahead_in_claim_order(client):
    db = client.application.extensions["mflux_sessions"].get()
    client.post("/api/generate", json={"prompt": "runs"})
    db.claim_next("w", "schnell", "synthetic")
    client.post("/api/generate", json={"prompt": "waits"})
    urgent = client.post("/api/generate", json={"prompt": "urgent", "priority": True}).json
    normal = client.post("/api/generate", json={"prompt": "normal"}).json
    assert (urgent["task_length"], urgent["pos"]) == (1, 0)  # only the running one is ahead
    assert (normal["task_length"], normal["pos"]) == (3, 2)
    assert normal["expected_time_seconds"] > urgent["expected_time_seconds"]


@pytest.mark.parametrize("given, stored", [("jpeg", "JPEG"), ("Png", "PNG"), ("webp", "WEBP"), ("JPG", "JPEG")])
def test_format_in_any_case(client, given, stored):
    response = client.post("/api/generate", json={"prompt": "x", "format": given})
    assert response.status_code == 200 and response.json["format"] == stored


@pytest.mark.parametrize("seed", [0, 42, "42", " 7 ", 2**32 - 1])
def test_seed_as_int_or_digit_string(client, seed):
    response = client.post("/api/generate", json={"prompt": "x", "seed": seed})
    assert response.status_code == 200
    assert response.json["seed"] == int(str(seed).strip())


def test_defaults_and_count_model_priority(client):
    body = client.post("/api/generate", json={"prompt": "x", "count": 3, "model": "SCHNELL", "priority": True}).json
    assert (body["count"], body["model"], body["priority"], body["steps"]) == (3, "schnell", True, 4)
    assert (body["width"], body["height"]) == (1024, 1024)
    assert 0 <= body["seed"] <= 2**32 - 1


BAD = [
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": "   "}, "prompt", "must not be empty"),
    ({"prompt": "x" * 4001}, "prompt", "at most 4000 characters"),
    ({}, "prompt", "Missing data"),
    ({"prompt": 5}, "prompt", "Not a valid string"),
    ({"prompt": "x", "width": 1000}, "width", "multiple of 16"),
    ({"prompt": "x", "width": 112}, "width", "from 128 to 2048"),
    ({"prompt": "x", "width": 2064}, "width", "from 128 to 2048"),
    ({"prompt": "x", "height": 1001}, "height", "multiple of 16"),
    ({"prompt": "x", "height": "tall"}, "height", "must be an integer"),
    ({"prompt": "x", "width": 512.5}, "width", "must be an integer"),
    ({"prompt": "x", "steps": 0}, "steps", "from 1 to 100"),
    ({"prompt": "x", "steps": 101}, "steps", "from 1 to 100"),
    ({"prompt": "x", "steps": True}, "steps", "must be an integer"),
    ({"prompt": "x", "guidance": -1}, "guidance", "greater than or equal to 0"),
    ({"prompt": "x", "guidance": 51}, "guidance", "less than or equal to 50"),
    ({"prompt": "x", "quality": 0}, "quality", "greater than or equal to 1"),
    ({"prompt": "x", "quality": 101}, "quality", "less than or equal to 100"),
    ({"prompt": "x", "count": 0}, "count", "from 1 to 8"),
    ({"prompt": "x", "count": 9}, "count", "from 1 to 8"),
    ({"prompt": "x", "format": "gif"}, "format", "JPEG, PNG or WEBP"),
    ({"prompt": "x", "seed": "abc"}, "seed", "integer or a string of the digits 0-9"),
    ({"prompt": "x", "seed": -1}, "seed", "between 0 and 4294967295"),
    ({"prompt": "x", "seed": 2**32}, "seed", "between 0 and 4294967295"),
    ({"prompt": "x", "seed": True}, "seed", "not a boolean"),
    ({"prompt": "x", "seed": 2**32 - 1, "count": 2}, "seed", "seed + count - 1"),
    ({"prompt": "x", "priority": "maybe"}, "priority", "Not a valid boolean"),
    ({"prompt": "x", "model": "flux-pro"}, "model",
     "unknown model 'flux-pro'; known models: krea-2, krea-2-raw, krea-2-controlnet-depth, dev, schnell"),
    ({"prompt": "x", "widht": 512}, "widht", "unknown field"),
]


@pytest.mark.parametrize("body, field, rule", BAD, ids=[f"{b[1]}:{b[2][:20]}" for b in BAD])
def test_each_bad_input_is_a_422_naming_field_and_rule(client, body, field, rule):
    response = client.post("/api/generate", json=body)
    assert response.status_code == 422, response.json
    assert response.is_json
    assert response.json["code"] == "invalid_input"
    assert response.json["field"] == field
    assert rule in response.json["message"]
    assert field in response.json["message"]
    assert client.application.extensions["mflux_sessions"].get().status_counts()[Status.WAITING] == 0


def test_several_bad_fields_are_all_reported(client):
    body = client.post("/api/generate", json={"prompt": "x", "width": 1000, "quality": 0}).json
    assert set(body["errors"]["json"]) == {"width", "quality"}


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"data": "{not json", "content_type": "application/json"}, 400, "invalid_json"),
        ({"json": [1, 2]}, 422, "invalid_input"),
        ({"data": "prompt=x", "content_type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
        ({"data": "x" * (2 << 20), "content_type": "application/json"}, 413, "request_too_large"),
    ],
)
def test_malformed_bodies(app, client, kwargs, status, code):
    # Generate bodies may hold every input image at --max-input-bytes; shrink that so 2 MiB is too much.
    app.extensions["mflux_settings"].max_input_bytes = 1000
    response = client.post("/api/generate", **kwargs)
    assert response.status_code == status
    assert response.is_json and response.json["code"] == code and response.json["message"]


def test_the_generate_body_limit_follows_the_input_image_limit(app, client):
    from mflux_server.api.submission import body_limit

    app.extensions["mflux_settings"].max_input_bytes = 300_000
    with app.app_context():
        limit = body_limit()
    images = 7  # the image, three more references, the mask, the control and garment images
    assert (1 << 20) + images * 400_000 < limit < (1 << 20) + images * 400_000 + 100
    over = client.post("/api/generate", data=" " * (limit + 1), content_type="application/json")
    assert over.status_code == 413 and over.json["code"] == "request_too_large"
    under = client.post("/api/generate", data=" " * (limit - 20) + '{"prompt": "x"}', content_type="application/json")
    assert under.status_code != 413


def test_unknown_task_is_a_json_404_everywhere(client):
    for response in (
        client.get("/api/status?task_id=nope"),
        client.get("/status?task_id=nope"),
        client.get("/api/image?task_id=nope"),
        client.get("/api/tasks/nope"),
        client.delete("/api/tasks/nope"),
    ):
        assert response.status_code == 404 and response.is_json
        assert response.json["code"] == "task_not_found" and response.json["field"] == "task_id"


def test_missing_task_id_is_a_422(client):
    response = client.get("/api/status")
    assert response.status_code == 422 and response.json["field"] == "task_id"


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").json["code"] == "not_found"
    response = client.put("/api/generate", json={})
    assert response.status_code == 405 and response.json["code"] == "method_not_allowed"


def _finish(client, count: int = 1, fmt: str = "PNG") -> str:
    db = client.application.extensions["mflux_sessions"].get()
    task_id = client.post("/api/generate", json={"prompt": "x", "count": count, "format": fmt}).json["task_id"]
    claimed = db.claim_next("w", "schnell", "synthetic")
    assert claimed is not None and db.complete(claimed.id, "w", images_for(claimed, b"PNG"))
    return task_id


def test_image_not_ready_is_a_409_with_status(client):
    task_id = client.post("/api/generate", json={"prompt": "x"}).json["task_id"]
    response = client.get(f"/api/image?task_id={task_id}")
    assert response.status_code == 409
    assert response.json["code"] == "image_not_ready" and response.json["status"] == "waiting"


def test_image_bytes_base64_index_and_delete(client):
    task_id = _finish(client, count=2)
    bad = client.get(f"/api/image?task_id={task_id}&index=2")
    assert bad.status_code == 422 and bad.json["field"] == "index" and "from 0 to 1" in bad.json["message"]
    first = client.get(f"/api/image?task_id={task_id}&index=0&delete=false")
    assert first.status_code == 200 and first.mimetype == "image/png" and first.data == b"PNG0"
    again = client.get(f"/api/image?task_id={task_id}&index=0&base64=true")
    assert again.mimetype == "text/plain" and base64.b64decode(again.data) == b"PNG0"
    assert client.get(f"/api/status?task_id={task_id}").status_code == 200  # image 1 not served yet
    last = client.get(f"/image?task_id={task_id}&index=1&base64=false&delete=true")
    assert last.data == b"PNG1"
    assert client.get(f"/api/status?task_id={task_id}").status_code == 404


def test_tasks_list_filter_paginate_and_delete(client):
    ids = [client.post("/api/generate", json={"prompt": f"p{i}", "priority": i == 3}).json["task_id"] for i in range(5)]
    listing = client.get("/api/tasks?status=waiting&limit=2").json
    assert listing["total"] == 5 and [t["task_id"] for t in listing["tasks"]] == [ids[3], ids[0]]
    assert [t["task_id"] for t in client.get("/api/tasks?status=waiting&limit=2&offset=2").json["tasks"]] == ids[1:3]
    bad = client.get("/api/tasks?status=lost")
    assert bad.status_code == 422 and bad.json["field"] == "status"
    assert client.get("/api/tasks?limit=0").json["field"] == "limit"
    assert client.delete(f"/api/tasks/{ids[0]}").json == {"task_id": ids[0], "result": "canceled"}
    assert client.get(f"/api/status?task_id={ids[0]}").json["status"] == "canceled"
    assert client.delete(f"/api/tasks/{ids[0]}").json["result"] == "deleted"
    assert client.get("/api/tasks").json["counts"]["waiting"] == 4


def test_info_without_workers_warns(client):
    body = client.get("/api/info").json
    assert body["workers"] == [] and body["default_model"] == "schnell"
    assert any("no live worker" in w for w in body["warnings"])
    assert body["forecast"] == {"measured": False}
