"""Generation data and the AI-generated marking in every image, read back with Pillow for each format."""

from __future__ import annotations

import io
import re
from dataclasses import replace

import pytest
from PIL import Image

from mflux_server.core.rows import ControlSettings, InputImage, lora_set_text
from mflux_server.worker.encoding import encode
from mflux_server.worker.generation_data import DIGITAL_SOURCE_TYPE, EXIF_IFD, USER_COMMENT_TAG, GenerationData
from tests.conftest import queue_task

PROMPT = "a lighthouse in fog, 灯台"
# AUTOMATIC1111's own pattern for the settings line (modules/infotext_utils.py, re_param_code).
A1111_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SOFTWARE = "mflux-server synthetic engine, model schnell (synthetic test image, not model output)"


def carried(data: bytes) -> dict[str, str]:
    """What an independent reader (Pillow) finds: the parameters text, the XMP packet and the Software tag."""
    image = Image.open(io.BytesIO(data))
    found = {"xmp": image.info.get("xmp", b"")}
    if image.format == "PNG":
        found |= {"parameters": image.text["parameters"], "software": image.text["Software"],
                  "xmp": image.text["XML:com.adobe.xmp"]}
    else:
        import piexif
        import piexif.helper

        exif = image.getexif()
        comment = exif.get_ifd(EXIF_IFD)[USER_COMMENT_TAG]
        assert comment[:8] == b"UNICODE\0"
        found |= {"parameters": comment[8:].decode("utf-16-be"), "software": exif[0x0131]}
        # As AUTOMATIC1111 reads it (modules/images.py, read_info_from_image): piexif, then its UserComment helper.
        assert piexif.helper.UserComment.load(piexif.load(image.info["exif"])["Exif"][USER_COMMENT_TAG]) == \
            found["parameters"]
    if isinstance(found["xmp"], bytes):
        found["xmp"] = found["xmp"].decode()
    return found


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_each_format_carries_the_generation_data_and_the_marking(db, fmt):
    task = queue_task(db, prompt=PROMPT, negative_prompt="blurry", steps=4, seed=7, width=320, height=192,
                      guidance=3.5, loras=lora_set_text((("styles/ink", 0.8),)))
    data, _ = encode(Image.new("RGB", (320, 192), "teal"), fmt, 90, GenerationData.of(task, 1, SOFTWARE))
    found = carried(data)
    lines = found["parameters"].split("\n")
    assert lines[0] == PROMPT and lines[1] == "Negative prompt: blurry"
    settings = dict(A1111_PARAMETER.findall(lines[2]))  # as AUTOMATIC1111 reads the line back
    assert settings["Steps"] == "4" and settings["Seed"] == "8" and settings["Size"] == "320x192"
    assert settings["CFG scale"] == "3.5" and settings["Model"] == "schnell" and settings["Lora"] == '"styles/ink:0.8"'
    assert found["software"] == SOFTWARE
    assert f'Iptc4xmpExt:DigitalSourceType="{DIGITAL_SOURCE_TYPE}"' in found["xmp"] and PROMPT in found["xmp"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_private_task_leaves_the_prompt_out_but_never_the_marking(db, fmt):
    private = queue_task(db, prompt=PROMPT, negative_prompt="blurry", private=True)
    shared = queue_task(db, prompt=PROMPT, negative_prompt="blurry")
    assert PROMPT in GenerationData.of(shared, 0, SOFTWARE).parameters()
    for data in (GenerationData.of(private, 0, SOFTWARE),):
        encoded, _ = encode(Image.new("RGB", (64, 64)), fmt, 90, data)
        for spelling in (PROMPT.encode(), PROMPT.encode("utf-16-be"), b"blurry", "blurry".encode("utf-16-be")):
            assert spelling not in encoded
        found = carried(encoded)
        assert found["parameters"].startswith("(prompt withheld)\nSteps: ")
        assert DIGITAL_SOURCE_TYPE in found["xmp"]


def test_the_input_kinds_are_named_never_the_images(db):
    picture = InputImage("image", "image/png", 8, 8, b"x")
    guided = queue_task(db, model="dev-controlnet-canny", control=ControlSettings("canny", 0.4, True).text(),
                        inputs=(replace(picture, role="control"),))
    assert GenerationData.of(guided, 0, SOFTWARE).inputs == ["control image (canny)"]
    varied = queue_task(db, model="dev-redux", inputs=(picture, replace(picture, role="image2")))
    assert GenerationData.of(varied, 0, SOFTWARE).inputs == ["image prompt 1", "image prompt 2"]
    assert 'Inputs: "image prompt 1, image prompt 2"' in GenerationData.of(varied, 0, SOFTWARE).parameters()
    assert GenerationData.of(queue_task(db), 0, SOFTWARE).inputs == []


def test_a_request_or_the_server_makes_a_task_private_and_its_view_says_what_the_images_carry(db_path, client):
    from mflux_server.api.app import create_app
    from mflux_server.core.settings import Settings

    shared = client.post("/api/generate", json={"prompt": "p"}).json
    assert shared["metadata"] == {"generation_data": True, "prompt": True,
                                  "digital_source_type": "trainedAlgorithmicMedia", "content_credentials": []}
    private = client.post("/api/generate", json={"prompt": "p", "private": True}).json
    assert private["metadata"]["prompt"] is False
    closed = create_app(Settings(db=db_path, stale_after=2.0, metadata_prompts=False)).test_client()
    assert closed.post("/api/generate", json={"prompt": "p"}).json["metadata"]["prompt"] is False
    assert client.get(f"/api/tasks/{private['task_id']}").json["metadata"]["prompt"] is False
