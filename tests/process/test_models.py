"""Workers that switch models, fail a model that will not load, and recover from running out of memory."""

from __future__ import annotations

import io

from PIL import Image

from mflux_server.testing import wait_for
from tests.conftest import queue_task, reread, status_of


def test_a_worker_keeps_its_model_then_switches_and_measures_the_load(db, db_path, processes):
    first = [queue_task(db, model="schnell", width=256, height=256, prompt=f"s{i}") for i in range(3)]
    other = queue_task(db, model="dev", width=256, height=256, prompt="d", format="PNG")
    later = queue_task(db, model="schnell", width=256, height=256, prompt="s-late")
    processes.worker("--models", "schnell,dev", "--synthetic-load", "4", "--max-affinity-wait", "60")
    tasks = [*first, other, later]
    wait_for(lambda: all(status_of(db_path, t.id) == "done" for t in tasks), what="all tasks done")
    order = [t.prompt for t in sorted((reread(db_path, t.id) for t in tasks), key=lambda t: t.started_at)]
    assert order == ["s0", "s1", "s2", "s-late", "d"], "the loaded model's work first, then one switch"
    loads = db.load_stats()
    assert set(loads) == {"schnell", "dev"} and loads["dev"].n == 1 and loads["dev"].last >= 4 / 20
    worker = db.live_workers(15)[0]
    assert worker.model == "dev" and worker.servable == ("dev", "schnell") and worker.loading is None
    made_by = Image.open(io.BytesIO(db.fetch_image(other.id, 0).data)).text["Software"]
    assert "model dev " in made_by, "the image must name the model that made it, not the one loaded first"


def test_a_task_for_another_model_waits_no_longer_than_the_bound(db, db_path, processes):
    processes.worker("--models", "schnell,dev", "--max-affinity-wait", "0.5", speed=1.0)
    waiting = queue_task(db, model="dev", width=256, height=256, steps=2, prompt="d")
    stream = [queue_task(db, model="schnell", width=256, height=256, steps=2, prompt=f"s{i}") for i in range(12)]
    wait_for(lambda: status_of(db_path, waiting.id) == "done", what="the dev task")
    started = reread(db_path, waiting.id).started_at
    schnell_after = [t for t in stream if (reread(db_path, t.id).started_at or 1e18) < started]
    assert len(schnell_after) < len(stream), "the dev task did not wait for the whole schnell stream"
    assert started - waiting.created_at < 0.5 + 3.0


def test_a_model_that_fails_to_load_fails_its_tasks_and_the_worker_goes_on(db, db_path, processes):
    missing = "/nonexistent/flux1-dev-4bit"
    processes.worker("--models", f"schnell,{missing}")
    bad = [queue_task(db, model=missing, width=256, height=256, prompt=f"b{i}") for i in range(2)]
    good = queue_task(db, model="schnell", width=256, height=256)
    wait_for(lambda: status_of(db_path, good.id) == "done" and all(status_of(db_path, t.id) == "error" for t in bad),
             what="bad tasks failed, good one done")
    for task in bad:
        assert f"model {missing} failed to load" in reread(db_path, task.id).error
        assert "no model folder" in reread(db_path, task.id).error
    assert db.live_workers(15)[0].servable == ("schnell",), "the API must stop accepting the broken model"


def test_out_of_memory_fails_only_that_task_lowers_the_limit_and_the_worker_recovers(db, db_path, processes):
    processes.worker("--synthetic-max-pixels", str(512 * 512))
    huge = queue_task(db, width=1024, height=1024, prompt="huge")
    after = [queue_task(db, width=256, height=256, prompt=f"ok{i}") for i in range(3)]
    wait_for(lambda: all(status_of(db_path, t.id) == "done" for t in after), what="later tasks done")
    failed = reread(db_path, huge.id)
    assert failed.status == "error"
    assert "1024×1024 (1048576 pixels) is too large for this worker: it ran out of memory" in failed.error
    worker = db.live_workers(15)[0]
    assert worker.limit_for("schnell") == 1024 * 1024 - 1
    image = db.fetch_image(after[0].id, 0)
    assert Image.open(io.BytesIO(image.data)).size == (256, 256)
    timed = {(s.width, s.kind) for s in db.timing_stats()}
    assert not any(width == 1024 for width, _ in timed), "the failed generation's timings were recorded"


def test_inpaint_over_real_http_keeps_every_unmasked_pixel(processes):
    import requests
    from PIL import ImageChops

    url = processes.server()
    processes.worker("--models", "schnell,dev-fill")
    source = Image.linear_gradient("L").resize((256, 192)).convert("RGB")
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (32, 32, 128, 96))
    files = {}
    for name, picture in (("image", source), ("mask", mask)):
        out = io.BytesIO()
        picture.save(out, format="PNG")
        files[name] = (f"{name}.png", out.getvalue(), "image/png")
    response = requests.post(f"{url}/api/generate", data={"prompt": "a hat", "model": "dev-fill", "format": "PNG",
                                                         "steps": "2"}, files=files, timeout=10)
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    wait_for(lambda: requests.get(f"{url}/api/status", params={"task_id": task_id}, timeout=5).json()["status"] == "done",
             what="inpaint done")
    result = Image.open(io.BytesIO(requests.get(f"{url}/api/image", params={"task_id": task_id}, timeout=5).content))
    diff = ImageChops.difference(result.convert("RGB"), source).convert("L")
    assert Image.composite(Image.new("L", source.size, 0), diff, mask).getbbox() is None
    assert Image.composite(diff, Image.new("L", source.size, 0), mask).getbbox() is not None
    readable = {name: (part[0], part[1], part[2]) for name, part in files.items()}
    refused = requests.post(f"{url}/api/generate", data={"prompt": "x", "model": "schnell"}, files=readable, timeout=5)
    assert refused.status_code == 422 and refused.json()["field"] == "mask"
    assert "model schnell does no inpainting" in refused.json()["message"]


def test_the_worker_publishes_each_models_largest_image_from_its_memory_need(db, db_path, processes):
    # 60 GiB: FLUX.1 (33 GiB of weights) fits well past the 1536² cap; Qwen-Image (51.5 GiB) only ~830².
    processes.worker("--models", "schnell,qwen-image,fibo", "--gpu-memory", "60")
    worker = wait_for(lambda: next(iter(db.live_workers(15)), None), what="worker registered")
    assert worker.limit_for("schnell") == 1536 * 1536
    assert worker.limit_for("fibo") == 1536 * 1536  # no measured need: the cap alone
    assert 800 * 800 < worker.limit_for("qwen-image") < 840 * 840
    # A qwen task queued behind the API's back still fails at the worker with the reason, not out of memory.
    big = queue_task(db, model="qwen-image", width=1024, height=1024)
    wait_for(lambda: status_of(db_path, big.id) == "error", what="oversized task refused")
    assert "is too large for this worker" in reread(db_path, big.id).error


def test_an_edit_from_several_references_over_real_http_shows_each_one(processes):
    import requests

    url = processes.server()
    processes.worker("--models", "qwen-image-edit")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    files = []
    for number, colour in enumerate(colours):
        out = io.BytesIO()
        Image.new("RGB", (96, 96), colour).save(out, format="PNG")
        files.append(("images", (f"reference{number}.png", out.getvalue(), "image/png")))
    response = requests.post(f"{url}/api/generate", files=files, timeout=10, data={
        "prompt": "the three side by side", "model": "qwen-image-edit", "format": "PNG", "steps": "2",
        "width": "256", "height": "128"})
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    wait_for(lambda: requests.get(f"{url}/api/status", params={"task_id": task_id}, timeout=5).json()["status"] == "done",
             what="edit done")
    result = Image.open(io.BytesIO(requests.get(f"{url}/api/image", params={"task_id": task_id}, timeout=5).content))
    cell, gap = 256 // 4, (256 - 3 * (256 // 4)) // 4
    # The synthetic engine pastes each reference it was given, in order, across the middle.
    seen = [result.convert("RGB").getpixel((gap + number * (cell + gap) + cell // 2, 64)) for number in range(3)]
    assert seen == colours


def test_a_worker_refuses_a_model_that_cannot_fit_its_memory_and_another_worker_runs_it(db, db_path, processes):
    import requests

    url = processes.server()
    # FLUX.1 in bf16 needs ~33 GiB before any image: a 20 GiB worker must say so and not serve it at all.
    alone = processes.worker("--model", "schnell", "--gpu-memory", "20", wait=False)
    assert alone.wait(timeout=30) == 1
    log = processes.log(alone)
    assert "model schnell needs about 33.2 GiB at bf16" in log and "this worker has 20.0 GiB" in log
    assert "--quantize 8" in log and "--quantize 4" in log
    assert db.live_workers(15) == []
    mixed = processes.worker("--models", "schnell,z-image-turbo", "--gpu-memory", "20")
    worker = wait_for(lambda: next(iter(db.live_workers(15)), None), what="worker registered")
    assert worker.servable == ("z-image-turbo",) and "not serving schnell" in processes.log(mixed)
    refused = requests.post(f"{url}/api/generate", json={"prompt": "x", "model": "schnell"}, timeout=5)
    assert refused.status_code in (409, 422, 503), refused.text
    processes.worker("--model", "schnell")  # a worker with room for it
    task_id = requests.post(f"{url}/api/generate", json={"prompt": "x", "model": "schnell", "width": 256,
                                                          "height": 256, "steps": 2}, timeout=5).json()["task_id"]
    wait_for(lambda: status_of(db_path, task_id) == "done", what="schnell task done by the worker that fits it")
    assert reread(db_path, task_id).worker_id != worker.id
