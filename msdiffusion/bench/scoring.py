"""Scores for benchmark images.

Whole-image scores (as in the paper and DreamBooth): CLIP-T (prompt vs image), CLIP-I and DINO
(reference vs image, cosine of embeddings, averaged over a subject's reference photos and over the
subjects of a sample).

Per-subject scores, because whole-image CLIP-I hides a missing or merged subject: an open-vocabulary
detector (`msdiffusion.data.detection.OpenVocabularyDetector`, the one `msdiff data build` uses) is asked
for each subject's class, detections are thinned by per-class non-maximum suppression, each subject is
matched to one detection of its class (one detection per subject, preferring the one that best overlaps
the box it was asked for), and
- `detected`: whether it was found at all;
- `iou`: the overlap of that detection with the requested box (the layout score);
- `clip_i` / `dino`: the crop of that detection scored against the subject's references.
Subjects whose box covers (nearly) the whole image are backgrounds (MS-Bench scenes): a detector
cannot localise "a mountain in the background", so they are scored on the whole image and left out
of the detection rate and the layout score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import PIL.Image

from ..boxes import box_area, box_iou
from ..data import DEFAULT_DETECTOR

if TYPE_CHECKING:  # torch is imported where it is used, so that `msdiff --help` stays instant
    import torch

    from ..data.detection import Detection, OpenVocabularyDetector

# DreamBooth's protocol, which defines DreamBench's metrics: CLIP ViT-B/32 for CLIP-T and CLIP-I, DINO
# ViT-S/16 for DINO with DINO's evaluation preprocessing (short side to 256, centre crop 224). The
# MS-Diffusion paper's own choice of backbones could not be verified (docs/benchmark.md).
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
# How images reach DINO: "resize-crop" (short side to 256 bicubic, centre crop 224: DINO's evaluation
# transform and DreamBooth's) or "squash" (the model's own processor: stretched to 224 x 224).
DINO_PREPROCESSING = ("resize-crop", "squash")
DINO_RESIZE, DINO_CROP = 256, 224  # for a 224-px model; other input sizes keep the 256 : 224 ratio
BACKGROUND_BOX_AREA = 0.9  # a box covering at least this fraction of the image marks a background subject
NMS_IOU = 0.5  # open-vocabulary detectors return several boxes per object; keep one


@dataclass(frozen=True)
class ScoringConfig:
    clip_model: str = DEFAULT_CLIP_MODEL
    dino_model: str = DEFAULT_DINO_MODEL
    detector: str = DEFAULT_DETECTOR
    detection_threshold: float | None = None  # None: the detector family's default (data.detection.DEFAULT_THRESHOLDS)
    dino_preprocessing: str = "resize-crop"

    def to_dict(self) -> dict:
        return asdict(self)


def is_background(box: Sequence[float]) -> bool:
    return box_area(box) >= BACKGROUND_BOX_AREA


def non_max_suppression(detections: Sequence[Detection], iou_threshold: float = NMS_IOU) -> list[Detection]:
    """Best first, the detections that overlap no better one of the same phrase by IoU `iou_threshold` or more."""
    kept: list[Detection] = []
    for detection in sorted(detections, key=lambda d: -d.score):
        if all(k.phrase != detection.phrase or box_iou(detection.box, k.box) < iou_threshold for k in kept):
            kept.append(detection)
    return kept


def match_subjects(
    phrases: Sequence[str], boxes: Sequence[Sequence[float]], detections: Sequence[Detection]
) -> list[Detection | None]:
    """One detection (or None) per subject. Detections of a subject's phrase are candidates; pairs are
    taken greedily by overlap with the requested box, then detector score, each detection used once,
    so two subjects of the same class need two separate detections (a merged pair counts one miss)."""
    pairs = []
    for j, (phrase, box) in enumerate(zip(phrases, boxes)):
        for d, detection in enumerate(detections):
            if detection.phrase == phrase:
                pairs.append((box_iou(box, detection.box), detection.score, j, d))
    pairs.sort(key=lambda pair: (-pair[0], -pair[1], pair[2]))
    matched: list[Detection | None] = [None] * len(phrases)
    used: set[int] = set()
    for _, _, j, d in pairs:
        if matched[j] is None and d not in used:
            matched[j] = detections[d]
            used.add(d)
    return matched


def crop(image: PIL.Image.Image, box: Sequence[float]) -> PIL.Image.Image:
    """The pixels of `box` (fractions of the image), at least one pixel wide and high."""
    width, height = image.size
    x0, y0 = min(round(box[0] * width), width - 1), min(round(box[1] * height), height - 1)
    x1, y1 = max(round(box[2] * width), x0 + 1), max(round(box[3] * height), y0 + 1)
    return image.crop((x0, y0, x1, y1))


# --- models ---------------------------------------------------------------------------------------


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _features(output) -> torch.Tensor:
    import torch

    # transformers < 5 returns a tensor from get_*_features, >= 5 an output whose pooler_output is projected
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _embed(items: Sequence, batch_size: int, embed_chunk) -> torch.Tensor:
    """`embed_chunk` over `items` in batches, without autograd; L2-normalised float32 rows on the CPU."""
    import torch

    with torch.inference_mode():
        chunks = [embed_chunk(list(chunk)).float().cpu() for chunk in _batches(items, batch_size)]
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


class ClipEmbedder:
    """CLIP image and text embeddings (L2-normalised, float32, on the CPU)."""

    def __init__(self, model_id: str, device: str, batch_size: int = 32):
        from transformers import AutoProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(model_id).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model_id)
        self.device, self.batch_size = device, batch_size

    def images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        def embed(chunk):
            pixels = self.processor(images=chunk, return_tensors="pt").pixel_values.to(self.device)
            return _features(self.model.get_image_features(pixel_values=pixels))

        return _embed(images, self.batch_size, embed)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        def embed(chunk):
            tokens = self.processor(text=chunk, padding=True, truncation=True, return_tensors="pt").to(self.device)
            return _features(self.model.get_text_features(**tokens))

        return _embed(texts, self.batch_size, embed)


def resize_and_centre_crop(image: PIL.Image.Image, resize: int = DINO_RESIZE, crop: int = DINO_CROP) -> PIL.Image.Image:
    """DINO's evaluation transform: the short side to `resize` (bicubic, aspect kept), then the central
    `crop` x `crop` square (sizes and offsets rounded as torchvision's Resize / CenterCrop do)."""
    width, height = image.size
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    image = image.resize(size, PIL.Image.BICUBIC)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


class DinoEmbedder:
    """Self-supervised ViT embeddings: the final CLS token, as DreamBooth's DINO score uses.

    `preprocessing="resize-crop"` (default) keeps the aspect ratio: short side to 256, centre crop
    224, then the model's normalisation; "squash" uses the model's processor as is (for ViT
    checkpoints: stretched to 224 x 224, which changes cosines of non-square photos markedly).
    """

    def __init__(self, model_id: str, device: str, batch_size: int = 32, preprocessing: str = "resize-crop"):
        if preprocessing not in DINO_PREPROCESSING:
            raise ValueError(
                f"DINO preprocessing must be one of {', '.join(DINO_PREPROCESSING)}, got {preprocessing!r}."
            )
        self.preprocessing = preprocessing
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        config = AutoConfig.from_pretrained(model_id)
        # DINO v1 checkpoints have no pooler; asking ViTModel for one would add random weights
        extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        self.model = AutoModel.from_pretrained(model_id, **extra).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model_id)
        self.device, self.batch_size = device, batch_size

    def pixels(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """The model's input for `images` (N, 3, H, W), float32 on the CPU."""
        import numpy as np
        import torch

        if self.preprocessing == "squash":
            return self.processor(images=list(images), return_tensors="pt").pixel_values
        mean = np.asarray(self.processor.image_mean, dtype=np.float32)
        std = np.asarray(self.processor.image_std, dtype=np.float32)
        crop = int(getattr(self.model.config, "image_size", DINO_CROP))
        resize = crop * DINO_RESIZE // DINO_CROP
        arrays = [
            (np.asarray(resize_and_centre_crop(i.convert("RGB"), resize, crop), dtype=np.float32) / 255 - mean) / std
            for i in images
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        def embed(chunk):
            pixels = self.pixels(chunk).to(self.device)
            return self.model(pixel_values=pixels).last_hidden_state[:, 0]

        return _embed(images, self.batch_size, embed)


@dataclass
class Scorers:
    clip: ClipEmbedder
    dino: DinoEmbedder
    detector: OpenVocabularyDetector
    config: ScoringConfig

    @classmethod
    def load(cls, config: ScoringConfig, device: str | None = None, batch_size: int = 32) -> Scorers:
        from ..data.detection import OpenVocabularyDetector
        from ..loading import default_device

        device = device or default_device()
        # float32, as every score here; a quarter of the embedders' batch, as detectors take larger inputs
        detector = OpenVocabularyDetector(
            config.detector, device, threshold=config.detection_threshold, batch_size=max(1, batch_size // 4)
        )
        # record the threshold actually used, so scores say what they were computed with
        config = replace(config, detection_threshold=detector.threshold)
        clip = ClipEmbedder(config.clip_model, device, batch_size)
        dino = DinoEmbedder(config.dino_model, device, batch_size, config.dino_preprocessing)
        return cls(clip, dino, detector, config)


# --- scoring manifest records ---------------------------------------------------------------------


def _load_rgb(path: Path) -> PIL.Image.Image:
    from msdiffusion.subjects import load_image  # the same RGB conversion the pipeline applies to references

    return load_image(path, what=str(path))


class ReferenceCache:
    """CLIP and DINO embeddings of reference photos, computed once per file."""

    def __init__(self, scorers: Scorers):
        self.scorers, self.clip, self.dino = scorers, {}, {}

    def ensure(self, paths: Iterable[Path]) -> None:
        new = [p for p in dict.fromkeys(paths) if p not in self.clip]
        if new:
            images = [_load_rgb(p) for p in new]
            for path, c, d in zip(new, self.scorers.clip.images(images), self.scorers.dino.images(images)):
                self.clip[path], self.dino[path] = c, d


def score_records(
    records: Sequence[dict],
    run_dir: Path,
    scorers: Scorers,
    images_dir: Path | None = None,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    on_scored: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Score manifest records (see `runner.py`); returns one score record per generated image.

    `on_scored` is called after each batch with the records scored so far (to save progress)."""
    run_dir = Path(run_dir)
    references = ReferenceCache(scorers)
    results = []
    for chunk in _batches(list(records), batch_size):
        results.extend(_score_chunk(chunk, run_dir, images_dir, scorers, references))
        if progress:
            progress(len(chunk))
        if on_scored:
            on_scored(results)
    return results


def _reference_paths(record: dict, images_dir: Path | None) -> list[list[Path]]:
    root = Path(images_dir) if images_dir is not None else Path(record["images_dir"])
    paths = []
    for subject in record["subjects"]:
        files = [root / f for f in subject["references"]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{record['sample_id']}: reference image(s) not found: {', '.join(missing)}. "
                "Pass the benchmark's images directory with --images."
            )
        paths.append(files)
    return paths


def _score_chunk(chunk, run_dir, images_dir, scorers: Scorers, references: ReferenceCache) -> list[dict]:
    images = [_load_rgb(run_dir / record["image"]) for record in chunk]
    subject_refs = [_reference_paths(record, images_dir) for record in chunk]
    references.ensure(p for refs in subject_refs for paths in refs for p in paths)

    image_clip = scorers.clip.images(images)
    image_dino = scorers.dino.images(images)
    text_clip = scorers.clip.texts([record["prompt"] for record in chunk])

    queries = [
        list(dict.fromkeys(s["phrase"] for s in record["subjects"] if not is_background(s["box"]))) for record in chunk
    ]
    detections = [non_max_suppression(found) for found in scorers.detector(images, queries)]

    # crops of matched detections, embedded in one batch; backgrounds use the whole image
    crops, crop_owner, matches = [], [], []
    for i, record in enumerate(chunk):
        phrases = [s["phrase"] for s in record["subjects"]]
        boxes = [s["box"] for s in record["subjects"]]
        foreground = [j for j, box in enumerate(boxes) if not is_background(box)]
        matched = match_subjects([phrases[j] for j in foreground], [boxes[j] for j in foreground], detections[i])
        per_subject: list[Detection | None] = [None] * len(boxes)
        for j, detection in zip(foreground, matched):
            per_subject[j] = detection
            if detection is not None:
                crops.append(crop(images[i], detection.box))
                crop_owner.append((i, j))
        matches.append(per_subject)
    crop_clip = scorers.clip.images(crops) if crops else None
    crop_dino = scorers.dino.images(crops) if crops else None
    crop_index = {owner: k for k, owner in enumerate(crop_owner)}

    results = []
    for i, record in enumerate(chunk):
        subjects = []
        for j, subject in enumerate(record["subjects"]):
            refs = subject_refs[i][j]
            entry = {"name": subject["name"], "phrase": subject["phrase"], "box": subject["box"]}
            entry["clip_i"] = mean_cosine(image_clip[i], [references.clip[p] for p in refs])
            entry["dino"] = mean_cosine(image_dino[i], [references.dino[p] for p in refs])
            if is_background(subject["box"]):
                entry.update(
                    background=True, detected=None, iou=None, crop_clip_i=entry["clip_i"], crop_dino=entry["dino"]
                )
            else:
                detection = matches[i][j]
                entry.update(background=False, detected=detection is not None)
                if detection is None:
                    entry.update(detection=None, detection_score=None, iou=0.0, crop_clip_i=None, crop_dino=None)
                else:
                    k = crop_index[(i, j)]
                    entry.update(
                        detection=[round(v, 4) for v in detection.box],
                        detection_score=round(detection.score, 4),
                        iou=box_iou(detection.box, subject["box"]),
                        crop_clip_i=mean_cosine(crop_clip[k], [references.clip[p] for p in refs]),
                        crop_dino=mean_cosine(crop_dino[k], [references.dino[p] for p in refs]),
                    )
            subjects.append(entry)
        results.append(
            {
                "image": record["image"],
                "sample_id": record["sample_id"],
                "group": record["group"],
                "index": record["index"],
                "clip_t": float(image_clip[i] @ text_clip[i]),
                "clip_i": sum(s["clip_i"] for s in subjects) / len(subjects),
                "dino": sum(s["dino"] for s in subjects) / len(subjects),
                "subjects": subjects,
            }
        )
    return results


def mean_cosine(embedding: torch.Tensor, references: Sequence[torch.Tensor]) -> float:
    """Mean cosine of a unit-length embedding with unit-length reference embeddings (CLIP-I, DINO)."""
    import torch

    return float((torch.stack(list(references)) @ embedding).mean())
