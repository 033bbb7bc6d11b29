"""The training dataset: a manifest read lazily, one sample at a time.

Contract with the training loop. `MSDiffusionDataset[i]` returns a dict with exactly these keys:

| key | type | meaning |
| --- | --- | --- |
| `pixel_values` | float tensor (3, H, W) in [-1, 1] | target image, resized to cover (H, W) and cropped |
| `caption` | str | the caption, untouched (the loop tokenizes; it also applies text drop) |
| `original_size` | (h, w) ints | target image size before resizing (SDXL size conditioning) |
| `crop_top_left` | (top, left) ints | crop offset in the resized image (SDXL crop conditioning) |
| `target_size` | (h, w) ints | (H, W): the resolution, or the sample's aspect-ratio bucket |
| `subject_pixel_values` | float tensor (max_subjects, 3, 224, 224) | CLIP-preprocessed references, zeros for padding |
| `subject_phrases` | list[str], length max_subjects | phrases, "" for padding |
| `subject_boxes` | float tensor (max_subjects, 4) | boxes [x0, y0, x1, y1] in [0, 1] of the crop, zeros for padding |
| `num_subjects` | int | how many of the max_subjects slots are real subjects |
| `index` | int | position of the sample in the manifest (0-based, blank lines not counted) |

`collate_subjects` stacks a list of such dicts into a batch: tensors are stacked, the size tuples and
ints become long tensors of shape (B, 2) / (B,), `caption` and `subject_phrases` stay lists.

The dataset does not tokenize and applies no drop (image / text / grounding): the training loop
does both, with its own tokenizers and RNG, so that a resumed run draws exactly what an
uninterrupted one would. The dataset's own randomness (random crops) comes from
`(seed, epoch, index)` alone, so it does not depend on worker count or sample order either; call
`set_epoch` at the start of every epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from ..subjects import IMAGE_READ_ERRORS, default_image_processor, opaque_rgb, prepare_reference_pixels
from .buckets import nearest_bucket
from .manifest import (
    DEFAULT_MAX_PROBLEMS,
    ManifestError,
    Sample,
    crop_pixels,
    iter_manifest_lines,
    manifest_files,
    parse_line,
)

CROP_MODES = ("random", "center")
# Background colours for masked references, by name (the training config's `mask_color`). The
# release multiplies a reference by its 0/1 mask, which leaves a black background.
MASK_COLORS = {"black": (0, 0, 0), "white": (255, 255, 255)}


@dataclass
class CroppedTarget:
    """A sample's target after resize and crop, and its kept subjects as (manifest index, box in the crop)."""

    sample: Sample
    where: str  # "manifest:line", for messages
    opened: dict  # images opened so far, by path (references often reuse the target)
    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    kept: list[tuple[int, list[float]]]


class MSDiffusionDataset(Dataset):
    """Samples of a JSON-lines manifest, as training tensors (see the module docstring for the keys).

    Args:
        manifest: path of the manifest (docs/data.md): a `.jsonl` file, or the `manifest-index.json` of a
            sharded one (its shards are read as one manifest, in index order).
        resolution: training size, an int for squares or (height, width).
        max_subjects: subject slots per sample; extra subjects (in manifest order) are left out.
        crop: "random" or "center" crop of the target after resizing it to cover the resolution.
        min_visible_fraction: a subject whose box keeps less than this fraction of its area inside the
            crop is dropped (one fully outside is always dropped); others have their box clipped.
        mask_references: blank the background of references that have a mask.
        mask_color: RGB colour of the blanked background: black by default, as in the release's training
            code (it multiplies the reference by its mask); `MASK_COLORS["white"]` for white.
        reference_square_size: side of the square references are squashed to before CLIP preprocessing
            (default: the larger side of `resolution`, as in training).
        image_processor: CLIP image processor (default: CLIP's standard, PIL backend).
        seed: base seed of the random crops.
        validate: check the whole manifest (schema and that files exist) when the dataset is built.
        buckets: (height, width) training sizes (e.g. `buckets.sdxl_buckets(1024)`); each image is
            trained at the one closest to its aspect ratio instead of `resolution`. Batch with
            `buckets.BucketBatchSampler(dataset.bucket_ids, ...)`. Image sizes come from the
            manifest's width/height, or from the image headers when the dataset is built.
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        resolution: int | Sequence[int] = 1024,
        max_subjects: int = 4,
        crop: str = "random",
        min_visible_fraction: float = 0.3,
        mask_references: bool = True,
        mask_color: Sequence[int] = MASK_COLORS["black"],
        reference_square_size: int | None = None,
        image_processor: Any = None,
        seed: int = 0,
        validate: bool = True,
        buckets: Sequence[Sequence[int]] | None = None,
    ):
        self.manifest = Path(manifest)
        self._files = manifest_files(self.manifest)  # raises FileNotFoundError naming what is missing
        sharded = self._files != [self.manifest]
        if isinstance(resolution, int):
            resolution = (resolution, resolution)
        if len(resolution) != 2 or min(resolution) <= 0:
            raise ValueError(f"resolution must be a positive int or (height, width), got {resolution!r}")
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        if max_subjects < 1:
            raise ValueError(f"max_subjects must be at least 1, got {max_subjects}")
        if not 0 <= min_visible_fraction <= 1:
            raise ValueError(f"min_visible_fraction must be in [0, 1], got {min_visible_fraction}")
        if len(mask_color) != 3 or not all(0 <= int(c) <= 255 for c in mask_color):
            raise ValueError(f"mask_color must be three integers in 0..255, got {mask_color!r}")
        self.target_size = (int(resolution[0]), int(resolution[1]))
        self.max_subjects = max_subjects
        self.crop = crop
        self.min_visible_fraction = min_visible_fraction
        self.mask_references = mask_references
        self.mask_color = tuple(int(c) for c in mask_color)
        self.reference_square_size = reference_square_size
        self.image_processor = image_processor if image_processor is not None else default_image_processor()
        self.seed = seed
        self.epoch = 0

        self.buckets = [(int(h), int(w)) for h, w in buckets] if buckets is not None else None
        if self.buckets is not None and (not self.buckets or min(min(b) for b in self.buckets) <= 0):
            raise ValueError(f"buckets must be a non-empty list of positive (height, width) sizes, got {buckets!r}")

        # Only byte offsets, line numbers and bucket ids stay in memory: workers forked by the
        # DataLoader share them without the copy-on-write growth that lists of Python objects cause.
        numbers, offsets, file_ids, bucket_ids, problems, total = [], [], [], [], [], 0
        file_id = {file: k for k, file in enumerate(self._files)}
        for file, number, offset, text in iter_manifest_lines(self.manifest):
            numbers.append(number)
            offsets.append(offset)
            file_ids.append(file_id[file])
            if not validate and self.buckets is None:
                continue
            sample, found = parse_line(text, number, file.parent, check_files=validate)
            if found:
                total += len(found)
                found = [replace(p, file=str(file)) for p in found] if sharded else found
                problems.extend(found[: max(0, DEFAULT_MAX_PROBLEMS - len(problems))])
            elif self.buckets is not None:
                bucket_ids.append(nearest_bucket(*_image_size(sample, f"{file}:{number}"), self.buckets))
        if problems:
            raise ManifestError(self.manifest, problems, total)
        self._line_numbers = np.array(numbers, dtype=np.int64)
        self._offsets = np.array(offsets, dtype=np.int64)
        self._file_ids = np.array(file_ids, dtype=np.int32)
        self.bucket_ids = np.array(bucket_ids, dtype=np.int64) if self.buckets is not None else None

    def __len__(self) -> int:
        return len(self._offsets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample(self, index: int) -> Sample:
        """The parsed manifest entry at `index`."""
        file = self._files[int(self._file_ids[index])]
        with open(file, "rb") as handle:
            handle.seek(int(self._offsets[index]))
            text = handle.readline().decode("utf-8", errors="replace")
        line = int(self._line_numbers[index])
        sample, problems = parse_line(text, line, file.parent, check_files=False)
        if sample is None:  # the file changed since it was validated
            raise ManifestError(file, problems)
        return sample

    def location(self, index: int) -> str:
        """`file:line` of sample `index`, for messages (its shard's file in a sharded manifest)."""
        return f"{self._files[int(self._file_ids[index])]}:{int(self._line_numbers[index])}"

    def cropped_target(self, index: int) -> "CroppedTarget":
        """Sample `index` with its target resized and cropped, and the subjects that survive the crop.

        Shared by every dataset built on this one, so they all choose the same subjects and boxes.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        sample = self.sample(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        where = self.location(index)

        target_size = self.target_size if self.buckets is None else self.buckets[self.bucket_ids[index]]
        opened = {sample.image: _open_rgb(sample.image, f"{where}: image")}  # references often reuse the target
        pixels, original_size, crop_top_left, scale = resize_and_crop(opened[sample.image], target_size, self.crop, rng)

        kept = []
        for j, subject in enumerate(sample.subjects):
            box = transform_box(
                subject.box, original_size, scale, crop_top_left, target_size, self.min_visible_fraction
            )
            if box is not None:
                kept.append((j, box))
        return CroppedTarget(
            sample, where, opened, pixels, original_size, crop_top_left, target_size, kept[: self.max_subjects]
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        target = self.cropped_target(index)
        sample, target_size = target.sample, target.target_size
        kept = [(sample.subjects[j], box) for j, box in target.kept]
        references = [
            self.reference_image(sample.subjects[j].reference, target.opened, target.where, j) for j, _ in target.kept
        ]
        subject_pixels = torch.zeros(self.max_subjects, 3, *self._clip_size())
        if references:
            square = self.reference_square_size or max(target_size)
            subject_pixels[: len(references)] = prepare_reference_pixels(references, self.image_processor, square)
        boxes = torch.zeros(self.max_subjects, 4)
        phrases = [""] * self.max_subjects
        for j, (subject, box) in enumerate(kept):
            boxes[j] = torch.tensor(box)
            phrases[j] = subject.phrase

        return {
            "pixel_values": target.pixels,
            "caption": sample.caption,
            "original_size": target.original_size,
            "crop_top_left": target.crop_top_left,
            "target_size": target_size,
            "subject_pixel_values": subject_pixels,
            "subject_phrases": phrases,
            "subject_boxes": boxes,
            "num_subjects": len(kept),
            "index": index,
        }

    def _clip_size(self) -> tuple[int, int]:
        crop_size = getattr(self.image_processor, "crop_size", None) or {"height": 224, "width": 224}
        if isinstance(crop_size, dict):
            return int(crop_size["height"]), int(crop_size["width"])
        return int(crop_size.height), int(crop_size.width)

    def reference_image(self, reference, opened: dict, where: str, j: int) -> PIL.Image.Image:
        """Subject j's reference, cropped and (with `mask_references`) masked, as training sees it."""
        what = f"{where}: subjects[{j}].reference"
        if reference.image not in opened:
            opened[reference.image] = _open_rgb(reference.image, f"{what}.image")
        image = opened[reference.image]
        box = None
        if reference.crop is not None:
            left, top, width, height = crop_pixels(reference.crop, image.size)
            box = (left, top, left + width, top + height)
        cropped = image.crop(box) if box else image
        if reference.mask is None or not self.mask_references:
            return cropped
        with PIL.Image.open(reference.mask) as mask_file:
            mask = mask_file.convert("L")
        if box and mask.size == image.size:
            mask = mask.crop(box)
        if mask.size != cropped.size:
            raise ValueError(
                f"{what}.mask: mask is {mask.size[0]}x{mask.size[1]}, expected the reference image's size "
                f"{image.size[0]}x{image.size[1]} or its crop's {cropped.size[0]}x{cropped.size[1]}"
            )
        background = PIL.Image.new("RGB", cropped.size, self.mask_color)
        return PIL.Image.composite(cropped, background, mask.point(lambda v: 255 if v >= 128 else 0))


def resize_and_crop(
    image: PIL.Image.Image, target_size: tuple[int, int], crop: str, rng: np.random.Generator
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], tuple[float, float]]:
    """Resize `image` to cover `target_size` (aspect kept) and crop it there.

    Returns the pixels in [-1, 1] (3, H, W), the original (h, w), the crop's (top, left) in the
    resized image, and the (x, y) scale factors of the resize.
    """
    width, height = image.size
    target_h, target_w = target_size
    factor = max(target_h / height, target_w / width)
    resized_w, resized_h = max(target_w, round(width * factor)), max(target_h, round(height * factor))
    if (resized_w, resized_h) != (width, height):
        image = image.resize((resized_w, resized_h), PIL.Image.BICUBIC)
    if crop == "random":
        top = int(rng.integers(0, resized_h - target_h + 1))
        left = int(rng.integers(0, resized_w - target_w + 1))
    else:
        top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    image = image.crop((left, top, left + target_w, top + target_h))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels, (height, width), (top, left), (resized_w / width, resized_h / height)


def transform_box(
    box: Sequence[float],
    original_size: tuple[int, int],
    scale: tuple[float, float],
    crop_top_left: tuple[int, int],
    target_size: tuple[int, int],
    min_visible_fraction: float = 0.0,
) -> tuple[float, float, float, float] | None:
    """Map a box of the original image into the crop; None when too little of it stays visible."""
    height, width = original_size
    top, left = crop_top_left
    target_h, target_w = target_size
    x0, x1 = (v * width * scale[0] - left for v in (box[0], box[2]))
    y0, y1 = (v * height * scale[1] - top for v in (box[1], box[3]))
    area = (x1 - x0) * (y1 - y0)
    cx0, cx1 = min(max(x0, 0.0), target_w), min(max(x1, 0.0), target_w)
    cy0, cy1 = min(max(y0, 0.0), target_h), min(max(y1, 0.0), target_h)
    visible = (cx1 - cx0) * (cy1 - cy0)
    if visible <= 0 or area <= 0 or visible / area < min_visible_fraction:
        return None
    return (cx0 / target_w, cy0 / target_h, cx1 / target_w, cy1 / target_h)


def collate_subjects(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset samples into a batch (tensors stacked, sizes as long tensors, lists kept)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    sizes = {tuple(item["target_size"]) for item in batch}
    if len(sizes) > 1:
        raise ValueError(
            f"samples of different sizes {sorted(sizes)} in one batch: with buckets, batch with "
            "msdiffusion.data.buckets.BucketBatchSampler(dataset.bucket_ids, batch_size)"
        )
    out: dict[str, Any] = {}
    for key in ("pixel_values", "subject_pixel_values", "subject_boxes"):
        out[key] = torch.stack([item[key] for item in batch])
    for key in ("original_size", "crop_top_left", "target_size", "num_subjects", "index"):
        out[key] = torch.tensor([item[key] for item in batch], dtype=torch.long)
    out["caption"] = [item["caption"] for item in batch]
    out["subject_phrases"] = [list(item["subject_phrases"]) for item in batch]
    if any("bad_samples" in item for item in batch):  # unreadable samples the training loader skipped
        out["bad_samples"] = [message for item in batch for message in item.get("bad_samples", ())]
    return out


def _image_size(sample: Sample, where: str) -> tuple[int, int]:
    """(width, height) of the target, from the manifest when it says, else from the image header."""
    if sample.width is not None and sample.height is not None:
        return sample.width, sample.height
    try:
        with PIL.Image.open(sample.image) as image:
            return image.size
    except IMAGE_READ_ERRORS as error:
        raise ValueError(f"{where}: image: cannot read {sample.image} as an image ({error})") from error


class SampleReadError(ValueError):
    """An image of a manifest sample that cannot be read; the message starts with `manifest:line`."""


def _open_rgb(path: Path, what: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as opened:
            return opaque_rgb(opened)
    except FileNotFoundError:
        raise SampleReadError(f"{what}: file not found: {path}") from None
    except IMAGE_READ_ERRORS as error:
        raise SampleReadError(f"{what}: cannot read {path} as an image ({error})") from None
