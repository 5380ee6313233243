"""LoRAs per request: the library under --lora-dir, the families a file fits, the rules at submit, the synthetic tint."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from mflux_server.api.app import create_app
from mflux_server.core import catalog, lora_library
from mflux_server.core.lora_library import Library, families_of, header_keys
from mflux_server.core.rows import lora_set_of, lora_set_text
from mflux_server.core.settings import Settings
from mflux_server.worker.engines.base import Job
from mflux_server.worker.engines.synthetic import SyntheticEngine, lora_colour
from tests.conftest import Recorder


def write_lora(path: Path, keys: list[str]) -> Path:
    """A real safetensors file with these tensor names (tiny zero tensors): what a LoRA file looks like to a reader."""
    header = {key: {"dtype": "F32", "shape": [1, 1], "data_offsets": [4 * i, 4 * i + 4]} for i, key in enumerate(keys)}
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * (4 * len(keys)))
    return path


def keys_only_in(family: str, other: str, count: int = 24) -> list[str]:
    """Tensor names mflux maps onto one family and not onto another, with block numbers filled in."""
    own, others = lora_library.patterns()[family], lora_library.patterns()[other]
    return [pattern.replace("{block}", "3") for pattern in sorted(own - others)[:count]]


@pytest.fixture
def library(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    write_lora(folder / "ink.safetensors", keys_only_in("flux1", "qwen-image"))
    write_lora(folder / "styles" / "paper.safetensors", keys_only_in("qwen-image", "flux1"))
    (folder / "notes.txt").write_text("not a LoRA")
    (folder / "broken.safetensors").write_bytes(b"\xff" * 12)
    outside = write_lora(tmp_path / "secret.safetensors", keys_only_in("flux1", "qwen-image"))
    os.symlink(outside, folder / "escape.safetensors")
    return folder


@pytest.fixture
def lora_client(db_path: str, library: Path):
    return create_app(Settings(db=db_path, stale_after=2.0, lora_dir=str(library))).test_client()


def test_a_files_families_are_read_from_its_tensor_names_as_mflux_maps_them(library):
    assert families_of(header_keys(library / "ink.safetensors")) == ("flux1", "flux1-controlnet", "flux1-depth",
                                                                    "flux1-fill", "flux1-kontext", "flux1-redux",
                                                                    "flux1-tryon", "flux1-upscaler")
    assert families_of(header_keys(library / "styles" / "paper.safetensors")) == ("qwen-image", "qwen-image-edit")
    # FLUX.2 klein's mapping takes some of FLUX.1's spellings too: the family that takes the most is the file's.
    assert "flux2-klein" not in families_of(header_keys(library / "ink.safetensors"))
    assert families_of(["some.other.model.weight"]) == ()
    # ComfyUI's adapters drop the ".weight" of each matrix; mflux takes both spellings, and so does the fit.
    bare = [key.removesuffix(".weight") for key in header_keys(library / "ink.safetensors")]
    assert "flux1" in families_of(bare)


def test_the_library_lists_files_under_the_folder_by_name_and_nothing_outside_it(library):
    files = Library(library).files()
    assert sorted(files) == ["broken", "ink", "styles/paper"], "no symlink out of the folder, no other suffix"
    assert files["broken"].families == (), "an unreadable file is listed and fits nothing"
    assert files["ink"].bytes == (library / "ink.safetensors").stat().st_size
    assert Library(None).files() == {} and Library(library).get("../secret") is None
    # The worker's lookup reads no header and agrees with the listing, escapes included.
    assert Library(library).path_of("styles/paper") == files["styles/paper"].path
    for outside in ("../secret", "escape", "/etc/passwd", "notes"):
        assert Library(library).path_of(outside) is None, outside


def test_the_lora_set_column_keeps_names_scales_and_order():
    chosen = (("styles/ink", 0.8), ("paper", -1.0))
    assert lora_set_of(lora_set_text(chosen)) == chosen
    assert lora_set_text(()) == "" and lora_set_of("") == ()


def test_get_api_loras_shows_names_sizes_and_families_never_paths(lora_client, library):
    answer = lora_client.get("/api/loras")
    assert answer.status_code == 200 and answer.json["library"] is True
    listed = {entry["name"]: entry for entry in answer.json["loras"]}
    assert listed["ink"]["families"] == ["flux1", "flux1-controlnet", "flux1-depth", "flux1-fill", "flux1-kontext",
                                         "flux1-redux", "flux1-tryon", "flux1-upscaler"]
    assert listed["styles/paper"]["bytes"] == (library / "styles" / "paper.safetensors").stat().st_size
    assert str(library) not in answer.get_data(as_text=True)


def test_without_a_library_the_list_is_empty_and_says_so(client):
    assert client.get("/api/loras").json == {"loras": [], "library": False}
    refused = client.post("/api/generate", json={"prompt": "x", "loras": [{"name": "ink"}]})
    assert refused.status_code == 422 and "without --lora-dir" in refused.json["errors"]["json"]["loras"][0]


def test_a_request_with_loras_queues_them_with_their_scales(lora_client):
    answer = lora_client.post("/api/generate", json={"prompt": "a fox", "model": "schnell",
                                                     "loras": [{"name": "ink", "scale": 0.7}]})
    assert answer.status_code == 200, answer.json
    status = lora_client.get(f"/api/status?task_id={answer.json['task_id']}").json
    assert status["loras"] == [{"name": "ink", "scale": 0.7}]
    plain = lora_client.post("/api/generate", json={"prompt": "a fox"}).json
    assert lora_client.get(f"/api/status?task_id={plain['task_id']}").json["loras"] == []


@pytest.mark.parametrize("loras, field, rule", [
    ([{"name": "nothing"}], "loras.0.name", "no LoRA named 'nothing' in the library"),
    ([{"name": "styles/paper"}], "loras.0.name", "fits qwen-image, qwen-image-edit, not schnell"),
    ([{"name": "broken"}], "loras.0.name", "fits no model family mflux knows"),
    ([{"name": "ink"}, {"name": "ink", "scale": 2}], "loras.1.name", "named twice"),
    ([{"name": "ink", "scale": 9}], "loras.0.scale", "less than or equal to 4.0"),
    ([{"name": "ink", "path": "/etc/passwd"}], "loras.0.path", "unknown field"),
    ([{"scale": 1}], "loras.0.name", "Missing data for required field"),
    (["ink"], "loras.0", "an object with name and scale"),
    ([{"name": "ink"}] * 5, "loras", "Longer than maximum length 4"),
    ([{"name": "../secret"}], "loras.0.name", "no LoRA named"),
])
def test_a_bad_lora_entry_is_a_422_naming_it(lora_client, loras, field, rule):
    refused = lora_client.post("/api/generate", json={"prompt": "x", "model": "schnell", "loras": loras})
    assert refused.status_code == 422, refused.json
    assert refused.json["field"] == field and rule in refused.json["message"], refused.json


def test_a_model_that_takes_no_loras_refuses_them(lora_client):
    without = next(info for info in catalog.models() if not info.capabilities.loras and info.capabilities.text_to_image)
    refused = lora_client.post("/api/generate", json={"prompt": "x", "model": without.name, "loras": [{"name": "ink"}]})
    assert refused.status_code == 422 and "takes no LoRAs" in refused.json["errors"]["json"]["loras"][0]


def test_multipart_takes_loras_as_json_text(lora_client):
    sent = lora_client.post("/api/generate", content_type="multipart/form-data",
                            data={"prompt": "a fox", "loras": json.dumps([{"name": "ink", "scale": 0.5}])})
    assert sent.status_code == 200, sent.json
    assert lora_client.get(f"/api/status?task_id={sent.json['task_id']}").json["loras"] == [{"name": "ink", "scale": 0.5}]
    bad = lora_client.post("/api/generate", content_type="multipart/form-data", data={"prompt": "x", "loras": "[{"})
    assert bad.status_code == 422 and "must be JSON text" in bad.json["errors"]["form"]["loras"][0]


def _mean(image: Image.Image) -> list[float]:
    return ImageStat.Stat(image).mean


def test_the_synthetic_engine_tints_its_picture_by_each_loras_scale():
    engine = SyntheticEngine("schnell", step=(0.0, 0.0, 0.0), fixed=(0.0, 0.0))
    plain = engine.generate(Job("a fox", 7, 256, 256, 2, None), Recorder())
    ink = "/lib/ink.safetensors"
    light = engine.generate(Job("a fox", 7, 256, 256, 2, None, loras=((ink, 0.5),)), Recorder())
    strong = engine.generate(Job("a fox", 7, 256, 256, 2, None, loras=((ink, 2.0),)), Recorder())
    target = lora_colour(ink)

    def distance(image: Image.Image) -> float:
        return sum(abs(mean - channel) for mean, channel in zip(_mean(image), target, strict=True))

    assert distance(strong) < distance(light) < distance(plain), "a larger scale pulls further towards its colour"
    again = engine.generate(Job("a fox", 7, 256, 256, 2, None), Recorder())
    assert io_bytes(again) == io_bytes(plain), "no LoRA: the same picture as before"


def io_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_the_cli_reads_a_lora_as_name_or_name_colon_scale():
    import argparse

    from mflux_server.client.cli import parse_lora

    assert parse_lora("styles/ink") == {"name": "styles/ink", "scale": 1.0}
    assert parse_lora("styles/ink:-0.8") == {"name": "styles/ink", "scale": -0.8}
    with pytest.raises(argparse.ArgumentTypeError, match="NAME:SCALE"):
        parse_lora("ink:lots")


def test_hugging_face_references_are_names_only_with_lora_hub(db_path: str, library: Path, tmp_path: Path, monkeypatch):
    from mflux_server.worker.claim_loop import ClaimLoop
    from tests.fast.test_image_inputs import serve

    body = {"prompt": "p", "model": "dev", "loras": [{"name": "org/ink-lora:styles/ink.safetensors", "scale": 0.7}]}
    closed = create_app(Settings(db=db_path, stale_after=2.0, lora_dir=str(library))).test_client()
    serve(closed, "dev")
    refused = closed.post("/api/generate", json=body)
    assert refused.status_code == 422
    assert "(Hugging Face references need --lora-hub)" in refused.json["errors"]["json"]["loras.0.name"][0]
    hub = create_app(Settings(db=db_path, stale_after=2.0, lora_hub=True)).test_client()
    made = hub.post("/api/generate", json=body)
    assert made.status_code == 200, made.json
    assert made.json["loras"] == [{"name": "org/ink-lora:styles/ink.safetensors", "scale": 0.7}]
    for name in ("../secret", "/etc/passwd", "org/repo:../x.safetensors", "org/repo:file.bin"):
        answer = hub.post("/api/generate", json={**body, "loras": [{"name": name}]})
        assert answer.status_code == 422, name
    # The worker hands mflux the library's file, or the reference itself; never a local path a client named.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    loop = ClaimLoop(Settings(db=db_path, lora_dir=str(library), lora_hub=True), SyntheticEngine("dev"), "w",
                     None, None, None, None)  # type: ignore[arg-type]
    assert loop.lora_source("ink") == str(library / "ink.safetensors")
    assert loop.lora_source("org/ink-lora:styles/ink.safetensors") == "org/ink-lora:styles/ink.safetensors"
    assert loop.lora_source("org/local") is None, "exists here, relative to the working directory"
    assert loop.lora_source("../secret") is None
    loop.settings = Settings(db=db_path, lora_dir=str(library))
    assert loop.lora_source("org/ink-lora") is None, "without --lora-hub"
