"""Image inputs of a request (start image, reference, mask): decoded and verified with Pillow at submit."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import Any

import marshmallow as ma
from marshmallow import fields
from PIL import Image
from werkzeug.datastructures import FileStorage

from mflux_server.api.context import settings
from mflux_server.core.rows import InputImage

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(?:;[\w=.-]+)*;base64,", re.IGNORECASE)
MIMES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
         "TIFF": "image/tiff"}


def decode(value: Any) -> InputImage:
    """Verify one image given as base64 text, a data: URL or an uploaded file; ValidationError says what is wrong."""
    if isinstance(value, FileStorage):
        data = value.read(settings().max_input_bytes + 1)
    elif isinstance(value, str):
        text = _DATA_URL.sub("", value.strip(), count=1)
        if len(text) * 3 // 4 > settings().max_input_bytes + 3:
            raise ma.ValidationError(f"must be at most {settings().max_input_bytes} bytes of image data")
        try:
            data = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
        except (binascii.Error, ValueError):
            raise ma.ValidationError("must be base64 image data or a data: URL (data:image/png;base64,...)") from None
    else:
        raise ma.ValidationError("must be base64 image data, a data: URL, or a file upload")
    if not data:
        raise ma.ValidationError("is empty")
    if len(data) > settings().max_input_bytes:
        raise ma.ValidationError(f"must be at most {settings().max_input_bytes} bytes of image data")
    return verify(data)


def verify(data: bytes) -> InputImage:
    """Open, size-check and fully decode the bytes, so a truncated or corrupt file never reaches a worker."""
    limit = settings().max_input_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt, (width, height) = probe.format, probe.size
                if width * height > limit:
                    raise ma.ValidationError(f"is {width}×{height} = {width * height} pixels; at most {limit} are accepted")
                probe.verify()
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # verify() does not decode pixel data: a truncated file fails only here
    except ma.ValidationError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ma.ValidationError(f"is not a readable image: {exc}") from None
    if fmt not in MIMES:
        raise ma.ValidationError(f"is a {fmt} image; send PNG, JPEG, WEBP, GIF, BMP or TIFF")
    return InputImage(role="", mime=MIMES[fmt], width=width, height=height, data=data)


class ImageField(fields.Field[InputImage]):
    """An image as base64, a data: URL, or (multipart/form-data) an uploaded file."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> InputImage:
        return decode(value)

    def _jsonschema_type_mapping(self) -> dict[str, Any]:
        return {"type": "string", "format": "byte"}
