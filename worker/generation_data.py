"""What an image says about what made it: generation data and the AI-generated marking, in each format's place.

Every image carries IPTC's DigitalSourceType `trainedAlgorithmicMedia` in XMP (the machine-readable marking
Article 50 of the EU AI Act asks for), whatever else is left out. The generation data goes into PNG text chunks
(with AUTOMATIC1111's `parameters` text, which many tools read), EXIF (Software, and the same text as
UserComment, where AUTOMATIC1111 puts it in JPEG and WEBP) and XMP (a JSON copy under this server's namespace).
An image the mflux engine made carries what mflux itself writes instead (mflux_metadata.py: its JSON UserComment,
its XMP fields and, in PNG, its IPTC block), so that `mflux-info` reads it back; the PNG `parameters` text and
this server's XMP stay. The synthetic engine's test patterns never claim to be mflux's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from PIL import Image

from mflux_server import __version__
from mflux_server.core import catalog
from mflux_server.core.rows import Task
from mflux_server.worker import mflux_metadata

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
NAMESPACE = "https://mflux-server.invalid/ns/generation/1.0/"  # ours: a JSON copy of the generation data
SOFTWARE_TAG, USER_COMMENT_TAG, EXIF_IFD = 0x0131, 0x9286, 0x8769


@dataclass(frozen=True)
class GenerationData:
    """One image's generation data; prompt and negative_prompt are None when the task keeps them private."""

    prompt: str | None
    negative_prompt: str | None
    model: str
    seed: int
    steps: int
    guidance: float | None  # None: the model's own default
    width: int
    height: int
    loras: list[dict[str, Any]]
    inputs: list[str]  # the kinds of input images it was made from (never the images)
    software: str  # the engine and model, as the engine names them
    server: str = f"mflux-server {__version__}"
    mflux: dict[str, Any] | None = field(default=None, compare=False)  # what mflux writes, for its engine's images

    @classmethod
    def of(cls, task: Task, index: int, software: str, image: Image.Image | None = None) -> GenerationData:
        """The data of image `index` of a task; the prompts only when the task is not private (the API marks it so
        for a request's private and for --metadata-prompts false). mflux's own metadata comes with an image the
        mflux engine made."""
        shared = not task.private
        made_by_mflux = image.info.get(mflux_metadata.MFLUX_METADATA) if image is not None else None
        return cls(task.prompt if shared else None, task.negative_prompt if shared else None, task.model,
                   task.seed + index, task.steps, None if task.guidance_auto else task.guidance, task.width,
                   task.height, [{"name": name, "scale": scale} for name, scale in task.lora_set], input_kinds(task),
                   software, mflux=None if made_by_mflux is None else mflux_metadata.shared(made_by_mflux, bool(task.private)))

    def parameters(self) -> str:
        """AUTOMATIC1111's "parameters" text: the prompt, the negative prompt, then one line of settings."""
        settings = [f"Steps: {self.steps}", f"Seed: {self.seed}", f"Size: {self.width}x{self.height}",
                    f"Model: {self.model}"]
        if self.guidance is not None:
            settings.insert(1, f"CFG scale: {self.guidance:g}")
        if self.loras:
            settings.append("Lora: " + json.dumps(", ".join(f"{lora['name']}:{lora['scale']:g}" for lora in self.loras)))
        if self.inputs:
            settings.append("Inputs: " + json.dumps(", ".join(self.inputs)))
        settings += [f"Version: {self.server}", f"Software: {json.dumps(self.software)}"]
        lines = [self.prompt if self.prompt is not None else "(prompt withheld)"]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        return "\n".join(lines + [", ".join(settings)])

    def as_json(self) -> str:
        """The data as one JSON object (what the XMP carries)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "mflux"}  # no copy of mflux's data
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    def xmp(self) -> bytes:
        """An XMP packet: the DigitalSourceType marking, the prompt as dc:description and the JSON; for an mflux
        image, mflux's own packet with those added, else ours with the creator tool."""
        marking = (f'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" xmlns:mfluxserver="{NAMESPACE}" '
                   f'Iptc4xmpExt:DigitalSourceType="{DIGITAL_SOURCE_TYPE}"')
        generation = f"<mfluxserver:generation>{escape(self.as_json())}</mfluxserver:generation>"
        if self.mflux is not None:  # mflux's packet has the prompt as dc:description already
            return mflux_metadata.xmp(self.mflux, marking, generation)
        description = "" if self.prompt is None else (
            f"<dc:description><rdf:Alt><rdf:li xml:lang=\"x-default\">{escape(self.prompt)}</rdf:li></rdf:Alt>"
            "</dc:description>")
        packet = (
            '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
            f'xmlns:dc="http://purl.org/dc/elements/1.1/" {marking} '
            f'xmp:CreatorTool={quoteattr(self.software)}>{description}{generation}'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>')
        return packet.encode()

    def exif(self) -> bytes:
        """EXIF with Software and a UserComment: mflux's JSON for an mflux image, else the parameters text (UTF-16
        with its UNICODE prefix). Written by piexif, as mflux writes it and AUTOMATIC1111 reads it: Pillow stores a
        UserComment as BYTE values, which piexif reads back as a tuple, not the text."""
        import piexif

        comment = (mflux_metadata.user_comment(self.mflux) if self.mflux is not None
                   else b"UNICODE\0" + self.parameters().encode("utf-16-be"))
        return bytes(piexif.dump({"0th": {SOFTWARE_TAG: self.software.encode("ascii", "replace")},
                                  "Exif": {USER_COMMENT_TAG: comment}}))


def input_kinds(task: Task) -> list[str]:
    """What kinds of input images a task was made from, from its model's capabilities and its own fields."""
    if not task.input_count and not task.control:
        return []
    resolved = catalog.resolve_reference(task.model)
    can = resolved.info.capabilities if resolved is not None else None
    if task.control_settings is not None:
        return [f"control image ({task.control_settings.kind})"]
    if can is None:
        return ["image"] * task.input_count
    if can.try_on:
        return ["person image", "mask", "garment image"]
    if can.upscale:
        return ["image to upscale"]
    if can.variation:
        return [f"image prompt {n + 1}" for n in range(task.input_count)]
    if can.inpaint and task.input_count == 2:
        return ["image", "mask"]
    if can.edit and task.input_count > 1 or (can.edit and not can.image_to_image):
        return [f"reference image {n + 1}" for n in range(task.input_count)]
    return ["init image"]
