"""Build the model catalog (mflux_server/core/models.json) from the installed mflux: registry, defaults, signatures.

The API never imports mflux, so the catalog it validates against is this generated file. Run
`python -m mflux_server.worker.catalog_build` after changing the pinned mflux; the contract test
rebuilds it and fails when the committed file no longer matches mflux.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib
import json
import pkgutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from mflux_server.core.catalog import CATALOG_FILE
from mflux_server.core.lora_library import PATTERNS_FILE
from mflux_server.core.rows import REFERENCE_ROLES
from mflux_server.worker.engines.families import FAMILIES, Family

# Inputs an image-to-image class takes; a family that takes both (and does not edit) does image-to-image.
_INIT_PARAMETERS = {"image_path", "image_strength"}
_MASK_PARAMETERS = {"masked_image_path", "mask_path"}
_REFERENCE_PARAMETERS = {"image_path", "image_paths"}
# A class that takes a list of references (image_paths) edits from several; mflux sets no limit, so the
# server does (each is a full image in the request body and on the GPU): 'image' plus the further roles.
MAX_REFERENCES = 1 + len(REFERENCE_ROLES)


@functools.cache
def lora_patterns(family: Family) -> list[str]:
    """The tensor names mflux applies from a LoRA file to a family (its LoRA mapping's patterns, {block} for a
    block number); empty where mflux has no LoRA mapping for the family."""
    package = family.model_class.split(":")[0].split(".")
    weights = ".".join(package[:3] + ["weights"])  # mflux.models.<package>.weights
    try:
        folder = importlib.import_module(weights)
    except ModuleNotFoundError:
        return []
    patterns: set[str] = set()
    for module in pkgutil.iter_modules(folder.__path__):
        if not module.name.endswith("lora_mapping"):
            continue
        loaded = importlib.import_module(f"{weights}.{module.name}")
        for name, value in vars(loaded).items():
            if name.endswith("LoRAMapping") and name != "LoRAMapping" and hasattr(value, "get_mapping"):
                for target in value.get_mapping():
                    for field in fields(target):
                        if field.name.startswith("possible_"):
                            patterns.update(getattr(target, field.name))
    return sorted(patterns)


def capabilities(family: Family, supports_guidance: bool | None) -> dict[str, bool]:
    """What a family's generate_image (and its edit twin's) accepts, read from their signatures."""
    main = family.generate_parameters()
    edit = family.generate_parameters(edit=True) if family.edit_class else {}
    required_image = any(
        name in _REFERENCE_PARAMETERS | _MASK_PARAMETERS and parameter.default is parameter.empty
        for name, parameter in main.items()
    )
    return {
        "text_to_image": family.image_role == "init" and not required_image,
        "image_to_image": family.image_role == "init" and _INIT_PARAMETERS <= main.keys(),
        "edit": (family.image_role == "edit" and bool(_REFERENCE_PARAMETERS & main.keys()))
        or bool(_REFERENCE_PARAMETERS & edit.keys()),
        "inpaint": bool(_MASK_PARAMETERS & main.keys()),
        "negative_prompt": "negative_prompt" in main,
        # mflux marks models that ignore guidance (schnell, the turbo distillations) supports_guidance=False.
        "guidance": "guidance" in main and supports_guidance is not False,
        # LoRAs per request: mflux maps LoRA files onto the family, and its class takes lora_paths.
        "loras": bool(lora_patterns(family)) and "lora_paths" in family.init_parameters(),
        "control": bool(family.control_types) and (family.control_photo or family.control_map) in main,
        "upscale": family.image_role == "upscale" and family.upscale_source in main,
        "variation": family.image_role == "redux" and "redux_image_paths" in main,
        "try_on": family.image_role == "tryon" and {"left_image_path", "right_image_path"} <= main.keys(),
    }


def control(family: Family) -> dict[str, Any] | None:
    """How a family takes control_image: the map types, whether it takes a finished map, and mflux's default
    ControlNet strength where generate_image takes one (None for a family without control)."""
    if not family.control_types:
        return None
    from mflux.cli.defaults import defaults

    main = family.generate_parameters()
    assert all(name in main for name in (family.control_photo, family.control_map) if name), family.name
    strength = float(getattr(defaults, family.control_strength)) if "controlnet_strength" in main else None
    return {"types": list(family.control_types), "maps": family.control_map is not None, "default_strength": strength}


def max_reference_images(family: Family) -> int:
    """How many reference images an edit takes: several where mflux takes a list (image_paths), else one or none;
    for variations (Redux), how many image prompts."""
    if family.image_role == "redux":
        return MAX_REFERENCES
    for edit in (False, True) if family.edit_class else (False,):
        accepted = family.generate_parameters(edit=edit)
        if (edit or family.image_role == "edit") and _REFERENCE_PARAMETERS & accepted.keys():
            return MAX_REFERENCES if "image_paths" in accepted else 1
    return 0


def default_guidance(family: Family) -> float | None:
    """The guidance mflux's CLI uses for a family when none is given: its named constant, or the signature's default."""
    from mflux.cli.defaults import defaults

    if family.guidance_default:
        return float(getattr(defaults, family.guidance_default))
    parameter = family.generate_parameters().get("guidance")
    value = None if parameter is None else parameter.default
    return float(value) if isinstance(value, (int, float)) else None


def build() -> dict[str, Any]:
    """The catalog as JSON-ready data: one entry per registry key a family serves, in registry order."""
    import mflux
    from mflux.cli.defaults import defaults
    from mflux.models.common.config.model_config import AVAILABLE_MODELS

    family_of = {key: family for family in FAMILIES for key in family.registry_keys()}
    models = []
    for key, config in AVAILABLE_MODELS.items():
        family = family_of.get(key)
        if family is None:
            continue
        models.append({
            "name": key,
            "aliases": [alias for alias in config.aliases if alias != key],
            "family": family.name,
            "family_title": family.title,
            "repo": config.model_name,
            "priority": config.priority,
            # SeedVR2 denoises in one step, and its generate_image takes no step count.
            "default_steps": defaults.MODEL_INFERENCE_STEPS.get(key, defaults.DEFAULT_INFERENCE_STEPS)
            if "num_inference_steps" in family.generate_parameters() else 1,
            "default_guidance": default_guidance(family),
            "capabilities": capabilities(family, config.supports_guidance),
            "max_reference_images": max_reference_images(family),
            "control": control(family),
        })
    return {
        "generated_by": "python -m mflux_server.worker.catalog_build",
        "mflux_version": mflux.__version__ if hasattr(mflux, "__version__") else _installed_version(),
        "size_multiple": defaults.DIMENSION_STEP_PIXELS,
        "models": models,
    }


def _installed_version() -> str:
    from importlib.metadata import version

    return version("mflux")


def render(data: dict[str, Any]) -> str:
    """The file's exact text, so that a rebuild compares byte for byte."""
    return json.dumps(data, indent=1, sort_keys=False) + "\n"


def build_patterns() -> bytes:
    """Every family's LoRA patterns, gzipped with no timestamp so that a rebuild compares byte for byte."""
    data = {family.name: lora_patterns(family) for family in FAMILIES}
    text = json.dumps({name: patterns for name, patterns in data.items() if patterns}, indent=0, sort_keys=True)
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def main(argv: list[str] | None = None) -> int:
    """Write the catalog, or with --check report whether the committed one still matches mflux."""
    parser = argparse.ArgumentParser(prog="python -m mflux_server.worker.catalog_build", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--output", type=Path, default=CATALOG_FILE)
    args = parser.parse_args(argv)
    text, patterns = render(build()), build_patterns()
    if args.check:
        same = args.output.exists() and args.output.read_text() == text
        same = same and PATTERNS_FILE.exists() and PATTERNS_FILE.read_bytes() == patterns
        print("catalog matches mflux" if same else f"{args.output} or {PATTERNS_FILE.name} is stale: rebuild them",
              file=sys.stderr)
        return 0 if same else 1
    args.output.write_text(text)
    PATTERNS_FILE.write_bytes(patterns)
    print(f"wrote {args.output} and {PATTERNS_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
