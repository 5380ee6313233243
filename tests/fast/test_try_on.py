"""Try-on (FLUX.1 Fill CatVTON): a person, a mask and a garment, checked at submit, stored, drawn by the engine."""

from __future__ import annotations

import pytest
from PIL import Image, ImageStat

from mflux_server.core import catalog
from mflux_server.worker.engines.base import Job
from mflux_server.worker.engines.synthetic import SyntheticEngine
from tests.conftest import Recorder
from tests.fast.test_image_inputs import b64, png, post, serve


def mask_png(size=(256, 192)) -> bytes:
    import io

    mask = Image.new("L", size, 0)
    mask.paste(255, (64, 48, 192, 144))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


def test_a_try_on_stores_the_person_the_mask_and_the_garment(client):
    assert catalog.resolve("dev-fill-catvton").capabilities.try_on
    serve(client, "dev-fill-catvton")
    made = post(client, model="dev-fill-catvton", image=b64(png()), mask=b64(mask_png()),
                garment_image=b64(png((128, 160), "blue")))
    assert made.status_code == 200, made.json
    db = client.application.extensions["mflux_sessions"].get()
    stored = db.inputs(made.json["task_id"])
    assert list(stored) == ["image", "image2", "mask"] and stored["image2"].width == 128


@pytest.mark.parametrize("model,body,field,rule", [
    ("dev-fill-catvton", {"image": "PERSON", "mask": "MASK"}, "garment_image", "dresses a person: send garment_image"),
    ("dev-fill-catvton", {"image": "PERSON", "garment_image": "PERSON"}, "mask", "send the mask"),
    ("dev-fill", {"image": "PERSON", "mask": "MASK", "garment_image": "PERSON"}, "garment_image", "does no try-on"),
    ("dev-fill-catvton", {"image": "PERSON", "mask": "MASK", "garment_image": "bm90"}, "garment_image",
     "not a readable image"),
])
def test_every_bad_try_on_is_a_422_naming_its_field(client, model, body, field, rule):
    serve(client, "dev-fill", "dev-fill-catvton")
    images = {"PERSON": b64(png()), "MASK": b64(mask_png())}
    found = post(client, model=model, **{name: images.get(value, value) for name, value in body.items()})
    assert found.status_code == 422, found.json
    assert rule in found.json["errors"]["json"][field][0], found.json


def test_the_synthetic_engine_dresses_the_masked_area_with_the_garment_and_keeps_the_rest():
    import io

    engine = SyntheticEngine("dev-fill-catvton", step=(0.0, 0.0, 0.0), fixed=(0.0, 0.0))
    person, garment = Image.new("RGB", (256, 192), "red"), Image.new("RGB", (64, 64), "blue")
    mask = Image.open(io.BytesIO(mask_png()))
    made = engine.generate(Job("a blue shirt", 1, 256, 192, 1, None, image=person, mask=mask, references=(garment,),
                               try_on=True), Recorder())
    inside, outside = ImageStat.Stat(made.crop((72, 56, 184, 136))).mean, made.getpixel((8, 8))
    assert inside[2] > 200 and inside[0] < 50, "the garment's blue where the mask is white"
    assert outside == (255, 0, 0), "the person is untouched elsewhere"
