"""Image inputs of a request (start image, reference, mask): read cheaply, then verified and normalised at submit.

The schema only reads bytes (base64 and a byte limit) and bounds how many images a list holds. Pillow's work
(full decode, EXIF orientation, mode conversion) runs after the cheap checks of the request, on a small pool of
OS threads of its own (`DECODE_THREADS`), so a request full of large images neither stalls the server's event
loop nor takes every core.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import replace
from typing import Any

import marshmallow as ma
from marshmallow import fields
from PIL import Image, ImageOps
from werkzeug.datastructures import FileStorage

from mflux_server.api.context import settings
from mflux_server.api.upload_lane import offloaded
from mflux_server.core.rows import InputImage

ORIENTATION = 0x0112  # the EXIF tag
DECODE_THREADS = 2  # images verified at once per server process; the rest wait their turn off the event loop
# Modes the engine's input writer saves as PNG as they are; any other (CMYK, LAB, YCbCr, I, F, …) is converted.
KEPT_MODES = {"image": ("RGB", "RGBA", "L", "LA", "1", "P"), "mask": ("L", "1")}

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(?:;[\w=.-]+)*;base64,", re.IGNORECASE)
MIMES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
         "TIFF": "image/tiff"}


class RawImage(bytes):
    """An input image's bytes, read but not yet decoded (verify() does that, off the event loop)."""


def _base64(text: str) -> bytes:
    """Strict base64, line breaks allowed; the common unbroken text skips the regular expression (milliseconds of
    the event loop for a 4096² photo)."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)


def decode(value: Any) -> RawImage:
    """Read one image given as base64 text, a data: URL or an uploaded file; ValidationError says what is wrong."""
    if isinstance(value, FileStorage):
        data = value.read(settings().max_input_bytes + 1)
    elif isinstance(value, str):
        text = _DATA_URL.sub("", value.strip(), count=1)
        if len(text) * 3 // 4 > settings().max_input_bytes + 3:
            raise ma.ValidationError(f"must be at most {settings().max_input_bytes} bytes of image data")
        try:
            data = _base64(text)
        except (binascii.Error, ValueError):
            raise ma.ValidationError("must be base64 image data or a data: URL (data:image/png;base64,...)") from None
    else:
        raise ma.ValidationError("must be base64 image data, a data: URL, or a file upload")
    if not data:
        raise ma.ValidationError("is empty")
    if len(data) > settings().max_input_bytes:
        raise ma.ValidationError(f"must be at most {settings().max_input_bytes} bytes of image data")
    return RawImage(data)


def verified(data: bytes, role: str = "image") -> InputImage:
    """verify() off the event loop (the upload helper, or the decode pool): only the calling request waits for it."""
    checked = offloaded(verify_unless_kept, data, settings().max_input_pixels, role, pool="image-decode",
                        threads=DECODE_THREADS)
    return checked if checked.data else replace(checked, data=data)


def verify_unless_kept(data: bytes, limit: int, role: str = "image") -> InputImage:
    """verify(), with no data in the answer when the image is kept as sent (the helper need not send it back)."""
    checked = verify(data, limit, role)
    return replace(checked, data=b"") if checked.data is data else checked


def verify(data: bytes, limit: int, role: str = "image") -> InputImage:
    """Open, size-check and fully decode the bytes, so a truncated or corrupt file never reaches a worker; then
    turn it upright (EXIF orientation) and into a mode the engine can save as PNG, re-encoding when either moved."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt, (width, height) = probe.format, probe.size
                if width * height > limit:
                    raise ma.ValidationError(f"is {width}×{height} = {width * height} pixels; at most {limit} are accepted")
                probe.verify()
            if fmt not in MIMES:
                raise ma.ValidationError(f"is a {fmt} image; send PNG, JPEG, WEBP, GIF, BMP or TIFF")
            with Image.open(io.BytesIO(data)) as image:
                if fmt == "JPEG" and not changes(image, role):
                    # Kept as sent, so only its integrity matters: libjpeg decoding at 1/8 scale still reads every
                    # entropy-coded block (a truncated file fails as in a full decode) at a ninth of the CPU
                    # (6 against 57 ms for a 4096² photo here).
                    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                image.load()  # verify() does not decode pixel data: a truncated file fails only here
                upright = normalised(image, role)
    except ma.ValidationError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ma.ValidationError(f"is not a readable image: {exc}") from None
    if upright is None:
        return InputImage(role="", mime=MIMES[fmt], width=width, height=height, data=data)
    out = io.BytesIO()
    upright.save(out, format="PNG")
    return InputImage(role="", mime=MIMES["PNG"], width=upright.width, height=upright.height, data=out.getvalue())


def turned(image: Image.Image) -> bool:
    """Whether the image is stored sideways or mirrored, with an EXIF orientation saying so (read from the header)."""
    return image.getexif().get(ORIENTATION, 1) in range(2, 9)


def changes(image: Image.Image, role: str) -> bool:
    """Whether normalised() will change the image (from its header: no pixel is decoded)."""
    return turned(image) or image.mode not in KEPT_MODES["mask" if role == "mask" else "image"]


def normalised(image: Image.Image, role: str) -> Image.Image | None:
    """The image turned as its EXIF orientation says and in a mode the engine saves as PNG; None when already so."""
    # A portrait photo is stored sideways with an orientation tag. Only then is it turned: exif_transpose copies
    # every image, and a copy read as "turned" re-encoded every input as PNG (seconds of CPU for a 4096² photo).
    is_turned = turned(image)
    current = ImageOps.exif_transpose(image) if is_turned else image
    if current.mode in KEPT_MODES["mask" if role == "mask" else "image"]:
        return current if is_turned else None
    try:
        if role == "mask":
            return current.convert("L")
        has_alpha = "A" in current.getbands() or "transparency" in current.info
        return current.convert("RGBA" if has_alpha else "RGB")
    except (ValueError, OSError):  # Pillow converts LAB and some others only through RGB
        return current.convert("RGB").convert("L" if role == "mask" else "RGB")


class ImageField(fields.Field[RawImage]):
    """An image as base64, a data: URL, or (multipart/form-data) an uploaded file; read, not yet decoded."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> RawImage:
        return decode(value)


class ImageList(fields.List[RawImage]):
    """A list of images whose length is checked before any item is read (a long list is refused at once)."""

    def __init__(self, most: int, **kwargs: Any) -> None:
        super().__init__(ImageField(), **kwargs)
        self.most = most

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[Any]:
        if isinstance(value, (list, tuple)) and len(value) > self.most:
            raise ma.ValidationError(f"holds {len(value)} images; an edit or a variation takes at most {self.most} "
                                     "(the most any model takes: GET /api/models gives each model's "
                                     "max_reference_images)")
        return super()._deserialize(value, attr, data, **kwargs)

    def _jsonschema_type_mapping(self) -> dict[str, Any]:
        return {"type": "string", "format": "byte"}
