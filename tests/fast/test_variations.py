"""Variations (FLUX.1 Redux): image prompts with a strength each, checked at submit, stored, drawn by the engine."""

from __future__ import annotations

import pytest
from PIL import Image, ImageChops, ImageStat

from mflux_server.core import catalog
from mflux_server.worker.engines.base import Job
from mflux_server.worker.engines.synthetic import SyntheticEngine
from tests.conftest import Recorder
from tests.fast.test_image_inputs import b64, png, post, serve


def errors(response) -> dict:
    assert response.status_code == 422, response.json
    return response.json["errors"]["json"]


def test_redux_takes_up_to_four_image_prompts_each_with_its_strength(client):
    info = catalog.resolve("dev-redux")
    assert info.capabilities.variation and info.max_reference_images == 4 and info.needs_image
    serve(client, "dev-redux")
    made = post(client, model="dev-redux", images=[b64(png((256, 192))), b64(png((128, 128), "blue"))],
                image_strengths=[0.8, 0.3])
    assert made.status_code == 200, made.json
    assert made.json["image_strengths"] == [0.8, 0.3] and (made.json["width"], made.json["height"]) == (256, 192)
    db = client.application.extensions["mflux_sessions"].get()
    task = db.get(made.json["task_id"])
    assert task.strengths == (0.8, 0.3) and list(db.inputs(task.id)) == ["image", "image2"]
    plain = post(client, model="dev-redux", image=b64(png())).json
    assert plain["image_strengths"] == [], "the model's default"


@pytest.mark.parametrize("model,body,field,rule", [
    ("dev-redux", {}, "image", "draws variations of image or images"),
    ("dev-redux", {"image": "PNG", "image_strengths": [0.5, 0.5]}, "image_strengths", "1 image(s), 2 strength(s)"),
    ("dev-redux", {"image": "PNG", "image_strengths": [1.5]}, "image_strengths", "less than or equal to 1"),
    ("dev-redux", {"images": ["PNG"] * 5}, "images", "a variation takes at most 4"),
    ("dev-redux", {"image": "PNG", "image_strength": 0.5}, "image_strength", "does no image-to-image"),
    ("schnell", {"image_strengths": [0.5]}, "image_strengths", "draws no variations"),
])
def test_every_bad_variation_is_a_422_naming_its_field(client, model, body, field, rule):
    serve(client, "schnell", "dev-redux")
    body = {name: ([b64(png()) for _ in value] if isinstance(value, list) and value and value[0] == "PNG"
                   else b64(png()) if value == "PNG" else value) for name, value in body.items()}
    found = errors(post(client, model=model, **body))
    assert field in found and rule in str(found[field]), found


def test_the_synthetic_engine_pulls_a_variation_towards_each_prompt_by_its_strength():
    engine = SyntheticEngine("dev-redux", step=(0.0, 0.0, 0.0), fixed=(0.0, 0.0))
    red, blue = Image.new("RGB", (256, 256), "red"), Image.new("RGB", (256, 256), "blue")

    def distance(image: Image.Image, colour: Image.Image) -> float:
        return sum(ImageStat.Stat(ImageChops.difference(image, colour)).mean)

    def draw(strengths: tuple[float, ...]) -> Image.Image:
        job = Job("a fox", 1, 256, 256, 1, None, image=red, references=(blue,), variation=True, strengths=strengths)
        return engine.generate(job, Recorder())

    more_red, more_blue = draw((0.9, 0.1)), draw((0.1, 0.9))
    assert distance(more_red, red) < distance(more_blue, red) and distance(more_blue, blue) < distance(more_red, blue)


def test_multipart_sends_the_images_as_parts_and_the_strengths_as_json_text(client):
    import io

    serve(client, "dev-redux")
    def parts(strengths: str) -> dict:
        return {"prompt": "in autumn", "model": "dev-redux", "image_strengths": strengths,
                "images": [(io.BytesIO(png()), "a.png"), (io.BytesIO(png(colour="blue")), "b.png")]}

    made = client.post("/api/generate", data=parts("[0.8, 0.3]"), content_type="multipart/form-data")
    assert made.status_code == 200, made.json
    assert made.json["image_strengths"] == [0.8, 0.3]
    bad = client.post("/api/generate", data=parts("0.8,0.3"), content_type="multipart/form-data")
    assert bad.status_code == 422 and "must be JSON text: [0.8, 0.3]" in bad.json["errors"]["form"]["image_strengths"][0]
