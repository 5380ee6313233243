"""ControlNet and depth: the catalog says how each model takes control_image, submit checks it, the synthetic
engine shows the map."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageChops, ImageStat

from mflux_server.core import catalog
from mflux_server.core.rows import ControlSettings
from mflux_server.worker.engines.base import Control, Job
from mflux_server.worker.engines.synthetic import SyntheticEngine, control_map
from tests.conftest import Recorder
from tests.fast.test_image_inputs import b64, post, serve


def square(size=(320, 240)) -> Image.Image:
    """A dark square on white: edges for Canny, a near object for depth."""
    picture = Image.new("RGB", size, "white")
    picture.paste((20, 20, 20), (80, 60, 240, 180))
    return picture


def encoded(picture: Image.Image) -> str:
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return b64(out.getvalue())


def errors(response) -> dict:
    assert response.status_code == 422, response.json
    return response.json["errors"]["json"]


def test_the_catalog_says_how_each_control_model_takes_its_image():
    canny, depth = catalog.resolve("dev-controlnet-canny"), catalog.resolve("dev-depth")
    assert canny.capabilities.control and not canny.capabilities.text_to_image and not canny.needs_image
    assert canny.control == catalog.ControlInfo(("canny",), maps=False, default_strength=0.4)
    assert depth.control == catalog.ControlInfo(("depth",), maps=True, default_strength=None)
    assert catalog.resolve("schnell-controlnet-canny").control.types == ("canny",)
    assert not catalog.resolve("schnell").capabilities.control and catalog.resolve("schnell").control is None


def test_models_lists_control_and_a_control_task_stores_its_image_and_settings(client):
    serve(client, "dev-controlnet-canny", "dev-depth")
    listed = {m["name"]: m for m in client.get("/api/models").json["models"]}
    assert listed["dev-controlnet-canny"]["control"] == {"types": ["canny"], "maps": False, "default_strength": 0.4}
    assert listed["schnell"]["control"] is None and listed["dev-depth"]["capabilities"]["control"]
    made = post(client, model="dev-controlnet-canny", control_image=encoded(square((328, 248))))
    assert made.status_code == 200, made.json
    assert (made.json["width"], made.json["height"]) == (320, 240), "the control image's size, to a multiple of 16"
    assert made.json["control"] == {"type": "canny", "strength": 0.4, "preprocess": True}
    db = client.application.extensions["mflux_sessions"].get()
    task = db.get(made.json["task_id"])
    assert task.control_settings == ControlSettings("canny", 0.4, True) and task.input_count == 1
    assert set(db.inputs(task.id)) == {"control"} and db.inputs(task.id)["control"].width == 328
    mapped = post(client, model="dev-depth", control_image=encoded(square()), control_preprocess=False, width=256,
                  height=256).json
    assert mapped["control"] == {"type": "depth", "strength": None, "preprocess": False}
    listed = client.get(f"/api/tasks/{mapped['task_id']}").json
    assert listed["control"]["preprocess"] is False and (listed["width"], listed["height"]) == (256, 256)


@pytest.mark.parametrize("model,body,field,rule", [
    ("schnell", {"control_image": "IMAGE"}, "control_image", "takes no control image"),
    ("dev-controlnet-canny", {}, "control_image", "send control_image"),
    ("dev-controlnet-canny", {"control_image": "IMAGE", "control_type": "depth"}, "control_type",
     "takes canny control, not depth"),
    ("dev-controlnet-canny", {"control_image": "IMAGE", "control_type": "sketch"}, "control_type", "Must be one of"),
    ("dev-controlnet-canny", {"control_image": "IMAGE", "control_preprocess": False}, "control_preprocess",
     "always turns control_image into its canny map"),
    ("dev-controlnet-canny", {"control_image": "IMAGE", "control_strength": 2.5}, "control_strength",
     "less than or equal to 2"),
    ("dev-depth", {"control_image": "IMAGE", "control_strength": 0.5}, "control_strength", "takes no control strength"),
    ("dev-depth", {"control_image": "IMAGE", "image": "IMAGE"}, "image", "guided by control_image"),
    ("schnell", {"control_type": "canny"}, "control_type", "needs control_image"),
    ("dev-depth", {"control_image": "bm90IGFuIGltYWdl"}, "control_image", "not a readable image"),
])
def test_every_bad_control_input_is_a_422_naming_its_field(client, model, body, field, rule):
    serve(client, "schnell", "dev-controlnet-canny", "dev-depth")
    body = {name: encoded(square()) if value == "IMAGE" else value for name, value in body.items()}
    found = errors(post(client, model=model, **body))
    assert field in found and rule in found[field][0], found


def test_a_control_task_comes_in_multipart_with_the_image_as_a_file_part(client):
    serve(client, "dev-depth")
    out = io.BytesIO()
    square().save(out, format="PNG")
    made = client.post("/api/generate", data={"prompt": "a room", "model": "dev-depth", "control_preprocess": "false",
                                              "control_image": (io.BytesIO(out.getvalue()), "map.png")},
                       content_type="multipart/form-data")
    assert made.status_code == 200, made.json
    assert made.json["control"] == {"type": "depth", "strength": None, "preprocess": False}


def test_the_synthetic_engine_paints_the_control_map_as_far_as_its_strength_says():
    engine = SyntheticEngine("dev-controlnet-canny", step=(0.0, 0.0, 0.0), fixed=(0.0, 0.0))
    plain = engine.generate(Job("a fox", 1, 320, 240, 1, None), Recorder())
    edges = control_map(Control(square(), "canny"), (320, 240))
    assert ImageStat.Stat(edges).mean[0] < 40, "Canny-like: thin edges on black"

    def distance(strength: float | None, kind: str = "canny", preprocess: bool = True) -> float:
        control = Control(square(), kind, strength, preprocess)
        made = engine.generate(Job("a fox", 1, 320, 240, 1, None, control=control), Recorder())
        wanted = control_map(control, (320, 240)).convert("RGB")
        return sum(ImageStat.Stat(ImageChops.difference(made, wanted)).mean)

    base = sum(ImageStat.Stat(ImageChops.difference(plain, edges.convert("RGB"))).mean)
    assert distance(1.0) < 1 < base, "at strength 1 the image is the map"
    assert distance(0.2) > distance(0.6) > distance(1.0), "more strength, closer to the map"
    # Depth from a photo is a blurred brightness map; a finished map is used as it is.
    assert distance(1.0, "depth") < 1 and distance(1.0, "depth", preprocess=False) < 1
    assert control_map(Control(square(), "depth", preprocess=False), (320, 240)).getpixel((160, 120)) == 20
