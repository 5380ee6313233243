"""Image inputs and models: every input kind is checked at submit against the model's capabilities, and stored."""

from __future__ import annotations

import base64
import io

import marshmallow as ma
import pytest
from PIL import Image

from mflux_server.core.rows import Status
from mflux_server.forecast.cost_model import CostModel
from tests.conftest import new_task


def png(size=(256, 192), colour="red", mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def serve(client, *models, max_pixels=None, pixel_limits=None):
    """Register a live worker that may serve these models, as a worker process does."""
    db = client.application.extensions["mflux_sessions"].get()
    return db.register_worker("synthetic", models[0], None, models=models, max_pixels=max_pixels,
                                pixel_limits=pixel_limits)


def post(client, **body):
    return client.post("/api/generate", json={"prompt": "p", **body})


def test_image_to_image_stores_the_input_and_defaults_size_and_strength(client):
    serve(client, "dev")
    response = post(client, model="dev", image="data:image/png;base64," + b64(png((300, 200)))).json
    assert (response["width"], response["height"]) == (288, 192)  # the image's size, down to a multiple of 16
    db = client.application.extensions["mflux_sessions"].get()
    task = db.get(response["task_id"])
    assert task.image_strength == 0.4 and task.model == "dev"
    stored = db.inputs(task.id)
    assert set(stored) == {"image"} and (stored["image"].width, stored["image"].height) == (300, 200)
    assert stored["image"].data == png((300, 200)) and stored["image"].mime == "image/png"
    assert client.delete(f"/api/tasks/{task.id}").status_code in (200, 204)
    client.delete(f"/api/tasks/{task.id}")  # canceled first, then deleted
    assert db.inputs(task.id) == {}, "inputs leave with their task"


def test_init_image_is_the_original_servers_name_and_guidance_defaults_to_the_models(client):
    serve(client, "dev")
    task = post(client, model="dev", init_image=b64(png()), image_strength=0.7).json
    db = client.application.extensions["mflux_sessions"].get()
    row = db.get(task["task_id"])
    assert row.image_strength == 0.7 and row.guidance == 3.5 and not row.guidance_auto
    assert set(db.inputs(row.id)) == {"image"}


def test_inpaint_takes_image_and_mask_of_the_same_size(client):
    serve(client, "dev-fill")
    ok = post(client, model="dev-fill", image=b64(png()), mask=b64(png(colour="white", mode="L")))
    assert ok.status_code == 200, ok.json
    db = client.application.extensions["mflux_sessions"].get()
    assert set(db.inputs(ok.json["task_id"])) == {"image", "mask"}
    wrong = post(client, model="dev-fill", image=b64(png()), mask=b64(png((128, 128), mode="L")))
    assert wrong.status_code == 422 and wrong.json["field"] == "mask"
    assert "must be the image's size, 256×192; got 128×128" in wrong.json["message"]
    missing = post(client, model="dev-fill", image=b64(png()))
    assert missing.status_code == 422 and missing.json["field"] == "mask"


@pytest.mark.parametrize("model, body, field, rule", [
    ("schnell", {"mask": "M", "image": "I"}, "mask", "model schnell does no inpainting"),
    ("iris-3b", {"image": "I"}, "image", "model iris-3b takes no input image"),
    ("lens-turbo", {"image": "I"}, "image", "model lens-turbo takes no input image"),
    ("lens-turbo", {"negative_prompt": "blur"}, "negative_prompt", "model lens-turbo ignores negative prompts"),
    ("dev-kontext", {}, "image", "model dev-kontext needs an input image"),
    ("dev-kontext", {"image": "I", "image_strength": 0.5}, "image_strength", "does no image-to-image"),
    ("dev", {"image_strength": 0.5}, "image_strength", "needs an input image"),
    ("dev", {"mask": "M"}, "mask", "model dev does no inpainting"),
    ("dev", {"image": "I", "init_image": "I"}, "init_image", "not both"),
])
def test_a_field_the_model_cannot_use_is_a_422_naming_field_and_model(client, model, body, field, rule):
    serve(client, model)
    images = {"I": b64(png()), "M": b64(png(mode="L"))}
    response = post(client, model=model, **{k: images.get(v, v) for k, v in body.items()})
    assert response.status_code == 422, response.json
    assert response.json["field"] == field and rule in response.json["message"]


def test_an_edit_takes_several_reference_images_in_order(client):
    serve(client, "qwen-image-edit")
    colours = ["red", "green", "blue", "white"]
    response = post(client, model="qwen-image-edit", images=[b64(png((128 + 16 * n, 128), c)) for n, c in enumerate(colours)])
    assert response.status_code == 200, response.json
    assert (response.json["width"], response.json["height"]) == (128, 128), "the size follows the first reference"
    db = client.application.extensions["mflux_sessions"].get()
    stored = db.inputs(response.json["task_id"])
    assert list(stored) == ["image", "image2", "image3", "image4"]
    assert [stored[role].width for role in stored] == [128, 144, 160, 176]


def test_multipart_takes_references_as_repeated_images_parts(client):
    serve(client, "flux2-klein-4b")
    response = client.post("/api/generate", content_type="multipart/form-data", data={
        "prompt": "put the cat on the sofa", "model": "flux2-klein-4b",
        "images": [(io.BytesIO(png(colour="red")), "cat.png"), (io.BytesIO(png((64, 64), "blue")), "sofa.png")]})
    assert response.status_code == 200, response.json
    db = client.application.extensions["mflux_sessions"].get()
    stored = db.inputs(response.json["task_id"])
    assert [(role, image.width) for role, image in stored.items()] == [("image", 256), ("image2", 64)]


@pytest.mark.parametrize("model, body, field, rule", [
    ("dev-kontext", {"images": ["I", "I"]}, "images", "model dev-kontext edits from at most 1 reference image(s); got 2"),
    ("qwen-image-edit", {"images": ["I"] * 5}, "images", "holds 5 images; an edit or a variation takes at most 4"),
    ("dev", {"images": ["I", "I"]}, "images", "model dev does no edit"),
    ("flux2-klein-4b", {"images": ["I", "I"], "image_strength": 0.5}, "image_strength", "not to several edit references"),
    ("qwen-image-edit", {"image": "I", "images": ["I", "I"]}, "images", "not both image and images"),
    ("qwen-image-edit", {"images": []}, "images", "Shorter than minimum length 1"),
    ("qwen-image-edit", {"images": ["I", "not base64!"]}, "images.1", "must be base64 image data"),
])
def test_bad_reference_lists_are_a_422_naming_the_rule(client, model, body, field, rule):
    serve(client, model)
    images = {"I": b64(png())}
    body = {k: [images.get(i, i) for i in v] if isinstance(v, list) else images.get(v, v) for k, v in body.items()}
    response = post(client, model=model, **body)
    assert response.status_code == 422, response.json
    assert response.json["field"] == field and rule in response.json["message"], response.json


def test_a_single_entry_images_list_is_the_same_as_image(client):
    serve(client, "dev")
    response = post(client, model="dev", images=[b64(png())], image_strength=0.5)
    assert response.status_code == 200, response.json
    db = client.application.extensions["mflux_sessions"].get()
    assert set(db.inputs(response.json["task_id"])) == {"image"}


def test_an_input_image_larger_than_the_app_wide_body_limit_is_accepted(client):
    serve(client, "dev")
    noise = Image.effect_noise((700, 700), 100).convert("RGB")
    out = io.BytesIO()
    noise.save(out, format="PNG")
    assert len(out.getvalue()) > 1 << 20, "the image alone is over the 1 MiB other endpoints take"
    response = post(client, model="dev", image=b64(out.getvalue()))
    assert response.status_code == 200, response.json


@pytest.mark.parametrize("value, rule", [
    ("not base64!", "must be base64 image data or a data: URL"),
    (b64(b"just some text, not an image"), "is not a readable image"),
    (b64(png()[:-40]), "is not a readable image"),  # truncated
    (b64(png()[:60]), "is not a readable image"),  # header only
    ("", "is empty"),
    (17, "must be base64 image data, a data: URL, or a file upload"),
])
def test_a_corrupt_truncated_or_non_image_is_refused_at_submit(client, value, rule):
    serve(client, "dev")
    response = post(client, model="dev", image=value)
    assert response.status_code == 422 and response.json["field"] == "image"
    assert rule in response.json["message"], response.json["message"]


def test_byte_and_pixel_limits(app, client):
    serve(client, "dev")
    app.extensions["mflux_settings"].max_input_pixels = 100 * 100
    app.extensions["mflux_settings"].max_input_bytes = 10_000
    big = post(client, model="dev", image=b64(png((200, 200))))
    assert big.status_code == 422 and "200×200 = 40000 pixels; at most 10000" in big.json["message"]
    heavy = Image.effect_noise((120, 80), 100).convert("RGB")
    out = io.BytesIO()
    heavy.save(out, format="PNG")
    assert len(out.getvalue()) > 10_000
    too_heavy = post(client, model="dev", image=b64(out.getvalue()))
    assert too_heavy.status_code == 422 and "at most 10000 bytes" in too_heavy.json["message"]


def test_multipart_upload_takes_the_same_fields(client):
    serve(client, "dev-fill")
    response = client.post("/api/generate", content_type="multipart/form-data", data={
        "prompt": "a hat", "model": "dev-fill", "steps": "3", "seed": "7",
        "image": (io.BytesIO(png()), "photo.png"), "mask": (io.BytesIO(png(colour="white", mode="L")), "mask.png")})
    assert response.status_code == 200, response.json
    db = client.application.extensions["mflux_sessions"].get()
    task = db.get(response.json["task_id"])
    assert (task.steps, task.seed, task.width, task.height) == (3, 7, 256, 192)
    assert set(db.inputs(task.id)) == {"image", "mask"}
    bad = client.post("/api/generate", content_type="multipart/form-data",
                      data={"prompt": "x", "model": "dev-fill", "image": (io.BytesIO(b"nope"), "x.png"),
                            "mask": (io.BytesIO(png(colour="white", mode="L")), "mask.png")})
    assert bad.status_code == 422 and bad.json["field"] == "image"
    # The cheap rules come before any decoding: without its mask the request is refused for that first.
    unmasked = client.post("/api/generate", content_type="multipart/form-data",
                           data={"prompt": "x", "model": "dev-fill", "image": (io.BytesIO(b"nope"), "x.png")})
    assert unmasked.status_code == 422 and unmasked.json["field"] == "mask"


def test_a_size_above_every_serving_workers_limit_is_refused(client):
    serve(client, "schnell", max_pixels=1024 * 1024)
    refused = post(client, width=1024, height=1040)
    assert refused.status_code == 422 and refused.json["field"] == "width"
    assert "1024×1040 = 1064960 pixels; the workers serving schnell run at most 1048576 pixels" in refused.json["message"]
    assert post(client, width=1024, height=1024).status_code == 200


def test_each_model_has_its_own_size_limit_on_a_worker_serving_several(client):
    serve(client, "schnell", "qwen-image", max_pixels=1536 * 1536, pixel_limits={"qwen-image": 800 * 800})
    refused = post(client, model="qwen-image", width=1024, height=1024)
    assert refused.status_code == 422 and refused.json["field"] == "width"
    assert "the workers serving qwen-image run at most 640000 pixels" in refused.json["message"]
    assert post(client, model="schnell", width=1024, height=1024).status_code == 200
    served = {m["name"]: m for m in client.get("/api/models").json["models"]}
    assert served["qwen-image"]["workers"][0]["max_pixels"] == 800 * 800
    assert served["schnell"]["workers"][0]["max_pixels"] == 1536 * 1536


def test_a_model_whose_weights_do_not_fit_any_serving_worker_is_refused_at_submit(client):
    serve(client, "schnell", "qwen-image", max_pixels=1536 * 1536, pixel_limits={"qwen-image": 0})
    refused = post(client, model="qwen-image", width=256, height=256)
    assert refused.status_code == 422 and refused.json["field"] == "width"
    assert "run at most 0 pixels" in refused.json["message"]


def test_models_lists_every_catalog_model_with_capabilities_and_who_serves_it(client):
    worker = serve(client, "schnell", "dev", "filipstrand/FLUX.1-Krea-dev-mflux-4bit")
    db = client.application.extensions["mflux_sessions"].get()
    db.record_load("dev", 12.0)
    db.record_load("dev", 14.0)
    models = {m["name"]: m for m in client.get("/api/models").json["models"]}
    assert {"schnell", "dev", "dev-kontext", "dev-fill", "flux2-klein-4b", "qwen-image-edit", "z-image-turbo",
            "fibo"} <= models.keys()
    schnell, dev = models["schnell"], models["dev"]
    assert schnell["loaded"] and schnell["workers"][0]["id"] == worker and schnell["default_steps"] == 4
    assert not dev["loaded"] and dev["served"] and dev["load_seconds"] == 13.0
    assert dev["capabilities"] == {"text_to_image": True, "image_to_image": True, "edit": False, "inpaint": False,
                                   "negative_prompt": True, "guidance": True, "loras": True,
                                   "control": False, "upscale": False, "variation": False,
                                   "try_on": False}
    assert not models["qwen-image"]["served"] and models["qwen-image"]["workers"] == []
    repo = models["filipstrand/FLUX.1-Krea-dev-mflux-4bit"]
    assert repo["family"] == "flux1" and repo["served"] and not repo["loaded"]
    assert models["krea-dev"]["aliases"] == ["dev-krea"]
    # A served repo is a model a request may name.
    assert post(client, model="filipstrand/FLUX.1-Krea-dev-mflux-4bit").status_code == 200
    assert post(client, model="qwen-image").status_code == 409, "live workers exist and none serves it"


def test_a_task_without_guidance_on_a_model_that_picks_its_own_stores_that(client):
    serve(client, "z-image-turbo")
    task = post(client, model="zimage-turbo").json
    db = client.application.extensions["mflux_sessions"].get()
    row = db.get(task["task_id"])
    assert row.model == "z-image-turbo" and row.guidance_auto == 1 and row.steps == 9
    assert row.status is Status.WAITING


def test_a_task_whose_model_is_not_loaded_is_forecast_with_the_switch(client):
    serve(client, "schnell", "dev")
    db = client.application.extensions["mflux_sessions"].get()
    db.record_load("dev", 30.0)
    loaded = post(client, model="schnell", width=256, height=256).json
    switching = post(client, model="dev", width=256, height=256, steps=4).json
    assert loaded["expected_time_seconds"] < 10
    assert 30 <= switching["expected_time_seconds"] < 30 + 10, "the measured 30 s load is charged once"


def test_a_switch_forecast_waits_out_the_loaded_models_queue_up_to_the_affinity_bound(client):
    db = client.application.extensions["mflux_sessions"].get()
    db.register_worker("synthetic", "schnell", None, models=("schnell", "dev"), affinity_wait=100.0)
    db.record_load("dev", 30.0)
    first = post(client, model="dev", width=256, height=256, steps=4).json
    alone = first["expected_time_seconds"]
    db.cancel_or_delete(first["task_id"])
    for _ in range(20):  # 20 × 28 s of schnell work at 1024², 50 steps (the prior): well past the 100 s bound
        post(client, model="schnell", steps=50)
    behind = post(client, model="dev", width=256, height=256, steps=4).json["expected_time_seconds"]
    # The worker starts dev's 30 s load early: it claims schnell tasks until dev has waited 70 s (3 tasks, the
    # third claimed at 56 s), runs them to their end (84 s), then loads dev.
    schnell_task = CostModel.fit([]).gpu_seconds(new_task(model="schnell", steps=50, width=1024, height=1024))
    assert behind - alone == pytest.approx(3 * schnell_task, abs=1.0), (alone, behind)


def test_fibo_edit_takes_plain_text_or_a_json_object_with_its_edit_instruction(client):
    import json

    serve(client, "fibo-edit")
    picture = b64(png())
    assert post(client, model="fibo-edit", prompt="make it blue", image=picture).status_code == 200
    structured = json.dumps({"edit_instruction": "make it blue", "style_medium": "photograph"})
    assert post(client, model="fibo-edit", prompt=structured, image=picture).status_code == 200
    refused = post(client, model="fibo-edit", prompt=json.dumps({"style_medium": "photograph"}), image=picture)
    assert refused.status_code == 422 and refused.json["field"] == "prompt"
    assert 'must have a non-empty "edit_instruction"' in refused.json["message"]


def test_structured_prompts_wrap_plain_text_and_pass_json_objects():
    import json

    from mflux_server.core.structured_prompts import for_family, problem

    assert json.loads(for_family("fibo", "a fox")) == {"prompt": "a fox"}
    assert json.loads(for_family("fibo", "42")) == {"prompt": "42"}  # JSON, but not an object: plain text
    assert json.loads(for_family("fibo-edit", "{cat} on a mat")) == {"edit_instruction": "{cat} on a mat"}
    given = '{"prompt": "a fox", "lighting": {"conditions": "dusk"}}'
    assert for_family("fibo", given) == given
    assert for_family("flux1", "a fox") == "a fox"
    assert problem("fibo-edit", '{"edit_instruction": "  "}') and problem("fibo-edit", "plain") is None
    assert problem("fibo", '{"style": "x"}') is None


@pytest.mark.parametrize("mode", ["CMYK", "LAB", "YCbCr", "I", "F", "I;16", "LA"])
def test_every_input_mode_becomes_one_the_engine_can_save(client, mode):
    from PIL import Image as PILImage

    serve(client, "dev-fill")
    out = io.BytesIO()
    picture = PILImage.new("RGB", (256, 192), "red").convert(mode) if mode != "LAB" else PILImage.new(mode, (256, 192))
    picture.save(out, format="TIFF" if mode != "LA" else "PNG")
    response = post(client, model="dev-fill", image=b64(out.getvalue()), mask=b64(out.getvalue()))
    assert response.status_code == 200, response.json
    db = client.application.extensions["mflux_sessions"].get()
    stored = db.inputs(response.json["task_id"])
    image = PILImage.open(io.BytesIO(stored["image"].data))
    mask = PILImage.open(io.BytesIO(stored["mask"].data))
    assert image.mode in ("RGB", "RGBA", "L", "LA", "1", "P") and mask.mode in ("L", "1"), (image.mode, mask.mode)
    for each in (image, mask):  # what the worker's input writer does with them
        each.save(io.BytesIO(), format="PNG")


def test_exif_orientation_turns_a_portrait_photo_upright(client):
    from PIL import Image as PILImage

    serve(client, "dev")
    out = io.BytesIO()
    exif = PILImage.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise: a portrait
    PILImage.new("RGB", (320, 240), "red").save(out, format="JPEG", exif=exif.tobytes())
    response = post(client, model="dev", image=b64(out.getvalue()))
    assert response.status_code == 200, response.json
    db = client.application.extensions["mflux_sessions"].get()
    task = db.get(response.json["task_id"])
    assert (task.width, task.height) == (240, 320), "the task takes the size the photo is shown at"
    stored = db.inputs(task.id)["image"]
    assert (stored.width, stored.height) == (240, 320)
    serve(client, "dev-fill")
    mask = PILImage.new("L", (240, 320), 255)
    drawn = io.BytesIO()
    mask.save(drawn, format="PNG")
    painted = post(client, model="dev-fill", image=b64(out.getvalue()), mask=b64(drawn.getvalue()))
    assert painted.status_code == 200, "a mask drawn at the displayed size fits"


def test_an_upright_photo_in_a_kept_mode_is_stored_as_sent_not_re_encoded(client):
    from PIL import Image as PILImage

    serve(client, "dev")
    for exif_orientation in (None, 1):  # no tag, and the tag that says "already upright"
        out = io.BytesIO()
        exif = PILImage.Exif()
        if exif_orientation:
            exif[0x0112] = exif_orientation
        PILImage.linear_gradient("L").convert("RGB").save(out, format="JPEG", exif=exif.tobytes())
        response = post(client, model="dev", image=b64(out.getvalue()))
        assert response.status_code == 200, response.json
        db = client.application.extensions["mflux_sessions"].get()
        stored = db.inputs(response.json["task_id"])["image"]
        assert stored.mime == "image/jpeg" and stored.data == out.getvalue(), "kept as sent (was re-encoded as PNG)"


def test_a_long_image_list_is_refused_before_any_image_is_read(client, monkeypatch):
    from mflux_server.api import image_inputs

    serve(client, "qwen-image-edit")
    read = []
    real = image_inputs.decode
    monkeypatch.setattr(image_inputs, "decode", lambda value: read.append(1) or real(value))
    response = post(client, model="qwen-image-edit", images=[b64(png())] * 400)
    assert response.status_code == 422 and response.json["field"] == "images"
    assert read == [], "no image was read"


def test_a_model_no_worker_serves_is_refused_before_its_images_are_decoded(client, monkeypatch):
    from mflux_server.api import image_inputs

    serve(client, "schnell")
    decoded = []
    monkeypatch.setattr(image_inputs, "verify", lambda *args, **kwargs: decoded.append(1))
    response = post(client, model="qwen-image-edit", images=[b64(png())] * 4)
    assert response.status_code == 409 and decoded == []


def test_an_openai_edit_mask_is_held_to_the_input_pixel_limit_before_it_is_decoded(client):
    from PIL import Image as PILImage

    serve(client, "dev-fill")
    huge = io.BytesIO()
    PILImage.new("RGBA", (5000, 4000)).save(huge, format="PNG")  # 20 MP of zeros: a few KB, 80 MB decoded
    response = client.post("/v1/images/edits", content_type="multipart/form-data", data={
        "prompt": "a hat", "image": (io.BytesIO(png()), "photo.png"), "mask": (io.BytesIO(huge.getvalue()), "m.png")})
    assert response.status_code == 400, response.json
    assert "mask" in str(response.json) and "5000×4000 = 20000000 pixels" in str(response.json)


def _jpeg(size=(1024, 768), progressive=False) -> bytes:
    out = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(out, format="JPEG", quality=90, progressive=progressive)
    return out.getvalue()


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_kept_as_sent_is_verified_from_an_eighth_scale_decode_and_a_truncated_one_is_still_refused(
        monkeypatch, progressive):
    from PIL import JpegImagePlugin

    from mflux_server.api.image_inputs import verify

    asked = []
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: asked.append(size) or real_draft(self, mode, size))
    data = _jpeg(progressive=progressive)
    kept = verify(data, 10 ** 8)
    assert asked == [(128, 96)] and kept.data == data and (kept.width, kept.height) == (1024, 768), "stored as sent"
    with pytest.raises(ma.ValidationError, match="is not a readable image"):
        verify(data[: len(data) // 2], 10 ** 8)
    asked.clear()
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 48), (0, 255, 0, 0)).save(cmyk, format="JPEG")
    converted = verify(cmyk.getvalue(), 10 ** 8)
    assert asked == [] and converted.mime == "image/png", "a JPEG that is converted is decoded in full"
    assert Image.open(io.BytesIO(converted.data)).mode == "RGB"
