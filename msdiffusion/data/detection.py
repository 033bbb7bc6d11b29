"""Open-vocabulary detection and segmentation of caption phrases, and the filters of `msdiff data build`.

Detectors come from transformers: OWLv2 / OWL-ViT (`Owlv2ForObjectDetection`, default
`google/owlv2-base-patch16-ensemble`) or Grounding DINO; SAM (`SamModel`, default
`facebook/sam-vit-base`) turns boxes into masks. Each is given as a hub id or a local folder.
`OpenVocabularyDetector` is the project's one detector: `msdiff data build` finds subjects with it,
and the benchmark's per-subject scores (`msdiffusion.bench.scoring`) look for generated subjects with it.

Image processors: transformers 5 picks the torchvision backend when torchvision is installed and
the PIL one (`Owlv2ImageProcessorPil`, `SamImageProcessorPil`, `GroundingDinoImageProcessorPil`)
otherwise, so `AutoProcessor` works without torchvision. Only SAM's automatic mask generation
(not used here) needs torchvision. OWLv2's PIL backend resizes with scipy (the `data` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import PIL.Image
import torch

from ..boxes import box_iou
from . import DEFAULT_DETECTOR
from .manifest import Box

# Per detector family (the config's model_type): the score above which a detection counts by default,
# each family's documented default.
DEFAULT_THRESHOLDS = {"owlv2": 0.1, "owlvit": 0.1, "grounding-dino": 0.35, "mm-grounding-dino": 0.35}
# The data build's default minimum score per family: a wrong box in training data teaches the adapter to
# draw the wrong subject there, so OWL's is above its counting default; Grounding DINO's documented box
# threshold is strict already (its scores run higher than OWL's).
SUBJECT_SCORE_THRESHOLDS = {"owlv2": 0.2, "owlvit": 0.2, "grounding-dino": 0.35, "mm-grounding-dino": 0.35}


@dataclass(frozen=True)
class Detection:
    """One box the detector found for a query phrase."""

    phrase: str
    box: Box  # [x0, y0, x1, y1] fractions of the image
    score: float

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


@dataclass(frozen=True)
class SubjectFilter:
    """Which detections become subjects (see `select_subjects`)."""

    score_threshold: float = 0.2
    min_box_area: float = 0.01
    max_box_area: float = 0.9
    max_overlap: float = 0.5
    max_subjects: int = 4

    def __post_init__(self):
        if not 0 <= self.min_box_area <= self.max_box_area <= 1:
            raise ValueError(
                f"box areas must satisfy 0 <= min_box_area <= max_box_area <= 1 (fractions of the image), "
                f"got {self.min_box_area} and {self.max_box_area}"
            )
        if not 0 <= self.max_overlap <= 1:
            raise ValueError(f"max_overlap is an IoU in [0, 1], got {self.max_overlap}")
        if self.max_subjects < 1:
            raise ValueError(f"max_subjects must be at least 1, got {self.max_subjects}")


def best_per_phrase(detections: Sequence[Detection], rules: SubjectFilter) -> dict[str, Detection]:
    """The highest-scoring detection of each phrase among those passing the score and area limits."""
    best: dict[str, Detection] = {}
    for detection in detections:
        if detection.score < rules.score_threshold:
            continue
        if not rules.min_box_area <= detection.area <= rules.max_box_area or detection.area <= 0:
            continue
        current = best.get(detection.phrase)
        if current is None or detection.score > current.score:
            best[detection.phrase] = detection
    return best


def select_subjects(detections: Sequence[Detection], rules: SubjectFilter) -> list[Detection]:
    """One box per phrase, filtered, without heavy overlaps, best first, at most `max_subjects`.

    Per phrase the best detection that passes the score threshold and the area limits is taken;
    then, from the most to the least confident, a subject whose box overlaps an already kept one
    with IoU above `max_overlap` is dropped (two subjects fighting over one region teach the model
    nothing about layout).
    """
    kept: list[Detection] = []
    for candidate in sorted(best_per_phrase(detections, rules).values(), key=lambda d: -d.score):
        if all(box_iou(candidate.box, other.box) <= rules.max_overlap for other in kept):
            kept.append(candidate)
        if len(kept) == rules.max_subjects:
            break
    return kept


def _clipped(box: Sequence[float], width: int, height: int) -> Box | None:
    """A pixel box as fractions of the image, clipped to it; None if less than a pixel wide or high inside.

    OWLv2 sees images padded to a square, so some of its boxes lie in the padding, outside the image.
    """
    x0, x1 = (min(max(float(v), 0.0), width) for v in (box[0], box[2]))
    y0, y1 = (min(max(float(v), 0.0), height) for v in (box[1], box[3]))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def _load_error(what: str, name: str, error: Exception) -> ValueError:
    return ValueError(
        f"cannot load the {what} {name!r} ({type(error).__name__}: {error}). Give a hub id (downloaded once "
        "into the Hugging Face cache) or a local folder saved with save_pretrained (model + processor)."
    )


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def detector_family(model: str) -> str:
    """The detector's family (its config's model_type), read from its config alone."""
    from transformers import AutoConfig

    try:
        family = AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError, KeyError) as error:
        raise _load_error("detector", model, error) from error
    if family not in DEFAULT_THRESHOLDS:
        raise ValueError(
            f"detector {model!r} is a {family!r} model; supported: OWL-ViT, OWLv2, Grounding DINO "
            f"(e.g. {DEFAULT_DETECTOR!r} or 'IDEA-Research/grounding-dino-base')."
        )
    return family


class OpenVocabularyDetector:
    """Boxes for text queries, with OWLv2 / OWL-ViT or Grounding DINO from transformers.

    `threshold` (default: the family's, `DEFAULT_THRESHOLDS`) applies where a call gives none;
    `batch_size` is the number of images (OWL) or image-query pairs (Grounding DINO) per forward pass.
    """

    def __init__(
        self,
        model: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        threshold: float | None = None,
        batch_size: int = 8,
    ):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if batch_size < 1:
            raise ValueError(f"the detector's batch size must be at least 1, got {batch_size}")
        family = detector_family(model)
        dtype = dtype or torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model, dtype=dtype)
        except (OSError, ValueError, KeyError) as error:
            raise _load_error("detector", model, error) from error
        self.model.to(device).eval()
        self.family = family
        self.threshold = DEFAULT_THRESHOLDS[family] if threshold is None else threshold
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def __call__(
        self, images: Sequence[PIL.Image.Image], phrases: Sequence[Sequence[str]], threshold: float | None = None
    ) -> list[list[Detection]]:
        """Each image's detections of its phrases scoring above `threshold`; boxes in [0, 1] of the image."""
        threshold = self.threshold if threshold is None else threshold
        if self.family.startswith("owl"):
            # OWL scores every box against every query of its image in one pass.
            jobs = [(i, list(dict.fromkeys(p))) for i, p in enumerate(phrases) if p]
            run = self._owl
        else:
            # Grounding DINO labels a box with spans of one prompt text, which cannot always be told apart
            # ("red ball. ball."); one phrase per pass makes every box that phrase's.
            jobs = [(i, [phrase]) for i, p in enumerate(phrases) for phrase in dict.fromkeys(p)]
            run = self._grounding_dino
        results: list[list[Detection]] = [[] for _ in images]
        for chunk in _batches(jobs, self.batch_size):
            batch_images = [images[i].convert("RGB") for i, _ in chunk]
            found = run(batch_images, [queries for _, queries in chunk], threshold)
            for (i, _), detections in zip(chunk, found):
                results[i].extend(detections)
        return results

    def _inputs(self, **kwargs) -> dict[str, torch.Tensor]:
        inputs = self.processor(return_tensors="pt", **kwargs)
        return {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }

    def _forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        outputs = self.model(**inputs)
        # Post-processed in float32: bf16 keeps about 3 significant digits, too few for pixel boxes.
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        return outputs

    def _owl(self, images: list[PIL.Image.Image], phrases: list[list[str]], threshold: float) -> list[list[Detection]]:
        # The processor pads each image's queries to the batch's longest list; padding queries take no part
        # in a box's best query, so an image's detections do not depend on the images batched with it.
        max_length = self.model.config.text_config.max_position_embeddings
        inputs = self._inputs(text=phrases, images=images, padding="max_length", truncation=True, max_length=max_length)
        outputs = self._forward(inputs)
        for k, queries in enumerate(phrases):
            outputs.logits[k, :, len(queries) :] = torch.finfo(outputs.logits.dtype).min
        # Boxes come back as fractions of the model's square input and are scaled to pixels here, not with
        # `target_sizes`, whose meaning for OWLv2 changed across transformers versions (image or padded square).
        # OWLv2 pads the image to a square at the bottom and right: a box is a fraction of that square (what
        # lies in the padding is clipped off). OWL-ViT stretches the image to the square: a fraction of the image.
        processed = self.processor.post_process_grounded_object_detection(outputs, threshold=threshold)
        found = []
        for result, queries, image in zip(processed, phrases, images):
            width, height = image.size
            scale_x, scale_y = (max(width, height),) * 2 if self.family == "owlv2" else (width, height)
            detections = []
            for score, label, (x0, y0, x1, y1) in zip(
                result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()
            ):
                box = _clipped((x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y), width, height)
                if label < len(queries) and box is not None:
                    detections.append(Detection(queries[label], box, score))
            found.append(detections)
        return found

    def _grounding_dino(
        self, images: list[PIL.Image.Image], phrases: list[list[str]], threshold: float
    ) -> list[list[Detection]]:
        # Grounding DINO expects lower-case prompts ending with a dot.
        prompts = [queries[0].strip().rstrip(".").lower() + "." for queries in phrases]
        inputs = self._inputs(text=prompts, images=images, padding=True)
        outputs = self._forward(inputs)
        sizes = [(image.height, image.width) for image in images]
        processed = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=threshold, text_threshold=threshold, target_sizes=sizes
        )
        found = []
        for result, queries, (height, width) in zip(processed, phrases, sizes):
            boxes = (_clipped(box, width, height) for box in result["boxes"].tolist())
            found.append(
                [
                    Detection(queries[0], box, score)
                    for box, score in zip(boxes, result["scores"].tolist())
                    if box is not None
                ]
            )
        return found


class BoxSegmenter:
    """Masks of boxed objects with SAM (`SamModel` + `SamProcessor` from transformers)."""

    def __init__(self, model: str, device: str = "cpu", dtype: torch.dtype | None = None):
        from transformers import SamModel, SamProcessor

        dtype = dtype or torch.float32
        try:
            self.processor = SamProcessor.from_pretrained(model)
            self.model = SamModel.from_pretrained(model, dtype=dtype)
        except (OSError, ValueError, KeyError) as error:
            raise _load_error("segmenter", model, error) from error
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, images: Sequence[PIL.Image.Image], boxes: Sequence[Sequence[Box]]) -> list[list[np.ndarray]]:
        """For each image, one boolean (H, W) mask per box (boxes as fractions of the image)."""
        results: list[list[np.ndarray]] = [[] for _ in images]
        todo = [i for i, b in enumerate(boxes) if b]
        if not todo:
            return results
        # SAM batches need as many boxes in every image: pad with copies of the first box, ignored below.
        count = max(len(boxes[i]) for i in todo)
        pixel_boxes = []
        for i in todo:
            width, height = images[i].size
            own = [[b[0] * width, b[1] * height, b[2] * width, b[3] * height] for b in boxes[i]]
            pixel_boxes.append(own + [own[0]] * (count - len(own)))
        inputs = self.processor(
            images=[images[i].convert("RGB") for i in todo], input_boxes=pixel_boxes, return_tensors="pt"
        )
        original_sizes, reshaped_sizes = inputs["original_sizes"], inputs["reshaped_input_sizes"]
        model_inputs = {
            "pixel_values": inputs["pixel_values"].to(self.device, self.dtype),
            "input_boxes": inputs["input_boxes"].to(self.device, self.dtype),
        }
        outputs = self.model(**model_inputs, multimask_output=False)
        masks = self.processor.image_processor.post_process_masks(
            outputs.pred_masks.float().cpu(), original_sizes, reshaped_sizes
        )
        for i, image_masks in zip(todo, masks):
            results[i] = [image_masks[k, 0].numpy() for k in range(len(boxes[i]))]
        return results
