"""POST /api/upscale: an image or a finished task's, enlarged by an upscaler as a task of the one queue."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mflux_server.core import catalog
from mflux_server.core.rows import StoredImage
from tests.fast.test_image_inputs import b64, png, serve

UPSCALER = "dev-controlnet-upscaler"


def db_of(client):
    return client.application.extensions["mflux_sessions"].get()


def finished(client, size=(200, 120), count=1, prompt="a harbour") -> str:
    """A done task with real images, as a worker leaves one."""
    created = client.post("/api/generate", json={"prompt": prompt, "model": "schnell", "count": count}).json
    db = db_of(client)
    task = db.claim_next("w", "schnell", "synthetic")
    assert task is not None and task.id == created["task_id"]
    out = io.BytesIO()
    Image.new("RGB", size, "teal").save(out, format="PNG")
    assert db.complete(task.id, "w", [StoredImage(i, task.seed + i, "image/png", out.getvalue(), 1.0, 2.0)
                                      for i in range(count)])
    return task.id


def errors(response, status=422) -> dict:
    assert response.status_code == status, response.json
    return response.json["errors"]["json"] if status == 422 else response.json


def test_the_catalog_serves_the_flux_upscaler_and_generate_refuses_it(client):
    info = catalog.resolve(UPSCALER)
    assert info.capabilities.upscale and not info.capabilities.text_to_image and info.needs_image
    serve(client, UPSCALER)
    found = errors(client.post("/api/generate", json={"prompt": "x", "model": UPSCALER}))
    assert "is an upscaler: send the picture to POST /api/upscale" in found["model"][0]


def test_an_uploaded_image_is_upscaled_by_its_factor_as_a_task(client):
    serve(client, UPSCALER)
    made = client.post("/api/upscale", json={"image": b64(png((200, 120))), "factor": 2})
    assert made.status_code == 200, made.json
    assert (made.json["width"], made.json["height"], made.json["model"]) == (400, 240, UPSCALER)
    assert made.json["status"] == "waiting" and made.json["expected_time_seconds"] > 0
    task = db_of(client).get(made.json["task_id"])
    assert task.steps == catalog.resolve(UPSCALER).default_steps and task.prompt == ""
    assert set(db_of(client).inputs(task.id)) == {"image"}
    listed = client.get("/api/tasks").json["tasks"]
    assert [t["task_id"] for t in listed] == [task.id], "listed like any task"
    assert client.delete(f"/api/tasks/{task.id}").status_code in (200, 204), "and canceled like one"


def test_a_finished_tasks_image_is_upscaled_to_a_width_with_its_prompt(client):
    serve(client, "schnell", UPSCALER)
    source = finished(client, count=2)
    made = client.post("/api/upscale", json={"task_id": source, "index": 1, "width": 800}).json
    assert (made["width"], made["height"]) == (800, 480), "the height follows the aspect"
    task = db_of(client).get(made["task_id"])
    assert task.prompt == "a harbour" and db_of(client).inputs(task.id)["image"].width == 200


@pytest.mark.parametrize("body,field,rule", [
    ({}, "image", "one of the two"),
    ({"image": "PNG", "task_id": "abc"}, "image", "one of the two"),
    ({"image": "PNG", "factor": 2, "width": 512}, "factor", "not both"),
    ({"image": "PNG", "factor": 5}, "factor", "less than or equal to 4"),
    ({"image": "PNG", "factor": 1}, "factor", "greater than 1"),
    ({"image": "PNG", "factor": 4, "upscaler": "dev"}, "upscaler", "'dev' is not an upscaler"),
    ({"image": "BIG", "factor": 4}, "factor", "over the server's largest image"),
    ({"image": "PNG", "width": 128}, "width", "not larger than the image"),
    ({"image": "PNG", "index": 1}, "index", "does not apply to a sent image"),
    ({"image": "bm90IGFuIGltYWdl"}, "image", "not a readable image"),
])
def test_every_bad_upscale_is_a_422_naming_its_field(client, body, field, rule):
    serve(client, UPSCALER)
    images = {"PNG": b64(png((200, 120))), "BIG": b64(png((1000, 600)))}
    body = {name: images.get(value, value) if isinstance(value, str) else value for name, value in body.items()}
    found = errors(client.post("/api/upscale", json=body))
    assert field in found and rule in found[field][0], found


def test_a_task_not_done_or_out_of_range_or_unknown_is_refused(client):
    serve(client, "schnell", UPSCALER)
    done = finished(client)
    waiting = client.post("/api/generate", json={"prompt": "p", "model": "schnell"}).json["task_id"]
    assert errors(client.post("/api/upscale", json={"task_id": waiting}), 409)["code"] == "image_not_ready"
    assert "index 0 to 0" in errors(client.post("/api/upscale", json={"task_id": done, "index": 3}))["index"][0]
    assert errors(client.post("/api/upscale", json={"task_id": "nope"}), 404)["code"] == "task_not_found"


def test_an_upscale_comes_in_multipart_too(client):
    serve(client, UPSCALER)
    made = client.post("/api/upscale", data={"image": (io.BytesIO(png((200, 120))), "small.png"), "width": "400",
                                             "prompt": "a harbour"}, content_type="multipart/form-data")
    assert made.status_code == 200, made.json
    assert (made.json["width"], made.json["height"]) == (400, 240)
    refused = client.post("/api/upscale", data={"image": (io.BytesIO(png((200, 120))), "small.png"), "factor": "9"},
                          content_type="multipart/form-data")
    assert refused.status_code == 422 and refused.json["field"] == "factor"


def test_a_generate_request_with_upscale_queues_one_upscale_per_image_once_it_is_done(client):
    serve(client, "schnell", UPSCALER)
    made = client.post("/api/generate", json={"prompt": "a harbour", "model": "schnell", "width": 512, "height": 384,
                                              "count": 2, "priority": False,
                                              "upscale": {"factor": 2, "steps": 7}})
    assert made.status_code == 200, made.json
    assert made.json["upscale"] == {"upscaler": UPSCALER, "width": 1024, "height": 768, "steps": 7, "task_ids": []}
    db = db_of(client)
    task = db.claim_next("w", "schnell", "synthetic")
    assert task is not None and task.id == made.json["task_id"]
    assert db_of(client).upscale_tasks_of(task.id) == [], "nothing queued while it runs"
    from mflux_server.worker.result_writer import upscales_after  # the worker's own hand-off

    out = io.BytesIO()
    Image.new("RGB", (512, 384), "teal").save(out, format="PNG")
    images = [StoredImage(i, task.seed + i, "image/png", out.getvalue(), 1.0, 2.0) for i in range(2)]
    assert db.complete(task.id, "w", images, upscales_after(task, images))
    view = client.get("/api/status", query_string={"task_id": task.id}).json
    ids = view["upscale"]["task_ids"]
    assert len(ids) == 2 and view["status"] == "done"
    for index, upscale_id in enumerate(ids):
        upscale = client.get("/api/status", query_string={"task_id": upscale_id}).json
        assert upscale["status"] == "waiting" and upscale["model"] == UPSCALER
        assert (upscale["width"], upscale["height"], upscale["steps"]) == (1024, 768, 7)
        assert upscale["upscales"] == {"task_id": task.id, "index": index}
        assert upscale["wait_remaining"] > 0, "forecast like any task"
        stored, info = db.get(upscale_id), catalog.resolve(UPSCALER)
        assert (stored.guidance, bool(stored.guidance_auto)) == (info.default_guidance or 0.0,
                                                                 info.default_guidance is None), "as /api/upscale's"
    default = client.post("/api/generate", json={"prompt": "p", "model": "schnell", "width": 256, "height": 256,
                                                 "upscale": {}}).json
    assert default["upscale"]["width"] == 512 and default["upscale"]["steps"] == catalog.resolve(UPSCALER).default_steps


@pytest.mark.parametrize("upscale, field, rule", [
    ({"factor": 2, "width": 1024}, "factor", "not both"),
    ({"upscaler": "schnell"}, "upscaler", "is not an upscaler"),
    ({"factor": 4}, "factor", "over the server's largest image"),
    ({"width": 256}, "width", "not larger than the image"),
    ({"factor": 9}, "factor", "less than or equal to 4"),
    ({"scale": 2}, "scale", "unknown field"),
])
def test_every_bad_upscale_of_a_generate_request_is_a_422_naming_it(client, upscale, field, rule):
    serve(client, "schnell", UPSCALER)
    found = errors(client.post("/api/generate", json={"prompt": "p", "model": "schnell", "width": 1024,
                                                      "height": 1024, "upscale": upscale}))
    assert rule in " ".join(found["upscale"][field]), found
    assert db_of(client).list_tasks(None, 10, 0)[1] == 0, "nothing queued"


def test_an_upscaler_no_live_worker_serves_is_a_409_and_a_text_upscale_is_a_422(client):
    serve(client, "schnell")
    refused = client.post("/api/generate", json={"prompt": "p", "model": "schnell", "upscale": {"factor": 2}})
    assert refused.status_code == 409 and refused.json["field"] == "upscale.upscaler", refused.json
    text = errors(client.post("/api/generate", json={"prompt": "p", "model": "schnell", "upscale": "2x"}))
    assert "must be an object" in text["upscale"]["_schema"][0]


def test_an_upscale_a_done_task_queues_is_charged_to_its_key_not_put_after_every_other_task(db):
    from dataclasses import replace as with_

    from mflux_server.core.rows import UpscaleAfter
    from mflux_server.worker.result_writer import upscales_after
    from tests.conftest import new_task

    after = UpscaleAfter(UPSCALER, 1024, 1024, 2, fair_cost=1.0)  # priced by the API at submit
    mine = db.submit(with_(new_task(), key_id=1, fair_cost=2.0, then_upscale=after.text()))
    others = [db.submit(with_(new_task(), key_id=2, fair_cost=2.0)) for _ in range(3)]
    task = db.claim_next("w", mine.model, "synthetic")
    assert task is not None and task.id == mine.id
    images = [StoredImage(0, task.seed, "image/png", png(), 1.0, 2.0)]
    then = upscales_after(task, images)
    assert [t.fair_cost for t in then] == [1.0]
    assert db.complete(task.id, "w", images, then)
    (upscale_id,) = db.upscale_tasks_of(task.id)
    tag = lambda task_id: db.session.execute("SELECT fair_tag FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]  # noqa: E731
    assert tag(upscale_id) < tag(others[2].id), "its key's turn, not after every task queued meanwhile"


def test_a_keys_unfinished_count_includes_the_upscales_its_tasks_will_queue_on_either_store(store_db):
    from dataclasses import replace as with_

    from mflux_server import store
    from mflux_server.core.rows import UpscaleAfter
    from tests.conftest import new_task

    db = store.connect(store_db)
    try:
        after = UpscaleAfter(UPSCALER, 1024, 1024, 2).text()
        db.submit(with_(new_task(), key_id=7, count=3, then_upscale=after))
        db.submit(with_(new_task(), key_id=7))
        db.submit(with_(new_task(), key_id=8, count=2, then_upscale=after))
        assert (db.unfinished_of_key(7), db.unfinished_of_key(8), db.unfinished_of_key(9)) == (5, 3, 0)
    finally:
        db.close()
