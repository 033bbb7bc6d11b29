"""Pictures of a layout: boxes and phrases drawn over an image, and attention maps as images."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

# Distinct, readable colours for up to eight subjects (then they repeat).
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def draw_layout(
    image: PIL.Image.Image, boxes: Sequence[Sequence[float]], phrases: Sequence[str], width: int | None = None
) -> PIL.Image.Image:
    """A copy of `image` with each subject's box (fractions of the image) outlined and labelled.

    Images smaller than 256 px (the world's 64 px ones) are enlarged, pixels kept square, so that
    the labels stay readable.
    """
    canvas = image.convert("RGB").copy()
    if min(canvas.size) < 256:
        factor = -(-256 // min(canvas.size))
        canvas = canvas.resize((canvas.width * factor, canvas.height * factor), PIL.Image.NEAREST)
    draw = PIL.ImageDraw.Draw(canvas)
    line = width or max(2, round(min(canvas.size) / 128))
    font = PIL.ImageFont.load_default()
    for j, (box, phrase) in enumerate(zip(boxes, phrases)):
        if not any(box):
            continue
        colour = PALETTE[j % len(PALETTE)]
        x0, y0, x1, y1 = (v * s for v, s in zip(box, (canvas.width, canvas.height) * 2))
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=line)
        label = f"{j}: {phrase}"
        left, top, right, bottom = draw.textbbox((x0 + line, y0 + line), label, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=colour)
        draw.text((x0 + line, y0 + line), label, fill=(255, 255, 255), font=font)
    return canvas


def attention_map_image(attention_map, size: tuple[int, int]) -> PIL.Image.Image:
    """An (h, w) map in [0, 1] as a greyscale image of `size` (width, height), nearest-neighbour so cells stay visible."""
    array = np.asarray(attention_map.detach().float().cpu() if hasattr(attention_map, "detach") else attention_map)
    grey = PIL.Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8), mode="L")
    return grey.resize(size, PIL.Image.NEAREST)


def subjects_sheet(
    references: Sequence[PIL.Image.Image], phrases: Sequence[str], result: PIL.Image.Image, height: int = 256
) -> PIL.Image.Image:
    """One picture of a run: each subject's reference (labelled) beside the result with its layout."""
    pad, label_h = 8, 16
    thumbs = []
    for image in references:
        scale = (height - label_h) / image.height
        thumbs.append(image.convert("RGB").resize((max(1, round(image.width * scale)), height - label_h), PIL.Image.BICUBIC))
    result = result.convert("RGB").resize((round(result.width * height / result.height), height), PIL.Image.BICUBIC)
    width = pad + sum(t.width + pad for t in thumbs) + 3 * pad + result.width + pad
    sheet = PIL.Image.new("RGB", (width, height + 2 * pad), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(sheet)
    font = PIL.ImageFont.load_default()
    x = pad
    for j, (thumb, phrase) in enumerate(zip(thumbs, phrases)):
        sheet.paste(thumb, (x, pad))
        draw.text((x, pad + thumb.height + 2), f"{j}: {phrase}", fill=PALETTE[j % len(PALETTE)], font=font)
        x += thumb.width + pad
    draw.text((x + pad // 2, pad + height // 2 - 6), "->", fill=(0, 0, 0), font=font)
    sheet.paste(result, (x + 3 * pad, pad))
    return sheet
