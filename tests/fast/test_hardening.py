"""Bad input that Python parses but no field may hold, query rules, safe methods, and honest answers about workers."""

from __future__ import annotations

import time

import pytest

from mflux_server.core.rows import Status
from tests.conftest import images_for

JSON = {"content_type": "application/json"}


def waiting(client) -> int:
    return client.application.extensions["mflux_sessions"].get().status_counts()[Status.WAITING]


@pytest.mark.parametrize("raw, field, rule", [
    (b'{"prompt": "a\\ud800b"}', "prompt", "lone UTF-16 surrogate"),
    (b'{"prompt": "x", "negative_prompt": "\\udfff"}', "negative_prompt", "lone UTF-16 surrogate"),
    (b'{"prompt": "x", "\\ud800": 1}', "_body", "field name with a lone UTF-16 surrogate"),
    (b'{"prompt": "x", "images": ["\\ud83d"]}', "images.0", "lone UTF-16 surrogate"),
    (b'{"prompt": "x", "steps": ' + b"1" * 5000 + b"}", "steps", "5000 digits"),
    (b'{"prompt": "x", "guidance": 1' + b"0" * 80 + b".5}", "guidance", "digits"),
    (b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", "prompt", "deeper than 8 levels"),
    (b'{"prompt": "x", "seed": "\xc2\xb2"}', "seed", "digits 0-9"),
    (b'{"prompt": "x", "seed": "\xd9\xa3\xd9\xa3"}', "seed", "digits 0-9"),
    (b'{"prompt": "x", "seed": "' + b"1" * 5000 + b'"}', "seed", "5000 digits"),
])
def test_json_python_reads_but_no_field_may_hold_is_a_422_naming_the_field(client, raw, field, rule):
    response = client.post("/api/generate", data=raw, **JSON)
    assert response.status_code == 422, response.json
    assert response.json["field"] == field and rule in response.json["message"], response.json
    assert waiting(client) == 0


def test_a_valid_surrogate_pair_is_text_and_is_kept(client):
    response = client.post("/api/generate", data=b'{"prompt": "a cat \\ud83d\\ude00"}', **JSON)
    assert response.status_code == 200
    assert response.json["task_id"]
    task = client.application.extensions["mflux_sessions"].get().get(response.json["task_id"])
    assert task.prompt == "a cat \U0001f600"


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "guidance": NaN}', b'{"prompt": "x", "guidance": Infinity}',
                                 b'\xff{"prompt": "x"}', b'[' * 100_000])
def test_what_is_not_json_is_a_400_invalid_json_or_a_422(client, raw):
    response = client.post("/api/generate", data=raw, **JSON)
    assert response.status_code in (400, 422) and response.is_json, response.data[:200]
    assert response.json["code"] in ("invalid_json", "invalid_input")


@pytest.mark.parametrize("path, field", [
    ("/api/tasks?offset=9223372036854775808", "offset"),
    ("/api/tasks?limit=" + "9" * 30, "limit"),
    ("/api/tasks?limit=true", "limit"),
    ("/api/image?task_id=abc&index=99999999999999999999", "index"),
    ("/api/image?task_id=abc&index=8", "index"),
    ("/api/events?last_event_id=9223372036854775808", "last_event_id"),
    ("/api/status?task_id=" + "a" * 65, "task_id"),
    ("/api/tasks/" + "a" * 65, "task_id"),
    ("/api/status?task_id=nope&task_id=real", "task_id"),
    ("/api/tasks?status=done&status=error", "status"),
])
def test_every_query_integer_is_bounded_and_each_parameter_comes_once(client, path, field):
    response = client.get(path)
    assert response.status_code == 422, response.json
    assert response.json["field"] == field, response.json


def test_a_repeated_multipart_field_is_refused(client):
    response = client.post("/api/generate", data={"prompt": ["a", "b"]}, content_type="multipart/form-data")
    assert response.status_code == 422 and response.json["field"] == "prompt"
    assert "2 times" in response.json["message"]


def test_options_answers_204_with_allow_and_405_names_the_allowed_methods(client):
    options = client.options("/api/generate")
    assert options.status_code == 204 and options.data == b""
    assert set(options.headers["Allow"].split(", ")) >= {"POST", "OPTIONS"}
    refused = client.put("/api/generate")
    assert refused.status_code == 405 and refused.is_json
    assert set(refused.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    assert client.patch("/api/tasks/abc").headers["Allow"] == "DELETE, GET, HEAD, OPTIONS"


def test_head_on_an_image_never_consumes_it(client):
    db = client.application.extensions["mflux_sessions"].get()
    worker = db.register_worker("synthetic", "schnell", None)
    task_id = client.post("/api/generate", json={"prompt": "x", "width": 256, "height": 256}).json["task_id"]
    task = db.claim_next(worker, "schnell", "synthetic")
    assert db.complete(task.id, worker, images_for(task, b"\x89PNG fake"))
    assert db.get(task_id).status is Status.DONE
    for _ in range(3):
        head = client.head(f"/api/image?task_id={task_id}")
        assert head.status_code == 200 and head.headers["Content-Type"] == "image/png"
    assert client.get(f"/api/image?task_id={task_id}").status_code == 200, "still there after three HEADs"
    assert client.get(f"/api/image?task_id={task_id}").status_code == 404, "a GET consumes it, as before"


def test_a_model_no_live_worker_serves_is_refused_with_409_and_nothing_is_queued(client):
    db = client.application.extensions["mflux_sessions"].get()
    db.register_worker("synthetic", "dev", None)
    refused = client.post("/api/generate", json={"prompt": "x"})  # the server's default model is schnell
    assert refused.status_code == 409 and refused.json["code"] == "model_not_served"
    assert refused.json["field"] == "model" and "the live workers serve dev." in refused.json["message"]
    assert "schnell" in refused.json["message"] and waiting(client) == 0
    assert client.post("/api/generate", json={"prompt": "x", "model": "dev"}).status_code == 200


def test_with_no_worker_alive_a_task_queues_and_says_it_waits_for_one(client):
    response = client.post("/api/generate", json={"prompt": "x", "model": "dev"})
    assert response.status_code == 200
    body = response.json
    assert body["waiting_for_worker"] is True and "no worker is running" in body["note"]
    assert isinstance(body["wait_remaining"], float) and isinstance(body["expected_time_seconds"], float)
    status = client.get(f"/api/status?task_id={body['task_id']}").json
    assert status["waiting_for_worker"] is True and status["status"] == "waiting"
    db = client.application.extensions["mflux_sessions"].get()
    db.register_worker("synthetic", "dev", None)
    assert "waiting_for_worker" not in client.get(f"/api/status?task_id={body['task_id']}").json, "a worker came"


def test_a_task_whose_worker_stopped_heartbeating_says_the_worker_was_lost(client):
    db = client.application.extensions["mflux_sessions"].get()
    worker = db.register_worker("synthetic", "schnell", None)
    task_id = client.post("/api/generate", json={"prompt": "x"}).json["task_id"]
    db.claim_next(worker, "schnell", "synthetic")
    assert "worker_lost" not in client.get(f"/api/status?task_id={task_id}").json
    db.heartbeat(worker, now=time.time() - 10)  # the app's --stale-after is 2 s
    status = client.get(f"/api/status?task_id={task_id}").json
    assert status["status"] == "processing" and status["worker_lost"] is True
    assert "retried" in status["note"] and status["wait_remaining"] > 0


def test_the_spec_states_the_rules_the_server_checks(client):
    spec = client.get("/openapi.json").json
    body = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert body["width"]["minimum"] == 128 and body["width"]["maximum"] == 2048 and body["width"]["multipleOf"] == 16
    assert body["prompt"]["maxLength"] == 4000 and body["prompt"]["minLength"] == 1
    assert [option.get("type") for option in body["seed"]["oneOf"]] == ["integer", "string"]
    image = spec["paths"]["/api/image"]["get"]
    assert {p["name"]: p["schema"].get("maximum") for p in image["parameters"]}["index"] == 7
    assert set(image["responses"]["200"]["content"]) == {"image/jpeg", "image/png", "image/webp", "text/plain"}


def test_what_the_fuzzer_found_stays_fixed(client):
    spec = client.get("/openapi.json").json
    # 1. task_ids allowed more than gunicorn's 4 KB request line holds, so a valid request got a 414.
    events = spec["paths"]["/api/events"]["get"]
    longest = next(p for p in events["parameters"] if p["name"] == "task_ids")["schema"]["maxLength"]
    assert len("GET /api/events?task_ids=") + longest + len(" HTTP/1.1") < 4094
    # 2. The stream's schema said "a string", while each message is an object of id, event and data.
    stream = events["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert stream["type"] == "object" and set(stream["properties"]) >= {"id", "event", "data"}
    # 3. (round 2's long run) AceDataCloud's retrieve_batch ignored an `id` of the wrong type; every field sent
    # is checked, whichever the action reads.
    for body, field in (({"action": "retrieve_batch", "ids": ["x"], "id": {"a": 1}}, "id"),
                        ({"action": "retrieve", "id": "x", "ids": [1]}, "ids"), ({"ids": "x"}, "ids")):
        answer = client.post("/flux/tasks", json=body)
        assert answer.status_code == 400 and answer.json["error"]["field"] == field, answer.json
    # 4. (2026-12-07's long run) NebulaBlock took a model of {} (or 0, false, []) as left out and generated.
    for model in ({}, 0, False, [], ["schnell"]):
        answer = client.post("/api/v1/images/generation", json={"prompt": "x", "model": model})
        assert answer.status_code == 400 and answer.json["param"] == "model", (model, answer.json)
        assert "must be a string" in answer.json["message"]


@pytest.mark.parametrize("method, path, body, field", [
    ("post", "/api/generate", {"prompt": "a\u0000b"}, "prompt"),
    ("post", "/api/generate", {"prompt": "x", "callback_url": "https://example.com/\u0000"}, "callback_url"),
    ("post", "/api/generate", {"prompt": "x", "negative_prompt": "\u0000"}, "negative_prompt"),
    ("post", "/v1/images/generations", {"prompt": "a\u0000b"}, "prompt"),
    ("post", "/v1/images/generations", {"prompt": "x", "user": "\u0000"}, "user"),
    ("post", "/flux/images", {"prompt": "a\u0000b", "action": "generate"}, "prompt"),
    ("post", "/api/v1/images/generation", {"prompt": "a\u0000b"}, "prompt"),
    ("post", "/flux/tasks", {"id": "a\u0000b", "action": "retrieve"}, "id"),
])
def test_nul_in_any_json_text_is_a_422_on_every_store(client, method, path, body, field):
    response = getattr(client, method)(path, json=body)
    # The compatible surfaces answer their own status for invalid input (OpenAI's 400), in their envelopes.
    assert response.status_code == (422 if path.startswith("/api/generate") else 400), response.json
    assert "NUL character" in str(response.json) and field in str(response.json), response.json
    assert waiting(client) == 0


@pytest.mark.parametrize("path, status", [
    ("/api/status?task_id=a%00b", 422), ("/api/image?task_id=a%00b", 422), ("/api/events?task_ids=a%00b", 422),
    ("/api/tasks/a%00b", 404), ("/api/tasks?status=wait%00ing", 422), ("/api/status?task%00id=x", 422),
])
def test_nul_in_a_path_or_query_is_refused_before_any_store_sees_it(client, path, status):
    response = client.get(path)
    assert response.status_code == status, response.json
    assert "NUL character" in response.json["message"]


def test_nul_in_a_multipart_field_is_a_422(client):
    response = client.post("/api/generate", data={"prompt": "a\u0000b"}, content_type="multipart/form-data")
    assert response.status_code == 422 and response.json["field"] == "prompt", response.json


@pytest.mark.parametrize("raw, field", [
    (b'{"prompt": "x", "prompt": "y"}', "prompt"),
    (b'{"prompt": "x", "steps": 2, "steps": 3}', "steps"),
])
def test_a_json_key_given_twice_is_refused_like_a_repeated_query_or_form_field(client, raw, field):
    response = client.post("/api/generate", data=raw, **JSON)
    assert response.status_code == 422 and response.json["field"] == field, response.json
    assert "more than once" in response.json["message"]
    assert waiting(client) == 0


def test_a_5xx_a_view_explains_keeps_its_message_and_is_logged(client, caplog):
    import logging

    from werkzeug.exceptions import GatewayTimeout

    from mflux_server.api.errors import abort_json

    @client.application.route("/test-timeout")
    def timeout_view():
        abort_json(504, code="timeout", message="not ready within 1 s; the task goes on as abc")

    with caplog.at_level(logging.WARNING, logger="mflux_server"):
        answer = client.get("/test-timeout")
    assert answer.status_code == 504 and answer.json["message"].endswith("the task goes on as abc")
    assert any("504 timeout: not ready within 1 s" in record.getMessage() for record in caplog.records)
    assert GatewayTimeout.code == 504


def test_a_5xx_a_view_explains_keeps_its_message(app):
    from werkzeug.exceptions import GatewayTimeout, InternalServerError

    from mflux_server.api.errors import error_payload

    timeout = GatewayTimeout()
    timeout.data = {"code": "timeout", "message": "not ready within 1 s; the task goes on as abc"}
    payload, status, _ = error_payload(timeout)
    assert (status, payload["code"]) == (504, "timeout") and "the task goes on as abc" in payload["message"]
    payload, status, _ = error_payload(InternalServerError())
    assert payload["message"] == "the server hit an unexpected error; it has been logged"


@pytest.mark.parametrize("method", ["get", "post", "delete"])
@pytest.mark.parametrize("path", ["/api//status?task_id=x", "//api/status", "/api/tasks/a%2Fb", "/api/tasks/a%2F",
                                  "/api/tasks//events", "/api/tasks/abc/"])
def test_odd_paths_are_json_answers_never_a_redirect_built_from_the_host_header(client, method, path):
    response = getattr(client, method)(path, headers={"Host": "evil.example"})
    assert 400 <= response.status_code < 500, response.status_code
    assert "Location" not in response.headers and response.is_json
