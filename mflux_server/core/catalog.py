"""The model names mflux-server accepts, their aliases, and their defaults; no mflux import needed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about one mflux model name."""

    name: str  # mflux's ModelConfig name, as passed to ModelConfig.from_name
    family: str  # which mflux model class runs it
    default_steps: int
    supports_guidance: bool
    aliases: tuple[str, ...] = ()


# The FLUX.1 text-to-image models, run through mflux's Flux1 class. tests/contract checks every name here
# against the installed mflux's ModelConfig, so a rename upstream fails CI.
CATALOG: tuple[ModelInfo, ...] = (
    ModelInfo("schnell", "flux1", 4, False),
    ModelInfo("dev", "flux1", 25, True),
    ModelInfo("krea-dev", "flux1", 25, True, aliases=("dev-krea",)),
)

_BY_NAME = {alias: info for info in CATALOG for alias in (info.name, *info.aliases)}


def resolve(name: str) -> ModelInfo | None:
    """Find a model by name or alias, case-insensitively; None when unknown."""
    return _BY_NAME.get(name.strip().lower())


def names() -> list[str]:
    """Canonical model names."""
    return [info.name for info in CATALOG]
