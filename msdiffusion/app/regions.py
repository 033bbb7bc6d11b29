"""A subject's region painted on the page's canvas: decoded within fixed bounds (`decode_region`), written
into the visitor's folder as the subject's `mask` image (`write_region`, `regions_to_masks`), and a mask
image or polygon of an imported job turned back into what the canvas holds (`region_data_url`)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from msdiffusion.app.page_limits import PageError

# A painted region arrives as a PNG data URL of the canvas's mask (opaque = the region), painted at the output's
# size shrunk to fit REGION_SIDE: it is refused beyond that size or MAX_REGION_BYTES, before being decoded.
REGION_PREFIX = "data:image/png;base64,"
REGION_SIDE = 1024
MAX_REGION_BYTES = 2 * 1024 * 1024

# The mask images `write_region` names: the subject's phrase and a hash of the region (a region painted anew
# gets a new file, so an earlier PNG's record still names its own).
REGION_NAME = re.compile(r"region-[a-z0-9-]{1,40}-[0-9a-f]{12}\.png")


def decode_region(text: str | None, slot: int):
    """A subject's painted region as the canvas sends it (a PNG data URL; opaque pixels, or white ones in a
    picture without transparency, are the region) as an (H, W) bool array; None for an empty field.

    Anything else is refused with one line naming the subject (`slot`): text over `MAX_REGION_BYTES`, a PNG
    over `REGION_SIDE` a side (read from its header, before decoding), malformed data, an empty region."""
    import base64
    import binascii
    import io

    import numpy as np
    import PIL.Image

    text = (text or "").strip()
    if not text:
        return None
    fix = "press Clear region and paint it again"
    if not text.startswith(REGION_PREFIX):
        raise PageError(f"region: not a painted region (a PNG data URL); {fix}.", slot)
    if len(text) - len(REGION_PREFIX) > MAX_REGION_BYTES * 4 // 3 + 4:
        raise PageError(
            f"region: {len(text)} characters; a painted region is at most {MAX_REGION_BYTES // 2**20} MB of PNG.",
            slot,
        )
    try:
        data = base64.b64decode(text[len(REGION_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise PageError(f"region: its data is not base64; {fix}.", slot) from None
    try:
        with PIL.Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if max(image.size) > REGION_SIDE:
                raise PageError(
                    f"region: {image.width}x{image.height} pixels; a painted region is at most {REGION_SIDE} a side.",
                    slot,
                )
            alpha = image.getchannel("A") if "A" in image.getbands() else image.convert("L")
            region = np.asarray(alpha) >= 128
    except PageError:
        raise
    except PIL.Image.DecompressionBombError:  # PIL's own limit, hundreds of megapixels: read from the header too
        raise PageError(f"region: over {REGION_SIDE} pixels a side; a painted region is at most that.", slot) from None
    except (OSError, SyntaxError, ValueError, PIL.UnidentifiedImageError):
        raise PageError(f"region: not a PNG the page can read; {fix}.", slot) from None
    if not region.any():
        raise PageError("region: nothing is painted; paint the region, or press Clear region.", slot)
    return region


def region_data_url(region) -> str:
    """A region (an (H, W) bool array) as the canvas holds it: a PNG data URL, white and opaque in the region."""
    import base64
    import io

    import numpy as np
    import PIL.Image

    rgba = np.zeros((*region.shape, 4), np.uint8)
    rgba[region] = 255
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", optimize=True)
    return REGION_PREFIX + base64.b64encode(buffer.getvalue()).decode()


def _region_shape(size: list[int] | tuple[int, int]) -> tuple[int, int]:
    """(height, width) the canvas paints an output of `size` (width, height) at: within `REGION_SIDE`."""
    width, height = size
    scale = min(1.0, REGION_SIDE / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def write_region(region, size: tuple[int, int], folder: Path, phrase: str) -> str | None:
    """The region stretched over an output of `size` (width, height) and written into `folder` as a mask image
    (white = the region); returns its path, or None when nothing of it is left at that size. The name is the
    phrase and a hash of the mask."""
    import io

    import numpy as np
    import PIL.Image

    mask = PIL.Image.fromarray(region.astype(np.uint8) * 255, "L").resize(tuple(size), PIL.Image.Resampling.NEAREST)
    if mask.getbbox() is None:
        return None
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    data = buffer.getvalue()
    slug = re.sub(r"[^a-z0-9]+", "-", phrase.lower()).strip("-")[:40] or "subject"
    path = folder / f"region-{slug}-{hashlib.sha256(data).hexdigest()[:12]}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(path)


def regions_to_masks(subjects: list[dict], size: tuple[int, int] | None, folder: Path) -> list[dict]:
    """The subjects with each painted region decoded (`decode_region`) and, where the output's `size` is known,
    written into `folder` as the subject's `mask` image at that size; the subjects' dicts are left as they were."""
    out = []
    for slot, subject in enumerate(subjects):
        region = decode_region(subject.get("region"), slot)
        subject = dict(subject)
        if region is not None and size is not None:
            subject["mask"] = write_region(region, size, folder, (subject.get("phrase") or "").strip())
            if subject["mask"] is None:
                raise PageError("region: too little is painted to show at the output's size; paint more of it.", slot)
        out.append(subject)
    return out


def region_of_mask_file(path: str) -> str:
    """A mask image of this visitor's (`VisitorFiles.find_region`) as the canvas holds it (`region_data_url`)."""
    import numpy as np
    import PIL.Image

    with PIL.Image.open(path) as mask:
        grey = mask.convert("L")
        height, width = _region_shape(grey.size)
        return region_data_url(np.asarray(grey.resize((width, height), PIL.Image.Resampling.NEAREST)) >= 128)


def region_of_polygon(polygon: list, size: list[int]) -> str:
    """A polygon mask of [x, y] fractions, rasterised as the pipelines do, as the canvas holds a region."""
    from msdiffusion.subjects import rasterise_polygon

    height, width = _region_shape(size)
    return region_data_url(rasterise_polygon(polygon, height, width).numpy())
