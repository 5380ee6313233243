"""Per-model timing profiles for the synthetic engine: several families' real costs in one worker (a JSON file)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIELDS = ("step", "fixed", "load", "cold", "drift")


@dataclass(frozen=True)
class Profile:
    """How long one model takes on the machine being imitated (model seconds, before the engine's speed)."""

    step: tuple[float, float, float]  # seconds per step as a + b·mp + c·mp²
    fixed: tuple[float, float]  # seconds before and after the denoising loop
    load: float = 0.0  # seconds to load it
    cold: float = 0.0  # extra seconds of the first image after a load (kernels compiled on first use)
    drift: float = 0.0  # random ± fraction shared by every step of one image: the machine's state, not the step's


def _numbers(model: str, name: str, value: Any, count: int) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != count or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"synthetic profile {model!r}: {name} must be a list of {count} numbers")
    if any(v < 0 for v in value):
        raise ValueError(f"synthetic profile {model!r}: {name} must not be negative")
    return tuple(float(v) for v in value)


def _number(model: str, name: str, value: Any, below: float | None = None) -> float:
    if not isinstance(value, (int, float)) or value < 0 or (below is not None and value >= below):
        rule = f"a number in [0, {below:g})" if below is not None else "a number ≥ 0"
        raise ValueError(f"synthetic profile {model!r}: {name} must be {rule}")
    return float(value)


def read_profiles(path: str) -> dict[str, Profile]:
    """The profiles in a JSON file {model: {step: [a, b, c], fixed: [before, after], load, cold, drift}}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"synthetic profiles {path}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"synthetic profiles {path}: expected an object of model names")
    profiles = {}
    for model, fields in data.items():
        if not isinstance(fields, dict) or set(fields) - set(FIELDS) or not {"step", "fixed"} <= set(fields):
            raise ValueError(f"synthetic profile {model!r}: needs step and fixed, and may have {', '.join(FIELDS[2:])}")
        step = _numbers(model, "step", fields["step"], 3)
        fixed = _numbers(model, "fixed", fields["fixed"], 2)
        profiles[model] = Profile((step[0], step[1], step[2]), (fixed[0], fixed[1]),
                                  _number(model, "load", fields.get("load", 0.0)),
                                  _number(model, "cold", fields.get("cold", 0.0)),
                                  _number(model, "drift", fields.get("drift", 0.0), below=1.0))
    return profiles
