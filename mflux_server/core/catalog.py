"""The models mflux-server can serve, their families and capabilities: read from models.json, no mflux import.

models.json is generated from the installed mflux (`python -m mflux_server.worker.catalog_build`) and a
contract test rebuilds it, so it cannot drift from the pinned release.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

CATALOG_FILE = Path(__file__).with_name("models.json")


@dataclass(frozen=True)
class Capabilities:
    """Which inputs a model can use."""

    text_to_image: bool
    image_to_image: bool
    edit: bool  # an instruction applied to a reference image
    inpaint: bool  # an image plus a mask; white repaints
    negative_prompt: bool
    guidance: bool
    loras: bool  # LoRAs per request (mflux maps LoRA files onto the family)
    control: bool = False  # generates guided by control_image (ControlNet, depth); `ModelInfo.control` says how
    upscale: bool = False  # an upscaler: enlarges `image` (POST /api/upscale), generates nothing from a prompt alone
    variation: bool = False  # draws variations of `image` / `images` (image prompts, each with its strength)
    try_on: bool = False  # dresses the person in `image` with `garment_image` where `mask` is white

    def as_dict(self) -> dict[str, bool]:
        """The capabilities as a JSON object."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


# The control maps a request may name in control_type (each model takes some: ControlInfo.types).
CONTROL_TYPES = ("canny", "depth", "pose", "hed", "mlsd")


@dataclass(frozen=True)
class ControlInfo:
    """How a model takes control_image: the map types, whether a finished map is accepted, the default strength."""

    types: tuple[str, ...]
    maps: bool  # control_preprocess false (the image is already the map) is accepted
    default_strength: float | None  # None: the model takes no control_strength

    def as_dict(self) -> dict[str, Any]:
        """As GET /api/models shows it."""
        return {"types": list(self.types), "maps": self.maps, "default_strength": self.default_strength}


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about one mflux model."""

    name: str  # mflux's registry key, as passed to ModelConfig.from_name
    aliases: tuple[str, ...]
    family: str  # which adapter (mflux class) runs it
    family_title: str
    repo: str  # the Hugging Face repository of its weights
    priority: int  # mflux's tie-break when a checkpoint name matches several aliases
    default_steps: int
    default_guidance: float | None
    capabilities: Capabilities
    max_reference_images: int = 0  # how many reference images an edit (or a variation) takes; 0 without either
    control: ControlInfo | None = None  # how it takes control_image (with the control capability)

    @property
    def supports_guidance(self) -> bool:
        """Whether guidance changes the image (schnell and the turbo distillations ignore it)."""
        return self.capabilities.guidance

    @property
    def needs_image(self) -> bool:
        """True for models that only edit or fill, so every request must carry an image (a control model needs
        control_image instead)."""
        return not self.capabilities.text_to_image and not self.capabilities.control


@dataclass(frozen=True)
class Resolved:
    """A model reference resolved to its catalog entry: `served` is the name a worker loads and tasks carry."""

    info: ModelInfo
    served: str  # the registry name, or the Hugging Face repo / local path it was given as


@cache
def _load() -> tuple[tuple[ModelInfo, ...], int]:
    data = json.loads(CATALOG_FILE.read_text())
    models = tuple(
        ModelInfo(
            name=entry["name"],
            aliases=tuple(entry["aliases"]),
            family=entry["family"],
            family_title=entry["family_title"],
            repo=entry["repo"],
            priority=entry["priority"],
            default_steps=entry["default_steps"],
            default_guidance=entry["default_guidance"],
            capabilities=Capabilities(**entry["capabilities"]),
            max_reference_images=entry["max_reference_images"],
            control=ControlInfo(tuple(entry["control"]["types"]), entry["control"]["maps"],
                                entry["control"]["default_strength"]) if entry.get("control") else None,
        )
        for entry in data["models"]
    )
    return models, int(data["size_multiple"])


def models() -> tuple[ModelInfo, ...]:
    """Every model the server can serve, in mflux's registry order."""
    return _load()[0]


def size_multiple() -> int:
    """Width and height must be multiples of this (mflux's latent patch size)."""
    return _load()[1]


@cache
def _by_name() -> dict[str, ModelInfo]:
    return {alias.lower(): info for info in models() for alias in (info.name, *info.aliases)}


def resolve(name: str) -> ModelInfo | None:
    """Find a model by registry name or alias, case-insensitively; None when unknown."""
    return _by_name().get(name.strip().lower())


def resolve_reference(reference: str) -> Resolved | None:
    """Resolve a name, alias, Hugging Face repo or local path to its model, the way mflux infers a checkpoint's base.

    An exact repo id names its model; otherwise the longest alias found in the last path component wins, and
    mflux's registry priority breaks ties (so "FLUX.1-Krea-dev-mflux-4bit" is krea-dev, not dev).
    """
    text = reference.strip()
    info = resolve(text)
    if info is not None:
        return Resolved(info, info.name)
    by_repo = sorted((m for m in models() if m.repo.lower() == text.lower()), key=lambda m: m.priority)
    if by_repo:
        return Resolved(by_repo[0], by_repo[0].name)
    basename = text.rstrip("/").rsplit("/", 1)[-1].lower()
    matches = [(info, alias) for info in models() for alias in (info.name, *info.aliases) if alias.lower() in basename]
    if not matches or not basename:
        return None
    best, _ = min(matches, key=lambda match: (-len(match[1]), match[0].priority))
    return Resolved(best, text)


def names() -> list[str]:
    """Registry names of every servable model."""
    return [info.name for info in models()]
