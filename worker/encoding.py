"""Encoding a generated image to the requested format, labelled with what made it (generation_data.py)."""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin

from mflux_server.worker import mflux_metadata
from mflux_server.worker.generation_data import GenerationData

MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# zlib level 1 is several times faster than Pillow's default 6 for ~10% more bytes; the worker encodes
# on a background thread, and this keeps it ahead of the GPU at large sizes.
PNG_COMPRESS_LEVEL = 1


def encode(image: Image.Image, fmt: str, quality: int, data: GenerationData) -> tuple[bytes, str]:
    """Return the encoded bytes, carrying the generation data and the AI-generated marking, and their MIME type."""
    out = io.BytesIO()
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", data.parameters())  # AUTOMATIC1111's chunk (iTXt when not Latin-1)
        info.add_text("Software", data.software)
        info.add_text("Seed", str(data.seed))
        info.add_itxt("XML:com.adobe.xmp", data.xmp().decode())
        if data.mflux is not None:  # as mflux writes its own PNGs: an IPTC block, and EXIF
            info.add_text("IPTC", mflux_metadata.iptc(data.mflux))
            rgb.save(out, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL, exif=data.exif())
        else:
            rgb.save(out, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    elif fmt == "JPEG":
        rgb.save(out, format="JPEG", quality=quality, comment=data.software.encode(), exif=data.exif(), xmp=data.xmp())
    elif fmt == "WEBP":
        rgb.save(out, format="WEBP", quality=quality, method=0, exif=data.exif(), xmp=data.xmp())
    else:
        raise ValueError(f"unsupported format {fmt!r}")
    return out.getvalue(), MIME[fmt]
