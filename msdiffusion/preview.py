"""Pictures of a layout: boxes and phrases drawn over an image, and attention maps as images."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

# Distinct, readable colours for up to eight subjects (then they repeat).
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
]
LABEL_SIZE = 13
# Fonts tried for labels, widest coverage first: CJK-capable fonts of Linux, macOS and Windows, then
# broad Latin/Greek/Cyrillic/Arabic/Hebrew ones. MSDIFF_FONT (a .ttf/.otf/.ttc path) comes before all.
# No font ships with the package (a CJK font is tens of MB); without any of these, Pillow's own
# font draws what it can and the rest shows as boxes.
FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/unifont/unifont.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/meiryo.ttc",
    "C:/Windows/Fonts/malgun.ttf",
    "C:/Windows/Fonts/arial.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
)


@functools.cache
def _fonts(size: int) -> tuple:
    """The available candidate fonts at `size`, in order, then Pillow's default."""
    paths = [os.environ.get("MSDIFF_FONT", ""), *FONT_CANDIDATES]
    fonts = []
    for path in paths:
        if path and os.path.isfile(path):
            try:
                fonts.append(PIL.ImageFont.truetype(path, size))
            except OSError:  # not a font file after all
                continue
    fonts.append(PIL.ImageFont.load_default(size))
    return tuple(fonts)


def _missing_glyph(font) -> bytes:
    return bytes(font.getmask("\uffff"))  # a noncharacter: every font draws its "missing" glyph


def covers(font, text: str) -> bool:
    """Whether `font` has a glyph for every visible character of `text`."""
    missing = _missing_glyph(font)
    return all(ch.isspace() or bytes(font.getmask(ch)) != missing for ch in set(text))


def label_font(text: str, size: int = LABEL_SIZE):
    """The first font that can draw all of `text` (Chinese, Japanese, Cyrillic, ...); else the widest one found."""
    fonts = _fonts(size)
    for font in fonts:
        if covers(font, text):
            return font
    return fonts[0]


def draw_layout(
    image: PIL.Image.Image,
    boxes: Sequence[Sequence[float]],
    phrases: Sequence[str],
    width: int | None = None,
    regions: Sequence[np.ndarray | None] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    repainted: np.ndarray | None = None,
) -> PIL.Image.Image:
    """A copy of `image` with each subject's box (fractions of the image) outlined and labelled.

    Images smaller than 256 px (the world's 64 px ones) are enlarged, pixels kept square, so that
    the labels stay readable. `regions`: per subject, an (h, w) boolean map of where auto layout
    placed it (or None); a subject without a box is shown by its region, tinted in its colour and
    labelled "(auto)". `masks`: per subject, its region mask (or None), tinted in its colour.
    `repainted`: an (H, W) map in [0, 1] of what inpainting repaints; the kept part is dimmed.
    """
    canvas = image.convert("RGB").copy()
    if min(canvas.size) < 256:
        factor = -(-256 // min(canvas.size))
        canvas = canvas.resize((canvas.width * factor, canvas.height * factor), PIL.Image.NEAREST)
    line = width or max(2, round(min(canvas.size) / 128))
    if repainted is not None:
        kept = PIL.Image.fromarray(((1 - np.clip(repainted, 0, 1)) * 140).round().astype(np.uint8), mode="L")
        canvas = PIL.Image.composite(PIL.Image.new("RGB", canvas.size), canvas, kept.resize(canvas.size))
    for j, mask in enumerate(masks or []):
        if mask is not None and np.asarray(mask).any():
            canvas = _tint(canvas, np.asarray(mask, dtype=bool), PALETTE[j % len(PALETTE)])
    for j, region in enumerate(regions or []):
        if region is None or any(boxes[j]) or not np.asarray(region).any():
            continue
        canvas = _tint(canvas, np.asarray(region, dtype=bool), PALETTE[j % len(PALETTE)])
    draw = PIL.ImageDraw.Draw(canvas)
    for j, (box, phrase) in enumerate(zip(boxes, phrases)):
        colour = PALETTE[j % len(PALETTE)]
        label = f"{j + 1}: {phrase}"  # numbered from 1, as the page's subjects are
        if any(box):
            x0, y0, x1, y1 = (v * s for v, s in zip(box, (canvas.width, canvas.height) * 2))
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=line)
        elif regions is not None and j < len(regions) and regions[j] is not None and np.asarray(regions[j]).any():
            rows, cols = np.nonzero(np.asarray(regions[j]))
            h, w = np.asarray(regions[j]).shape
            x0, y0 = cols.min() * canvas.width / w, rows.min() * canvas.height / h
            label += " (auto)"
        else:
            continue
        font = label_font(label)
        left, top, right, bottom = draw.textbbox((x0 + line, y0 + line), label, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=colour)
        draw.text((x0 + line, y0 + line), label, fill=(255, 255, 255), font=font)
    return canvas


def _tint(
    canvas: PIL.Image.Image, region: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.4
) -> PIL.Image.Image:
    """`canvas` with `region` (any grid; scaled to the image, nearest) blended towards `colour`."""
    mask = PIL.Image.fromarray(region.astype(np.uint8) * round(255 * alpha), mode="L").resize(
        canvas.size, PIL.Image.NEAREST
    )
    return PIL.Image.composite(PIL.Image.new("RGB", canvas.size, colour), canvas, mask)


def attention_map_image(attention_map, size: tuple[int, int]) -> PIL.Image.Image:
    """An (h, w) map in [0, 1] as a greyscale image of `size` (width, height), nearest-neighbour so cells stay visible."""
    array = np.asarray(attention_map.detach().float().cpu() if hasattr(attention_map, "detach") else attention_map)
    grey = PIL.Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8), mode="L")
    return grey.resize(size, PIL.Image.NEAREST)


def subjects_sheet(
    references: Sequence[PIL.Image.Image | Sequence[PIL.Image.Image]],
    phrases: Sequence[str],
    result: PIL.Image.Image,
    height: int = 256,
    picture: PIL.Image.Image | None = None,
) -> PIL.Image.Image:
    """One picture of a run: each subject's references (all of its photos, labelled) and the picture it
    started from, if any (with the subjects' regions drawn on it), beside the result."""
    pad, label_h = 8, 18
    groups = []
    for photos in references:
        photos = [photos] if isinstance(photos, PIL.Image.Image) else list(photos)
        # Several photos of one subject share the thumbnail height; they sit side by side, one label under them.
        thumbs = []
        for image in photos:
            scale = (height - label_h) / image.height
            thumbs.append(
                image.convert("RGB").resize((max(1, round(image.width * scale)), height - label_h), PIL.Image.BICUBIC)
            )
        groups.append(thumbs)
    result = result.convert("RGB").resize((round(result.width * height / result.height), height), PIL.Image.BICUBIC)
    if picture is not None:
        picture = picture.convert("RGB").resize(
            (round(picture.width * height / picture.height), height), PIL.Image.BICUBIC
        )
    group_widths = [sum(t.width for t in thumbs) + 2 * (len(thumbs) - 1) for thumbs in groups]
    width = pad + sum(w + pad for w in group_widths) + 3 * pad + result.width + pad
    width += picture.width + 2 * pad if picture is not None else 0
    sheet = PIL.Image.new("RGB", (width, height + 2 * pad), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(sheet)
    x = pad
    for j, (thumbs, phrase, group_width) in enumerate(zip(groups, phrases, group_widths)):
        tx = x
        for thumb in thumbs:
            sheet.paste(thumb, (tx, pad))
            tx += thumb.width + 2
        label = f"{j + 1}: {phrase}" + (f" ({len(thumbs)} photos)" if len(thumbs) > 1 else "")
        draw.text((x, pad + height - label_h + 2), label, fill=PALETTE[j % len(PALETTE)], font=label_font(label))
        x += group_width + pad
    if picture is not None:
        sheet.paste(picture, (x + pad, pad))
        x += picture.width + 2 * pad
    arrow = label_font("->")
    draw.text((x + pad // 2, pad + height // 2 - 6), "->", fill=(0, 0, 0), font=arrow)
    sheet.paste(result, (x + 3 * pad, pad))
    return sheet
