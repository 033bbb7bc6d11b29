"""The part of a picture that inpainting repaints when the subjects say where: the union of their
regions (boxes or masks) grown by a margin, and a feathered edge for pasting the picture back.

Pixel-level geometry only; the pipelines hand the region to diffusers as its `mask_image` and paste
the picture back through the feathered alpha, so that outside the region the output *is* the picture.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .layout import box_regions
from .subjects import Subject

# Fractions of the output's shorter side: about 20 pixels of each at 1024.
DEFAULT_MARGIN = 0.02
DEFAULT_FEATHER = 0.02


def subjects_region(subjects: list[Subject], height: int, width: int) -> torch.Tensor:
    """(H, W) bool: every pixel inside some subject's region (its mask, else its box)."""
    region = torch.zeros(height, width, dtype=torch.bool)
    for subject in subjects:
        mask = subject.region_mask(height, width)
        if mask is None:
            region |= box_regions(torch.tensor([subject.box]), height, width).reshape(height, width)
        else:
            if mask.shape != (height, width):  # stretched over the output, as its attention regions are
                mask = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0] > 0.5
            region |= mask.to("cpu", torch.bool)
    return region


def grow(region: torch.Tensor, pixels: int) -> torch.Tensor:
    """(H, W) bool region grown by `pixels` in every direction (a square neighbourhood)."""
    if pixels <= 0:
        return region
    grown = F.max_pool2d(region[None, None].float(), 2 * pixels + 1, stride=1, padding=pixels)
    return grown[0, 0] > 0


def whole_cells(region: torch.Tensor, cell: int) -> torch.Tensor:
    """(H, W) bool: every `cell x cell` block the region touches, whole. diffusers samples its latent mask
    at one pixel per block (nearest); with whole blocks no touched latent cell is kept by mistake."""
    height, width = region.shape
    touched = F.max_pool2d(region[None, None].float(), cell, stride=cell, ceil_mode=True)
    return F.interpolate(touched, scale_factor=cell, mode="nearest")[0, 0, :height, :width] > 0


def feathered(region: torch.Tensor, pixels: int) -> torch.Tensor:
    """(H, W) float alpha: 0 outside the region (exactly), rising to 1 over about `pixels` inside its edge.

    The region is eroded by half the width and blurred by the same square: the blurred support is the
    region's opening, which lies inside the region, so nothing outside it is ever touched."""
    alpha = region[None, None].float()
    radius = pixels // 2
    if radius < 1:
        return alpha[0, 0]
    size = 2 * radius + 1
    # Replicate padding: the picture's border is not the region's edge.
    eroded = -F.max_pool2d(-F.pad(alpha, (radius,) * 4, mode="replicate"), size, stride=1)
    return F.avg_pool2d(F.pad(eroded, (radius,) * 4, mode="replicate"), size, stride=1)[0, 0]


def margin_pixels(fraction: float, height: int, width: int) -> int:
    """A margin or feather width given as a fraction of the shorter side, in whole pixels."""
    return round(fraction * min(height, width))


def paste_outside(generated: torch.Tensor, picture: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1]: `generated` where alpha is 1, `picture` where it is 0, mixed between."""
    return alpha * generated + (1 - alpha) * picture


class RepaintRegion:
    """One inpainting call's repainted part and the paste that keeps the rest: the `mask_image` given, or
    else the union of the subjects' regions grown by `margin` (both fractions of the shorter side).

    `keep_outside` pastes the picture back through the mask feathered by `feather`, so that outside the
    repainted part the output equals the input picture (resized to the output) exactly; without it the
    kept part is the picture's VAE round trip, as in diffusers. None: paste when the region is the
    subjects' (a given mask then behaves as in diffusers)."""

    def __init__(self, pipeline, mask_image: Any, keep_outside: bool | None, margin: float, feather: float):
        for name, value in (("repaint_margin", margin), ("repaint_feather", feather)):
            if not 0 <= value <= 0.5:
                raise ValueError(f"{name} must be in [0, 0.5] (a fraction of the output's shorter side), got {value}.")
        self.pipeline, self.mask_image = pipeline, mask_image
        self.margin, self.feather = margin, feather
        self.keep_outside = (mask_image is None) if keep_outside is None else keep_outside
        self.asked_to_keep = keep_outside is True
        self.alpha: torch.Tensor | None = None  # (rows, 1, H, W) once made from the subjects

    def from_subjects(self, subjects: list[list[Subject]], height: int, width: int, repeats: int, kwargs: dict) -> None:
        """Set `kwargs["mask_image"]` to the subjects' regions when no mask was given (one row per prompt,
        each repeated for its images)."""
        if self.mask_image is not None:
            return
        margin = margin_pixels(self.margin, height, width)
        regions = []
        for row in subjects:
            region = grow(subjects_region(row, height, width), margin)
            if not region.any():
                raise ValueError(
                    "No subject has a box or a mask, so there is nothing to repaint: give the subjects boxes or masks, "
                    "or give mask_image (white = repaint)."
                )
            regions.append(region)
        if all(torch.equal(region, regions[0]) for region in regions[1:]):
            regions = regions[:1]  # one region for every prompt: diffusers repeats it
        cell = self.pipeline.vae_scale_factor
        masks = torch.stack([whole_cells(region, cell) for region in regions])[:, None].float()
        feather = margin_pixels(self.feather, height, width)
        alpha = torch.stack([feathered(region, feather) for region in regions])[:, None]
        if len(regions) > 1:
            masks, alpha = masks.repeat_interleave(repeats, 0), alpha.repeat_interleave(repeats, 0)
        kwargs["mask_image"] = masks
        self.alpha = alpha

    def paste(self, images: Any, kwargs: dict) -> tuple[Any, torch.Tensor | None]:
        """The output's images with the picture pasted back outside the repainted part, and the (B, 1, H, W)
        alpha used (how much of each pixel is generated); the images as they are and None when not keeping it."""
        output_type = kwargs.get("output_type", "pil")
        if not self.keep_outside:
            return images, None
        if output_type == "latent":
            if self.asked_to_keep:
                raise ValueError("keep_outside needs decoded images: use output_type 'pil', 'np' or 'pt'.")
            return images, None
        processor = self.pipeline.image_processor
        height, width = kwargs["height"], kwargs["width"]
        picture = processor.preprocess(kwargs["image"], height=height, width=width)
        if picture.shape[1] != 3:
            if self.asked_to_keep:
                raise ValueError("keep_outside needs the picture as an image, not as latents.")
            return images, None
        picture = ((picture.to(torch.float32) + 1) / 2).clamp(0, 1)
        alpha = self.alpha
        if alpha is None:  # a given mask: binarised as diffusers does, then feathered
            masks = self.pipeline.mask_processor.preprocess(self.mask_image, height=height, width=width)
            feather = margin_pixels(self.feather, height, width)
            alpha = torch.stack([feathered(mask[0] > 0.5, feather) for mask in masks])[:, None]
        if isinstance(images, list):  # PIL
            generated = torch.from_numpy(processor.pil_to_numpy(images)).permute(0, 3, 1, 2)
        elif isinstance(images, np.ndarray):
            generated = torch.from_numpy(images).permute(0, 3, 1, 2)
        else:
            generated = images.detach().to("cpu", torch.float32)
        count = generated.shape[0]
        # Like diffusers, fewer pictures or masks than images are tiled over the batch.
        picture = picture.repeat(count // picture.shape[0], 1, 1, 1)
        alpha = alpha.repeat(count // alpha.shape[0], 1, 1, 1)
        kept = paste_outside(generated.float(), picture, alpha)
        if isinstance(images, list):
            images = processor.numpy_to_pil(kept.permute(0, 2, 3, 1).numpy())
        elif isinstance(images, np.ndarray):
            images = kept.permute(0, 2, 3, 1).numpy().astype(images.dtype)
        else:
            images = kept.to(images.device, images.dtype)
        return images, alpha
