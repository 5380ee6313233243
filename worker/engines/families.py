"""The mflux model families the worker can drive: which class runs each, and how job inputs map onto it.

This table holds only what cannot be read from mflux itself: which class generates for a family and
what role an input image plays there. Model names, aliases, default steps and every capability are
derived from mflux's registry and method signatures by `mflux_server.worker.catalog_build`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

# How a family uses the request's `image`: as the start of image-to-image, as the reference an
# instruction edits (Kontext, Qwen-Image-Edit, FLUX.2 edit), or as the picture a mask repaints (FLUX.1 Fill);
# "control": it takes no `image`, and generates from the prompt guided by `control_image` (ControlNet, depth);
# "upscale": `image` is the picture it enlarges to the task's size (POST /api/upscale); "redux": `image` and
# `images` are image prompts whose variations it draws (FLUX.1 Redux); "tryon": `image` is a person, `mask` where
# the garment goes, and `garment_image` the garment (CatVTON: FLUX.1 Fill in context, the garment beside the person).
ImageRole = Literal["init", "edit", "fill", "control", "upscale", "redux", "tryon"]


@dataclass(frozen=True)
class Family:
    """One mflux model class (and optionally its edit twin), and the registry keys it serves."""

    name: str
    title: str
    model_class: str  # "module:Class"
    image_role: ImageRole = "init"
    keys: tuple[str, ...] = ()  # registry keys; when empty, read from the family's mflux CLI module
    cli: str | None = None  # the mflux CLI module whose DEFAULT_MODEL and FAMILY_MODELS list the keys
    edit_class: str | None = None  # same weights, loaded for edit requests (FLUX.2 klein)
    guidance_default: str | None = None  # name of the mflux CLI default constant, when the CLI overrides the signature
    latent_format: str = "flux"  # the VAE's latent space, a key of latent_formats.FORMATS: it colours the previews
    # ("none": no preview, as for SeedVR2's one-step video latents)
    # Control: the maps it is conditioned on, the generate_image parameter that takes a photo mflux turns into
    # the map itself, and the one that takes a finished map (None: mflux always preprocesses what it is given).
    # "controls" is Z-Image's list of ControlSpec (its pose and hed preprocessors need PyTorch, which the Linux
    # install leaves out, so they are not offered). The default strength is the named constant of mflux's CLI.
    control_types: tuple[str, ...] = ()
    control_photo: str | None = None
    control_map: str | None = None
    control_strength: str = "CONTROLNET_STRENGTH"
    upscale_source: str | None = None  # an upscaler's generate_image parameter that takes the picture
    # mflux's own function fitting one edit image to what the edit model conditions on ("module:Class.method"),
    # applied to image_paths; it is idempotent, so the worker may run it first, on its low-priority thread.
    fit_reference: str | None = None

    def load_class(self, edit: bool = False) -> Any:
        """Import the mflux class (mflux is imported only here and in the engine)."""
        path = self.edit_class if edit and self.edit_class else self.model_class
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)

    def reference_fitter(self) -> Callable[[Image.Image], Image.Image] | None:
        """The image as mflux's edit model would load and fit it before encoding (None: this family fits none).

        A 4096² reference costs 0.3–0.5 s of CPU to decode and shrink; done here, on the worker's low-priority
        thread, mflux's own call on the engine's thread finds it already fitted and does nothing."""
        if self.fit_reference is None:
            return None
        from mflux.utils.image_util import ImageUtil

        module, _, path = self.fit_reference.partition(":")
        owner, _, name = path.partition(".")
        fit = getattr(getattr(importlib.import_module(module), owner), name)
        # What mflux reads from the file: upright, alpha over white, RGB (flux2_klein_edit_helpers.py).
        return lambda image: fit(ImageUtil.load_image(image).convert("RGB"))

    def registry_keys(self) -> tuple[str, ...]:
        """The ModelConfig registry keys this family runs, from the table or from mflux's own CLI module."""
        if self.keys:
            return self.keys
        assert self.cli is not None, f"family {self.name} names neither keys nor a CLI module"
        module = importlib.import_module(self.cli)
        return (module.DEFAULT_MODEL, *getattr(module, "FAMILY_MODELS", ()))

    def init_parameters(self) -> dict[str, inspect.Parameter]:
        """The model class's constructor parameters (beyond self)."""
        parameters = dict(inspect.signature(self.load_class().__init__).parameters)
        parameters.pop("self", None)
        return parameters

    def generate_parameters(self, edit: bool = False) -> dict[str, inspect.Parameter]:
        """generate_image's parameters (beyond self) of the class that serves a request."""
        parameters = dict(inspect.signature(self.load_class(edit).generate_image).parameters)
        parameters.pop("self", None)
        return parameters


_FLUX1 = "mflux.models.flux.variants"
FAMILIES: tuple[Family, ...] = (
    Family("flux1", "FLUX.1", f"{_FLUX1}.txt2img.flux:Flux1", keys=("schnell", "dev", "krea-dev"),
           guidance_default="GUIDANCE_SCALE"),
    Family("flux1-kontext", "FLUX.1 Kontext", f"{_FLUX1}.kontext.flux_kontext:Flux1Kontext", image_role="edit",
           keys=("dev-kontext",), guidance_default="GUIDANCE_SCALE_KONTEXT"),
    Family("flux1-fill", "FLUX.1 Fill", f"{_FLUX1}.fill.flux_fill:Flux1Fill", image_role="fill",
           keys=("dev-fill",), guidance_default="DEFAULT_DEV_FILL_GUIDANCE"),
    # mflux runs OpenCV's Canny on every control image of these (ControlnetUtil), so they take photos only.
    Family("flux1-controlnet", "FLUX.1 ControlNet", f"{_FLUX1}.controlnet.flux_controlnet:Flux1Controlnet",
           image_role="control", keys=("dev-controlnet-canny", "schnell-controlnet-canny"),
           guidance_default="GUIDANCE_SCALE", control_types=("canny",), control_photo="controlnet_image_path"),
    Family("flux1-tryon", "FLUX.1 Fill CatVTON", f"{_FLUX1}.in_context.flux_in_context_fill:Flux1InContextFill",
           image_role="tryon", keys=("dev-fill-catvton",), guidance_default="DEFAULT_DEV_FILL_GUIDANCE"),
    Family("flux1-redux", "FLUX.1 Redux", f"{_FLUX1}.redux.flux_redux:Flux1Redux", image_role="redux",
           keys=("dev-redux",), guidance_default="GUIDANCE_SCALE"),
    # The upscaler: it generates the target size from the prompt, conditioned on the picture.
    Family("flux1-upscaler", "FLUX.1 ControlNet upscaler", f"{_FLUX1}.controlnet.flux_controlnet:Flux1Controlnet",
           image_role="upscale", keys=("dev-controlnet-upscaler",), upscale_source="controlnet_image_path"),
    # FLUX.1 Depth estimates the depth of image_path with Depth Pro, or takes a finished map as depth_image_path.
    Family("flux1-depth", "FLUX.1 Depth", f"{_FLUX1}.depth.flux_depth:Flux1Depth", image_role="control",
           keys=("dev-depth",), guidance_default="DEFAULT_DEPTH_GUIDANCE", control_types=("depth",), control_photo="image_path",
           control_map="depth_image_path"),
    Family("flux2-klein", "FLUX.2 klein", "mflux.models.flux2.variants.txt2img.flux2_klein:Flux2Klein",
           cli="mflux.models.flux2.cli.flux2_generate",
           edit_class="mflux.models.flux2.variants.edit.flux2_klein_edit:Flux2KleinEdit", latent_format="flux2",
           fit_reference="mflux.models.flux2.variants.edit.flux2_klein_edit_helpers:_Flux2KleinEditHelpers."
                         "prepare_reference_image"),
    Family("qwen-image", "Qwen-Image", "mflux.models.qwen.variants.txt2img.qwen_image:QwenImage",
           cli="mflux.models.qwen.cli.qwen_image_generate", latent_format="wan21"),
    Family("qwen-image-edit", "Qwen-Image-Edit", "mflux.models.qwen.variants.edit.qwen_image_edit:QwenImageEdit",
           image_role="edit", keys=("qwen-image-edit", "qwen-image-edit-2511"), latent_format="wan21"),
    Family("z-image", "Z-Image", "mflux.models.z_image.variants.z_image:ZImage",
           cli="mflux.models.z_image.cli.z_image_generate"),
    Family("z-image-controlnet", "Z-Image ControlNet Union",
           "mflux.models.z_image.variants.controlnet.z_image_turbo_controlnet:ZImageTurboControlnet",
           image_role="control", keys=("z-image-turbo-controlnet-union-2.1",), control_types=("canny", "depth", "mlsd"),
           control_photo="controls"),
    Family("fibo", "FIBO", "mflux.models.fibo.variants.txt2img.fibo:FIBO", keys=("fibo", "fibo-lite"),
           latent_format="wan22"),
    Family("fibo-edit", "FIBO Edit", "mflux.models.fibo.variants.edit.fibo_edit:FIBOEdit", image_role="edit",
           keys=("fibo-edit", "fibo-edit-rmbg"), latent_format="wan22"),
    # Families whose generate_image takes the common arguments, so the generic adapter drives them.
    Family("krea-2", "Krea 2", "mflux.models.krea2.variants.txt2img.krea2:Krea2", keys=("krea-2", "krea-2-raw"),
           latent_format="wan21"),
    # Krea 2's ControlNet strength is fixed when the model is built, so a request cannot set it.
    Family("krea-2-controlnet", "Krea 2 ControlNet", "mflux.models.krea2.variants.controlnet.krea2_controlnet:Krea2Controlnet",
           image_role="control", keys=("krea-2-controlnet-depth",), latent_format="wan21", control_types=("depth",),
           control_photo="image_path", control_map="depth_image_path"),
    Family("ernie-image", "ERNIE-Image", "mflux.models.ernie_image.variants.txt2img.ernie_image:ErnieImage",
           keys=("ernie-image", "ernie-image-turbo"), latent_format="flux2"),
    Family("qwen-image-2.1", "Qwen-Image 2.1", "mflux.models.qwen21.variants.txt2img.qwen_image_21:QwenImage21",
           cli="mflux.models.qwen21.cli.qwen21_generate", latent_format="qwen21"),
    Family("iris", "Iris", "mflux.models.iris.variants.txt2img.iris:Iris", cli="mflux.models.iris.cli.iris_generate",
           latent_format="pixels"),
    Family("anima", "Anima", "mflux.models.anima.variants.txt2img.anima:Anima",
           cli="mflux.models.anima.cli.anima_generate", latent_format="wan21"),
    Family("moss-image", "MOSS-Image", "mflux.models.moss_image.variants.txt2img.moss_image:MOSSImage",
           cli="mflux.models.moss_image.cli.moss_image_generate", latent_format="flux2"),
    Family("lens", "Lens", "mflux.models.lens.variants.txt2img.lens_image:LensImage", keys=("lens-turbo",),
           latent_format="flux2"),
    Family("boogu-image", "Boogu-Image", "mflux.models.boogu.variants.txt2img.boogu_image:BooguImage",
           keys=("boogu-image-turbo",)),
    Family("flux3-klein", "FLUX 3 Image klein", "mflux.models.flux3.variants.txt2img.flux3_klein:Flux3Klein",
           cli="mflux.models.flux3.cli.flux3_generate",
           edit_class="mflux.models.flux3.variants.edit.flux3_klein_edit:Flux3KleinEdit", latent_format="flux2"),
    Family("ming-image", "Ming-Image", "mflux.models.ming_image:MingImage", keys=("ming-image-design",),
           latent_format="ming"),
)

# Registry keys no family serves, each with the reason; a contract test fails when mflux adds a key that is
# in neither list, so a new model is a decision rather than a silent gap.
NOT_SERVED: dict[str, str] = {
    # QwenImage21Controlnet loads the edit model's components, which need the checkpoint's component configs
    # (config.json files): the engine tests' stand-ins have none, so its generate_image is not exercised here.
    "qwen-image-2.1-controlnet-union": "its mflux code is not yet exercised here (it needs the checkpoint's configs)",
    "qwen-image-2.1-turbo-controlnet-union": "its mflux code is not yet exercised here (it needs the checkpoint's "
                                             "configs)",
    # SeedVR2's windowed attention reads window shapes back from the arrays inside the network, which the
    # engine tests' stand-ins (tests/mflux_networks.py) cannot answer: MLX's CPU backend stops with SIGFPE. Until
    # a GPU run drives its generate_image (image_path, resolution), it is not served.
    "seedvr2-3b": "an upscaler whose mflux code is not yet exercised here (its attention cannot run on stand-ins)",
    "seedvr2-7b": "an upscaler whose mflux code is not yet exercised here (its attention cannot run on stand-ins)",
    "ideogram-4-fp8": "expects structured caption presets the API does not take",
    "fibo2": "renders structured JSON prompts and text images the API does not take",
    "fibo2-edit-turbo": "renders structured JSON prompts and text images the API does not take",
}


def family_named(name: str) -> Family:
    """The family with this name; KeyError when none."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)
