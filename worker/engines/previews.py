"""Previews of an image while it forms: a cheap linear projection of the latents to RGB, no VAE decode.

The FLUX.1 VAE's 16 latent channels (also used by Z-Image, FIBO and the other FLUX-VAE families) map to
RGB with the least-squares factors ComfyUI's latent previewer uses for Flux. Other latent layouts get the
first three channels, normalised: a rough but honest picture of where the image is going.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

PREVIEW_SIDE = 256  # the preview's longer side, in pixels, at most

# Rows: latent channel; columns: R, G, B (ComfyUI comfy/latent_formats.py, class Flux).
FLUX_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.1082, -0.1045),
)
FLUX_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def channels_last(latents: Any, height: int, width: int) -> Any | None:
    """The latents as (rows, columns, channels) at 1/8 of the image size, or None for a layout we do not know."""
    shape = tuple(latents.shape)
    rows, columns = height // 16, width // 16
    if len(shape) == 3 and shape[0] == 1 and shape[1] == rows * columns and shape[2] % 4 == 0:
        # mflux packs FLUX latents (1, C, 2R, 2C) into 2×2 patches: (1, R·C, C·4) with index c·4 + dy·2 + dx.
        channels = shape[2] // 4
        grid = latents.reshape(rows, columns, channels, 2, 2).transpose(0, 3, 1, 4, 2)
        return grid.reshape(rows * 2, columns * 2, channels)
    if len(shape) == 4 and shape[0] == 1:  # unpacked (1, C, H, W)
        return latents[0].transpose(1, 2, 0)
    if len(shape) == 5 and shape[0] == 1:  # video-style (1, C, T, H, W) as Qwen-Image's VAE keeps them
        return latents[0, :, 0].transpose(1, 2, 0)
    return None


def latent_preview(latents: Any, height: int, width: int) -> Image.Image | None:
    """A small RGB picture of the current latents, or None when their layout is unknown."""
    import mlx.core as mx
    import numpy as np

    grid = channels_last(latents, height, width)
    if grid is None or grid.shape[-1] < 3:
        return None
    grid = grid.astype(mx.float32)
    if grid.shape[-1] == len(FLUX_RGB_FACTORS):
        rgb = grid @ mx.array(FLUX_RGB_FACTORS) + mx.array(FLUX_RGB_BIAS)
        rgb = (rgb + 1.0) / 2.0
    else:
        rgb = grid[..., :3]
        low, high = rgb.min(), rgb.max()
        rgb = (rgb - low) / mx.maximum(high - low, 1e-6)
    pixels = np.array(mx.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    return shrink(Image.fromarray(pixels, "RGB"))


def shrink(image: Image.Image) -> Image.Image:
    """At most PREVIEW_SIDE on the longer side (a box-filter reduce when the factor is whole: 6× cheaper)."""
    if max(image.size) <= PREVIEW_SIDE:
        return image
    factor = max(image.size) / PREVIEW_SIDE
    if factor.is_integer():
        return image.reduce(int(factor))
    scale = 1 / factor
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BILINEAR, reducing_gap=2.0)


def revealed(pattern: Image.Image, done: int, total: int) -> Image.Image:
    """The synthetic engine's preview: its final pattern, shown down to the fraction of steps done."""
    factor = max(max(pattern.size) / PREVIEW_SIDE, 1.0)
    size = (max(1, round(pattern.width / factor)), max(1, round(pattern.height / factor)))
    rows = round(size[1] * done / max(total, 1))
    shown = Image.new("RGB", size, (24, 24, 24))
    if rows:
        # Only the part shown is shrunk, so a preview costs what it reveals (benchmark 1 holds it under 1%).
        top = pattern.crop((0, 0, pattern.width, min(pattern.height, round(rows * factor)))).convert("RGB")
        if factor.is_integer() and top.height % int(factor) == 0:
            top = top.reduce(int(factor))
        else:
            top = top.resize((size[0], rows), Image.Resampling.BILINEAR)
        shown.paste(top, (0, 0))
    return shown
