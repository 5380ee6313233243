"""C2PA Content Credentials: every image signed, verified by c2pa's own Reader, and a changed pixel breaks it."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

c2pa = pytest.importorskip("c2pa")

from mflux_server.worker.content_credentials import (  # noqa: E402
    LABEL,
    ContentCredentials,
    local_certificate,
    signer_files,
)
from mflux_server.worker.encoding import encode  # noqa: E402
from mflux_server.worker.generation_data import DIGITAL_SOURCE_TYPE, GenerationData  # noqa: E402

MIMES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
SOFTWARE = "mflux-server synthetic engine, model schnell (synthetic test image, not model output)"


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> ContentCredentials:
    return ContentCredentials(signer_files(None, None, tmp_path_factory.mktemp("c2pa")))


def signed(credentials: ContentCredentials, fmt: str, prompt: str | None = "a lighthouse") -> bytes:
    data = GenerationData(prompt, None, "schnell", 8, 4, None, 96, 64, [], [], SOFTWARE)
    picture = Image.effect_noise((96, 64), 40).convert("RGB")
    encoded, mime = encode(picture, fmt, 95, data)
    return credentials.sign(encoded, mime, data)


def read(data: bytes, fmt: str) -> tuple[str, dict, list[str]]:
    """c2pa's Reader: the validation state, the active manifest, and the failure codes."""
    reader = c2pa.Reader(MIMES[fmt], io.BytesIO(data))
    store = json.loads(reader.json())
    active = store["manifests"][store["active_manifest"]]
    failures = [item["code"] for item in reader.get_validation_results()["activeManifest"]["failure"]]
    return reader.get_validation_state(), active, failures


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_each_format_carries_a_valid_manifest_saying_a_trained_model_created_it(credentials, fmt):
    data = signed(credentials, fmt)
    state, active, failures = read(data, fmt)
    # Valid: bound to these bytes, signature intact; the local signer is on no reader's trust list.
    assert state == "Valid" and failures == ["signingCredential.untrusted"]
    actions = next(a["data"]["actions"] for a in active["assertions"] if a["label"].startswith("c2pa.actions"))
    assert actions[0]["action"] == "c2pa.created" and actions[0]["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert actions[0]["softwareAgent"]["name"] == SOFTWARE
    ours = next(a["data"] for a in active["assertions"] if a["label"] == LABEL)
    assert ours["model"] == "schnell" and ours["seed"] == 8 and ours["prompt"] == "a lighthouse"
    assert Image.open(io.BytesIO(data)).size == (96, 64), "still an image every reader opens"


def changed_pixel(data: bytes, fmt: str) -> bytes:
    """The same file with its image data altered where a reader decodes pixels; the manifest left as it is."""
    if fmt == "PNG":  # rewrite IDAT with one pixel changed (and a correct CRC), so the PNG stays valid
        out, at = bytearray(data[:8]), 8
        while at < len(data):
            length, kind = struct.unpack(">I4s", data[at:at + 8])
            body = data[at + 8:at + 8 + length]
            if kind == b"IDAT":
                raw = bytearray(zlib.decompress(body))
                raw[1] ^= 0xFF  # the first pixel's red byte, after the row's filter byte
                body = zlib.compress(bytes(raw))
            out += struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body))
            at += 12 + length
        return bytes(out)
    flipped = bytearray(data)
    if fmt == "WEBP":  # in the middle of the VP8 chunk (a C2PA chunk may follow it)
        at = 12
        while data[at:at + 4] not in (b"VP8 ", b"VP8L"):
            at += 8 + struct.unpack("<I", data[at + 4:at + 8])[0] + (struct.unpack("<I", data[at + 4:at + 8])[0] & 1)
        flipped[at + 8 + struct.unpack("<I", data[at + 4:at + 8])[0] // 2] ^= 0x10
    else:
        flipped[len(data) - 200] ^= 0x10  # inside the JPEG scan, where the manifest (APP11, at the front) is not
    return bytes(flipped)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_changed_pixel_breaks_the_binding(credentials, fmt):
    data = signed(credentials, fmt)
    tampered = changed_pixel(data, fmt)
    before = Image.open(io.BytesIO(data)).convert("RGB")
    try:
        after = Image.open(io.BytesIO(tampered)).convert("RGB")
        assert after.tobytes() != before.tobytes(), "the pixels changed"
    except OSError:
        pass  # a decoder may refuse the altered data outright: changed too
    state, _, failures = read(tampered, fmt)
    assert state == "Invalid" and any("dataHash.mismatch" in code or "hash" in code.lower() for code in failures), \
        failures


def test_a_private_task_keeps_its_prompt_out_of_the_manifest(credentials):
    data = signed(credentials, "PNG", prompt=None)
    _, active, _ = read(data, "PNG")
    assert next(a["data"] for a in active["assertions"] if a["label"] == LABEL)["prompt"] is None
    assert b"a lighthouse" not in data


def test_the_local_certificate_is_made_once_and_kept_and_configured_ones_are_taken_as_given(tmp_path: Path):
    first = signer_files(None, None, tmp_path / "local")
    assert first.self_signed and (tmp_path / "local" / "signer-key.pem").stat().st_mode & 0o077 == 0
    assert signer_files(None, None, tmp_path / "local") == first, "kept beside the queue, not made again"
    chain, key = local_certificate()
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    given = signer_files(str(tmp_path / "chain.pem"), str(tmp_path / "key.pem"), tmp_path / "unused")
    assert given.chain == chain and not given.self_signed and not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="give both --c2pa-cert and --c2pa-key"):
        signer_files(str(tmp_path / "chain.pem"), None, tmp_path / "unused")
    assert ContentCredentials.from_settings(False, None, None, None, str(tmp_path / "q.db")) is None


def test_the_api_reads_back_what_a_stored_image_carries(client, credentials):
    from mflux_server.core.rows import StoredImage

    made = client.post("/api/generate", json={"prompt": "a lighthouse", "format": "JPEG"}).json
    assert client.get(f"/api/tasks/{made['task_id']}/provenance").status_code == 409, "no image yet"
    db = client.application.extensions["mflux_sessions"].get()
    task = db.claim_next("w", "schnell", "synthetic")
    data = signed(credentials, "JPEG")
    assert db.complete(task.id, "w", [StoredImage(0, task.seed, "image/jpeg", data, 1.0, 2.0)])
    shown = client.get(f"/api/tasks/{task.id}/provenance").json
    assert shown["digital_source_type"] == DIGITAL_SOURCE_TYPE and shown["generation_data"]["model"] == "schnell"
    assert shown["content_credentials"]["state"] == "Valid"
    assert shown["content_credentials"]["actions"][0]["action"] == "c2pa.created"
    assert client.get(f"/api/tasks/{task.id}/provenance", query_string={"index": 3}).json["code"] == "image_gone"


def test_the_manifest_adds_kilobytes_not_a_copy_of_the_image(credentials):
    data = GenerationData("p", None, "schnell", 1, 4, None, 256, 256, [], [], SOFTWARE)
    encoded, mime = encode(Image.effect_noise((256, 256), 40).convert("RGB"), "PNG", 90, data)
    assert len(credentials.sign(encoded, mime, data)) - len(encoded) < 12_000, "no claim thumbnail"


def test_a_tasks_view_says_which_of_its_images_carry_credentials(client, credentials):
    from mflux_server.core.rows import StoredImage

    made = client.post("/api/generate", json={"prompt": "a lighthouse", "format": "JPEG", "count": 2}).json
    db = client.application.extensions["mflux_sessions"].get()
    task = db.claim_next("w", "schnell", "synthetic")
    data = signed(credentials, "JPEG")
    assert db.complete(task.id, "w", [StoredImage(0, task.seed, "image/jpeg", data, 1.0, 2.0, 1),
                                      StoredImage(1, task.seed + 1, "image/jpeg", data, 1.0, 2.0, 0)])
    assert client.get(f"/api/tasks/{made['task_id']}").json["metadata"]["content_credentials"] == [True, False]
