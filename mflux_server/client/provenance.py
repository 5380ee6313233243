"""Reading back what an image from this server says about what made it: its generation data and credentials."""

from __future__ import annotations

import io
import json
import re
from typing import Any

DIGITAL_SOURCE_TYPE = re.compile(r'DigitalSourceType="([^"]+)"')
GENERATION = re.compile(r"<mfluxserver:generation>(.*?)</mfluxserver:generation>", re.S)
MIMES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def read(data: bytes) -> dict[str, Any]:
    """An image's generation data (from its XMP), its digital source type, and its Content Credentials as c2pa's
    Reader verifies them (None where the image has none, or c2pa-python is not installed)."""
    from html import unescape

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format or ""
        xmp = image.text.get("XML:com.adobe.xmp", "") if fmt == "PNG" else image.info.get("xmp", b"")  # type: ignore[attr-defined]
    text = xmp.decode() if isinstance(xmp, bytes) else xmp
    source, generation = DIGITAL_SOURCE_TYPE.search(text), GENERATION.search(text)
    return {"format": fmt,
            "digital_source_type": source.group(1) if source else None,
            "generation_data": json.loads(unescape(generation.group(1))) if generation else None,
            "content_credentials": credentials(data, MIMES.get(fmt))}


def credentials(data: bytes, mime: str | None) -> dict[str, Any] | None:
    """The active C2PA manifest's claim generator and actions, with the validation state and its failures."""
    try:
        import c2pa
    except ImportError:
        return None
    if mime is None:
        return None
    try:
        reader = c2pa.Reader(mime, io.BytesIO(data))
    except Exception:  # c2pa raises its own error for an image without a manifest
        return None
    store = json.loads(reader.json())
    active = store["manifests"][store["active_manifest"]]
    actions = [action for assertion in active.get("assertions", []) if assertion["label"].startswith("c2pa.actions")
               for action in assertion["data"]["actions"]]
    results = reader.get_validation_results() or {}
    return {"state": reader.get_validation_state(),
            "failures": [item["code"] for item in results.get("activeManifest", {}).get("failure", [])],
            "claim_generator": active.get("claim_generator_info"),
            "actions": actions}
