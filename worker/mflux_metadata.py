"""What mflux itself writes into an image it made, for the mflux engine's images: `mflux-info` reads them back.

mflux's GeneratedImage lists its generation data (`_get_metadata`) and its ImageUtil and MetadataBuilder write it
as an EXIF UserComment (JSON), an XMP packet with mflux's own fields and, in PNG, an IPTC block. The engine keeps
that data on the image it returns (under MFLUX_METADATA in `image.info`) and the result writer writes it the way
mflux does, with this server's marking and generation data added to the XMP packet. The worker's temporary input
paths are left out (the data names input kinds, never the inputs), and so are the prompts of a private task.
"""

from __future__ import annotations

import json
from typing import Any

MFLUX_METADATA = "mflux-server.mflux-metadata"  # the image.info key the engine leaves mflux's metadata under
PATHS = ("image_path", "image_paths", "controlnet_image_path", "masked_image_path", "depth_image_path",
         "redux_image_paths", "model_path")  # the worker's own files: temporary inputs and the model's folder
PROMPTS = ("prompt", "negative_prompt")
DESCRIPTION_END = 'xmlns:mflux="http://ns.mflux.ai/1.0/">'  # where mflux's XMP opens its rdf:Description


def of_result(result: Any) -> dict[str, Any]:
    """mflux's metadata of a GeneratedImage, without the paths of the worker's files."""
    metadata: dict[str, Any] = result._get_metadata()
    return {key: value for key, value in metadata.items() if key not in PATHS}


def shared(metadata: dict[str, Any], private: bool) -> dict[str, Any]:
    """The metadata an image may carry: a private task's prompts left out."""
    return {key: value for key, value in metadata.items() if not (private and key in PROMPTS)}


def user_comment(metadata: dict[str, Any]) -> bytes:
    """The EXIF UserComment mflux writes (ImageUtil._embed_metadata): the JSON behind an ASCII prefix."""
    return b"ASCII\x00\x00\x00" + json.dumps(metadata).encode("utf-8")


def xmp(metadata: dict[str, Any], attributes: str, elements: str) -> bytes:
    """mflux's XMP packet (MetadataBuilder), with our attributes (namespaces and the marking) on its description
    and our elements inside it."""
    from mflux.utils.metadata_builder import MetadataBuilder

    packet: str = MetadataBuilder.build_xmp_packet(metadata)
    if packet.count(DESCRIPTION_END) != 1 or packet.count("</rdf:Description>") != 1:
        raise ValueError("mflux's XMP packet no longer has the shape this server extends")
    packet = packet.replace(DESCRIPTION_END, f'xmlns:mflux="http://ns.mflux.ai/1.0/" {attributes}>')
    return packet.replace("</rdf:Description>", f"{elements}</rdf:Description>").encode()


def iptc(metadata: dict[str, Any]) -> str:
    """The IPTC block mflux puts in a PNG's "IPTC" text chunk (MetadataBuilder.embed_metadata), as hex."""
    from mflux.utils.metadata_builder import MetadataBuilder

    block: bytes = MetadataBuilder.build_iptc_binary(metadata)
    return block.hex()
