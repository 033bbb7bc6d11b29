"""Subject inputs: reading reference images, checking boxes and region masks, and CLIP reference preprocessing.

A *subject* is one thing to draw: one or more reference images of it, the phrase that names it in
the prompt, a box in the output image, optionally a region mask of any shape (which then confines
it in place of the box), and optionally its own scale.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

ImageInput = Union[PIL.Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]
Box = tuple[float, float, float, float]
# A subject's region of any shape: a mask (white = the region) of any size, stretched over the output
# image like a box's fractions, or a polygon of (x, y) fractions of the output image.
Polygon = tuple[tuple[float, float], ...]
MaskInput = Union[ImageInput, Sequence[Sequence[float]]]

# The released weights were trained with at most this many subjects per image.
TRAINED_MAX_SUBJECTS = 4
# Inference-time size of the square the references are squashed to before CLIP preprocessing.
REFERENCE_SQUARE_SIZE = 512
# A reference with a side under one patch of the released image encoder (ViT-bigG/14) is enlarged
# to the square above and carries almost nothing of its subject: most likely the wrong file or crop.
MIN_REFERENCE_SIDE = 14


@dataclass
class Subject:
    images: list[PIL.Image.Image]
    phrase: str
    box: Box = (0.0, 0.0, 0.0, 0.0)  # what the grounding resampler reads; the region too, unless a mask is given
    scale: float | None = None
    # The region the subject's tokens act in, in place of the box: an (H, W) bool tensor of any size,
    # or a polygon (rasterised at the output size by `region_mask`). Not compared: tensors have no `==`.
    mask: torch.Tensor | Polygon | None = field(default=None, compare=False)

    @property
    def has_box(self) -> bool:
        return any(self.box)

    def region_mask(self, height: int, width: int) -> torch.Tensor | None:
        """The subject's region mask as an (H, W) bool tensor (a polygon rasterised at `height x width`),
        or None when the box is its region."""
        if self.mask is None or isinstance(self.mask, torch.Tensor):
            return self.mask
        return rasterise_polygon(self.mask, height, width)


# What opening an image file can raise when the file is not a readable image. DecompressionBombError
# (over twice Pillow's pixel limit) is neither an OSError nor a ValueError, so it is named here.
IMAGE_READ_ERRORS = (OSError, SyntaxError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError)


# EXIF's orientation tag; its values 5 to 8 turn the picture a quarter, so its stored width is its shown height.
EXIF_ORIENTATION = 0x0112
QUARTER_TURNS = (5, 6, 7, 8)


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` turned as its EXIF orientation says. Cameras store photos as shot and say how to turn them;
    browsers, viewers and diffusers' `load_image` show them turned, so a box drawn on what the user sees
    must be read on the turned pixels."""
    return PIL.ImageOps.exif_transpose(image)


def upright_size(image: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) of `image` as `upright` turns it, read from the header alone."""
    width, height = image.size
    return (height, width) if image.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS else (width, height)


def opaque_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` in RGB with its transparent pixels black.

    PIL's `convert("RGB")` drops the alpha channel and keeps whatever colour a file stores under
    transparent pixels: black in most tools, the original photo or white in others, while every
    viewer shows them as background. Black is what a cut-out subject looks like to the model (the
    release's training multiplies each reference by its mask), and a mask painted on transparency
    stays a mask.
    """
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(image: ImageInput, what: str = "image") -> PIL.Image.Image:
    """Return `image` as an RGB PIL image (a file turned upright, transparent pixels black: `opaque_rgb`);
    `what` names it in error messages."""
    if isinstance(image, PIL.Image.Image):
        return opaque_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"{what}: file not found: {path!r}. Give an existing image file.")
        try:
            with PIL.Image.open(path) as opened:
                return opaque_rgb(upright(opened))
        except IMAGE_READ_ERRORS as error:
            raise ValueError(f"{what}: cannot read {path!r} as an image ({error}).") from error
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.transpose(1, 2, 0)
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            if array.size and (array.min() < 0 or array.max() > 1):
                raise ValueError(
                    f"{what}: float arrays must hold values in [0, 1]; got [{array.min()}, {array.max()}]."
                )
            array = (array * 255).round().astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"{what}: expected an HxW, HxWx3 or HxWx4 array, got shape {tuple(array.shape)}.")
        return opaque_rgb(PIL.Image.fromarray(array))
    raise TypeError(f"{what}: expected a PIL image, a path, a numpy array or a tensor, got {type(image).__name__}.")


def check_box(box: Any, what: str = "box") -> Box:
    """Validate one `[x0, y0, x1, y1]` box in [0, 1]; all zeros means "no box"."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected four numbers [x0, y0, x1, y1], got {box!r}.") from None
    if len(values) != 4:
        raise ValueError(f"{what}: expected four numbers [x0, y0, x1, y1], got {len(values)}: {box!r}.")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: coordinates must be finite numbers, got {box!r}.")
    if not any(values):
        return (0.0, 0.0, 0.0, 0.0)
    x0, y0, x1, y1 = values
    if min(values) < 0 or max(values) > 1:
        raise ValueError(
            f"{what}: {list(values)} is outside [0, 1]. Boxes are fractions of the output image "
            "(divide pixel coordinates by the width and height); all zeros means no box."
        )
    if x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"{what}: {list(values)} is empty or reversed; a box is [x0, y0, x1, y1] with x1 > x0 and y1 > y0."
        )
    return values  # type: ignore[return-value]


def check_mask(mask: Any, what: str = "mask") -> torch.Tensor | Polygon:
    """A subject's region: an image, array or tensor of any size (white, i.e. >= 50% grey, is the
    region) -> an (H, W) bool tensor; a polygon of (x, y) fractions -> a tuple of points."""
    if _is_polygon(mask):
        return check_polygon(mask, what)
    if isinstance(mask, (str, os.PathLike)):
        mask = load_image(mask, what)
    if isinstance(mask, PIL.Image.Image):
        region = torch.from_numpy(np.asarray(mask.convert("L")) >= 128)
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        if isinstance(mask, torch.Tensor):  # numpy has no bfloat16: floating tensors are read in float32
            mask = mask.detach().cpu()
            array = (mask.float() if mask.is_floating_point() else mask).numpy()
        else:
            array = np.asarray(mask)
        array = np.squeeze(array) if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]) else array
        if array.ndim == 3 and array.shape[-1] in (3, 4):  # a colour picture: its grey level, as PIL gives it
            return check_mask(load_image(array, what), what)
        if array.ndim != 2:
            raise ValueError(f"{what}: expected an HxW mask (or HxWx1, 1xHxW, HxWx3), got shape {tuple(array.shape)}.")
        if array.dtype == np.bool_:
            region = torch.from_numpy(array.copy())
        elif array.dtype == np.uint8:
            region = torch.from_numpy(array >= 128)
        else:
            dtype, array = array.dtype, array.astype(np.float64)
            if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
                raise ValueError(
                    f"{what}: a {dtype} mask must hold values in [0, 1] (1 = the region; uint8 masks 0 to 255), "
                    f"got [{array.min()}, {array.max()}]."
                )
            region = torch.from_numpy(array >= 0.5)
    else:
        raise TypeError(
            f"{what}: expected a mask image (PIL image, path, numpy array or tensor; white = the region) or a polygon "
            f"as a list of (x, y) fractions, got {type(mask).__name__}."
        )
    if not region.any():
        raise ValueError(
            f"{what}: the mask is empty (no pixel is white). Give a mask whose region is white, or None to use the box."
        )
    return region


def _is_polygon(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(point, (list, tuple)) for point in value)


def check_polygon(points: Any, what: str = "polygon") -> Polygon:
    """Validate a polygon: three or more (x, y) fractions of the output image, enclosing some area."""
    try:
        polygon = tuple((float(x), float(y)) for x, y in points)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: a polygon is a list of (x, y) pairs of numbers, got {points!r}.") from None
    if len(polygon) < 3:
        raise ValueError(f"{what}: a polygon needs at least 3 points, got {len(polygon)}.")
    values = [v for point in polygon for v in point]
    if not all(math.isfinite(v) for v in values) or min(values) < 0 or max(values) > 1:
        raise ValueError(
            f"{what}: polygon points are (x, y) fractions of the output image in [0, 1], got {[list(p) for p in polygon]}."
        )
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1])) / 2
    if area == 0:
        raise ValueError(f"{what}: the polygon encloses no area (its points lie on one line).")
    return polygon


def rasterise_polygon(polygon: Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """(height, width) bool mask of the pixels whose centres lie inside `polygon` (even-odd rule), so
    that a rectangle on pixel edges covers exactly its pixels."""
    xs = np.array([p[0] for p in polygon], dtype=np.float64) * width
    ys = np.array([p[1] for p in polygon], dtype=np.float64) * height
    x0, y0, x1, y1 = xs, ys, np.roll(xs, -1), np.roll(ys, -1)
    centres = np.arange(height, dtype=np.float64)[:, None] + 0.5
    # An edge crosses a row when the row's centre is in [low, high) of its ends: a vertex counts once.
    crosses = (centres >= np.minimum(y0, y1)) & (centres < np.maximum(y0, y1))  # (H, edges)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = np.where(crosses, x0 + (centres - y0) / (y1 - y0) * (x1 - x0), np.inf)
    at.sort(axis=1)
    mask = np.zeros((height, width), dtype=bool)
    for row, xs_row in enumerate(at):
        xs_row = xs_row[np.isfinite(xs_row)]
        for start, stop in zip(xs_row[::2], xs_row[1::2]):  # pixel c is inside when start <= c + 0.5 < stop
            mask[row, max(0, math.ceil(start - 0.5)) : max(0, math.ceil(stop - 0.5))] = True
    return torch.from_numpy(mask)


def mask_bounding_box(mask: torch.Tensor | Polygon) -> Box:
    """The box `[x0, y0, x1, y1]` (fractions) around a region mask's pixels, or around a polygon's points."""
    if not isinstance(mask, torch.Tensor):
        xs, ys = [p[0] for p in mask], [p[1] for p in mask]
        return (min(xs), min(ys), max(xs), max(ys))
    height, width = mask.shape
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    # pixel edges as fractions: a mask that is a box's rectangle on pixel edges gives that box back
    return (
        int(cols[0]) / width,
        int(rows[0]) / height,
        (int(cols[-1]) + 1) / width,
        (int(rows[-1]) + 1) / height,
    )


def default_image_processor():
    """CLIP's standard preprocessing (shortest side 224 bicubic, centre crop 224, CLIP mean/std)."""
    try:  # transformers >= 5: the PIL backend matches the released (PIL-based) preprocessing
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class()


def prepare_reference_pixels(
    images: Sequence[PIL.Image.Image], image_processor, square_size: int = REFERENCE_SQUARE_SIZE
) -> torch.Tensor:
    """Squash each reference to a `square_size` square (aspect not kept, as in training), then CLIP-preprocess."""
    squares = [image.convert("RGB").resize((square_size, square_size), PIL.Image.BICUBIC) for image in images]
    return image_processor(images=squares, return_tensors="pt").pixel_values


def _is_image_like(value: Any) -> bool:
    return isinstance(value, (PIL.Image.Image, str, os.PathLike, np.ndarray, torch.Tensor))


def _subject_images(entry: Any, what: str) -> list[PIL.Image.Image]:
    if _is_image_like(entry):
        return [load_image(entry, what)]
    if isinstance(entry, (list, tuple)):
        if not entry:
            raise ValueError(f"{what}: an empty list of images; give at least one reference image.")
        return [load_image(image, f"{what}[{k}]") for k, image in enumerate(entry)]
    raise TypeError(f"{what}: expected an image, a path, or a list of them, got {type(entry).__name__}.")


def _per_prompt(value: Any, num_prompts: int, name: str, shared: bool) -> list[Any]:
    if value is None:
        return [None] * num_prompts
    if shared:
        return [value] * num_prompts
    if not isinstance(value, (list, tuple)) or len(value) != num_prompts:
        raise ValueError(
            f"`{name}` must hold one list per prompt ({num_prompts} prompts), got "
            f"{len(value) if isinstance(value, (list, tuple)) else type(value).__name__}."
        )
    return list(value)


def build_subjects(
    num_prompts: int,
    subject_images: Any,
    subject_phrases: Any,
    subject_boxes: Any = None,
    subject_scales: Any = None,
    batched: bool = False,
    subject_masks: Any = None,
) -> list[list[Subject]]:
    """Check the user's subject arguments and return one list of subjects per prompt.

    With `batched=False` the arguments describe the subjects of every prompt. With `batched=True`
    (the prompt was a list) `subject_phrases` decides: a list of strings is shared by all prompts,
    a list of lists gives each prompt its own subjects (their counts may differ).

    A subject with a mask and no box gets the mask's bounding box: the grounding resampler reads a box.
    """
    if subject_phrases is None or subject_images is None:
        raise ValueError("Subjects need both `subject_images` and `subject_phrases` (one phrase per subject).")
    if isinstance(subject_phrases, str):
        raise TypeError("`subject_phrases` must be a list of phrases, e.g. ['dog', 'cat'], not a single string.")
    shared = not batched or all(isinstance(p, str) for p in subject_phrases)
    if batched and not shared and not all(isinstance(p, (list, tuple)) for p in subject_phrases):
        raise TypeError("`subject_phrases` must be a list of phrases, or one list of phrases per prompt.")

    per_prompt = []
    columns = {
        "subject_images": _per_prompt(subject_images, num_prompts, "subject_images", shared),
        "subject_phrases": _per_prompt(subject_phrases, num_prompts, "subject_phrases", shared),
        "subject_boxes": _per_prompt(subject_boxes, num_prompts, "subject_boxes", shared),
        "subject_scales": _per_prompt(subject_scales, num_prompts, "subject_scales", shared),
        "subject_masks": _per_prompt(subject_masks, num_prompts, "subject_masks", shared),
    }
    for p in range(num_prompts):
        images, phrases = columns["subject_images"][p], columns["subject_phrases"][p]
        boxes, scales = columns["subject_boxes"][p], columns["subject_scales"][p]
        masks = columns["subject_masks"][p]
        where = "" if shared else f" (prompt {p})"
        if masks is not None and not isinstance(masks, (list, tuple)):
            raise TypeError(
                f"`subject_masks`{where} must be a list with one entry per subject (a mask, a polygon or None), "
                f"got {type(masks).__name__}."
            )
        if _is_image_like(images):
            images = [images]
        counts = {"subject_images": len(images), "subject_phrases": len(phrases)}
        if boxes is not None:
            counts["subject_boxes"] = len(boxes)
        if scales is not None:
            counts["subject_scales"] = len(scales)
        if masks is not None:
            counts["subject_masks"] = len(masks)
        if len(set(counts.values())) != 1:
            listed = ", ".join(f"{k}={v}" for k, v in counts.items())
            raise ValueError(f"Subject counts differ{where}: {listed}. Give one entry per subject in each.")
        subjects = []
        for j, phrase in enumerate(phrases):
            label = f"subject {j}{where}"
            if not isinstance(phrase, str) or not phrase.strip():
                raise ValueError(f"{label}: phrase must be a non-empty string naming it in the prompt, got {phrase!r}.")
            box = check_box(boxes[j], f"{label} box") if boxes is not None else (0.0, 0.0, 0.0, 0.0)
            scale = None
            if scales is not None and scales[j] is not None:
                scale = float(scales[j])
                if not math.isfinite(scale):
                    raise ValueError(f"{label}: scale must be a finite number, got {scales[j]!r}.")
            mask = None
            if masks is not None and masks[j] is not None:
                mask = check_mask(masks[j], f"{label} mask")
                if not any(box):
                    box = mask_bounding_box(mask)
            references = _subject_images(images[j], f"{label} image")
            for image in references:
                if min(image.size) < MIN_REFERENCE_SIDE:
                    warnings.warn(
                        f"{label} image: {image.width}x{image.height} pixels, under {MIN_REFERENCE_SIDE} on a side; "
                        "it is enlarged to the reference square and carries almost nothing of the subject. "
                        "Give a larger picture of it.",
                        stacklevel=3,
                    )
            subjects.append(Subject(references, phrase, box, scale, mask))
        if len(subjects) > TRAINED_MAX_SUBJECTS:
            warnings.warn(
                f"{len(subjects)} subjects{where}: the released weights were trained with at most "
                f"{TRAINED_MAX_SUBJECTS}; quality may drop.",
                stacklevel=3,
            )
        per_prompt.append(subjects)
    return per_prompt


def encode_reference_images(
    image_encoder, pixels: Sequence[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIP features of each subject's references: the penultimate hidden state, all tokens.

    `pixels[i]` is (k_i, 3, H, W) for subject i. Several references of one subject are read
    together: their tokens are concatenated, padded across subjects, and a (S, L) mask marks the
    real ones (None when every subject has one reference, the released case).
    """
    counts = [p.shape[0] for p in pixels]
    batch = torch.cat(list(pixels)).to(device, image_encoder.dtype)
    hidden = image_encoder(batch, output_hidden_states=True).hidden_states[-2]
    per_subject = [h.reshape(-1, hidden.shape[-1]) for h in hidden.split(counts)]
    if len(set(counts)) == 1:
        return torch.stack(per_subject), None
    length = max(t.shape[0] for t in per_subject)
    features = hidden.new_zeros(len(per_subject), length, hidden.shape[-1])
    mask = torch.zeros(len(per_subject), length, dtype=torch.bool, device=hidden.device)
    for i, tokens in enumerate(per_subject):
        features[i, : tokens.shape[0]] = tokens
        mask[i, : tokens.shape[0]] = True
    return features, mask


def encode_phrases(tokenizer, text_encoder, phrases: Sequence[str], device: torch.device) -> torch.Tensor:
    """Phrase embeddings: the first text encoder's pooled output of each phrase (padded to max length)."""
    ids = tokenizer(
        list(phrases), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(device)).pooler_output
