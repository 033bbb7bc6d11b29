"""`msdiff data build`: a training manifest from captioned images or video clips.

For every captioned image: subject phrases from the caption (`phrases.py`), their boxes from an
open-vocabulary detector, filtered (`detection.select_subjects`), optionally SAM masks for the
reference crops; then one manifest line. Stills use the target image itself as the reference (a
crop of it); clips take the target from the middle frame and the references from the first frame,
so the model cannot learn to copy pixels (the paper's video recipe).

Sources:
- a folder of images, each with a sidecar caption `NAME.txt` (searched recursively);
- a captions file: `.jsonl` (one {"image", "caption"[, "phrases"]} a line), `.json` (a list of such
  objects, or {image: caption}) or `.csv` (header with image,caption[,phrases]; phrases separated
  by ";"); image paths are relative to the file's folder;
- with `video=True`, the same but each "image" is a folder of frames (sorted by name): a folder
  of clip folders, captions in `CLIP/caption.txt` or `CLIP.txt`, or a captions file naming them.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import PIL.Image

from .detection import Detection, SubjectFilter, best_per_phrase, select_subjects
from .manifest import Reference, Sample, SubjectRecord, crop_pixels, phrase_occurrences
from .phrases import extract_noun_phrases, find_vocabulary_phrases

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST_NAME = "manifest.jsonl"
# A SAM mask covering less than this fraction of its crop is treated as a failure and not written.
MIN_MASK_FRACTION = 0.02


@dataclass
class SourceItem:
    """One captioned target, and where its references come from."""

    image: Path
    caption: str
    reference_image: Path
    phrases: list[str] | None = None  # given by the captions file; otherwise extracted from the caption


@dataclass
class BuildReport:
    items: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    subjects_per_sample: Counter = field(default_factory=Counter)
    masks: int = 0

    def summary(self) -> str:
        lines = [f"{self.written} of {self.items} items written"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped ({reason}): {count}")
        histogram = ", ".join(f"{k}: {v}" for k, v in sorted(self.subjects_per_sample.items()))
        lines.append(f"subjects per sample: {histogram or 'none'}; masks written: {self.masks}")
        return "\n".join(lines)


# --- sources ---------------------------------------------------------------------------------------


def collect_items(source: str | os.PathLike, video: bool = False) -> tuple[list[SourceItem], Counter]:
    """The captioned items of a folder or captions file, and a count of what was skipped and why."""
    source = Path(source)
    if source.is_dir():
        return _clip_folder_items(source) if video else _image_folder_items(source)
    if source.is_file():
        records = _read_captions_file(source)
        items, skipped = [], Counter()
        for where, record in records:
            item = _record_item(record, source.parent, video, where)
            if isinstance(item, str):
                skipped[item] += 1
            else:
                items.append(item)
        return items, skipped
    raise FileNotFoundError(f"source not found: {source} (give a folder of images or a captions file)")


def _image_folder_items(folder: Path) -> tuple[list[SourceItem], Counter]:
    items, skipped = [], Counter()
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        if not caption:
            skipped["no caption file or empty caption"] += 1
            continue
        items.append(SourceItem(path, caption, path))
    return items, skipped


def _clip_folder_items(folder: Path) -> tuple[list[SourceItem], Counter]:
    items, skipped = [], Counter()
    for clip in sorted(p for p in folder.iterdir() if p.is_dir()):
        caption = ""
        for caption_file in (clip / "caption.txt", clip.with_suffix(".txt")):
            if caption_file.is_file():
                caption = caption_file.read_text(encoding="utf-8").strip()
                break
        item = _clip_item(clip, caption, None)
        if isinstance(item, str):
            skipped[item] += 1
        else:
            items.append(item)
    return items, skipped


def _clip_item(clip: Path, caption: str, phrases: list[str] | None) -> SourceItem | str:
    if not caption:
        return "no caption file or empty caption"
    frames = sorted(p for p in clip.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if len(frames) < 2:
        return "clip with fewer than 2 frames"
    # Target in the middle, reference at the start: far apart in time, so the subject's pose differs.
    return SourceItem(frames[len(frames) // 2], caption, frames[0], phrases)


def _read_captions_file(path: Path) -> list[tuple[str, dict]]:
    """(location for messages, record) pairs of a .jsonl / .json / .csv captions file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        records.append((f"{path}:{number}", json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); one object a line") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if isinstance(data, dict):
            data = [{"image": key, "caption": value} for key, value in data.items()]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of {{image, caption}} objects or an {{image: caption}} object")
        return [(f"{path}[{k}]", record) for k, record in enumerate(data)]
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"{path}: the CSV header needs columns image and caption (missing: {', '.join(sorted(missing))})"
                )
            return [(f"{path}:{number}", dict(row)) for number, row in enumerate(reader, start=2)]
    raise ValueError(f"{path}: unknown captions file type {suffix!r} (use .jsonl, .json or .csv)")


def _record_item(record: object, base: Path, video: bool, where: str) -> SourceItem | str:
    if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"].strip():
        raise ValueError(f'{where}: each record needs "image" (a path) and "caption" (a string)')
    caption = record.get("caption")
    if not isinstance(caption, str):
        raise ValueError(f'{where}: "caption" must be a string, got {type(caption).__name__}')
    phrases = record.get("phrases")
    if isinstance(phrases, str):  # CSV
        phrases = [p.strip() for p in phrases.split(";") if p.strip()] or None
    if phrases is not None and not (isinstance(phrases, list) and all(isinstance(p, str) for p in phrases)):
        raise ValueError(f"{where}: \"phrases\" must be a list of strings (CSV: separated by ';')")
    path = Path(record["image"]) if os.path.isabs(record["image"]) else base / record["image"]
    if video:
        if not path.is_dir():
            raise ValueError(f'{where}: clip folder not found: {path} (with --video, "image" names a folder of frames)')
        return _clip_item(path, caption.strip(), phrases)
    if not path.is_file():
        raise ValueError(f"{where}: image not found: {path}")
    if not caption.strip():
        return "no caption file or empty caption"
    return SourceItem(path, caption.strip(), path, phrases)


# --- phrases ---------------------------------------------------------------------------------------


def make_phrase_finder(vocabulary: Sequence[str] | None = None, max_words: int = 2) -> Callable[[str], list[str]]:
    """Caption -> phrases: vocabulary terms found in it if a vocabulary is given, else noun phrases."""
    if vocabulary:
        terms = tuple(vocabulary)
        return lambda caption: find_vocabulary_phrases(caption, terms)
    return lambda caption: extract_noun_phrases(caption, max_words=max_words)


def item_phrases(item: SourceItem, find_phrases: Callable[[str], list[str]]) -> list[str]:
    if item.phrases is None:
        return find_phrases(item.caption)
    # Given phrases must be words of the caption, as the manifest requires.
    return [p for p in item.phrases if phrase_occurrences(p, item.caption)]


# --- building --------------------------------------------------------------------------------------


def build_manifest(
    items: Iterable[SourceItem],
    out_dir: str | os.PathLike,
    detector,
    rules: SubjectFilter,
    find_phrases: Callable[[str], list[str]],
    segmenter=None,
    batch_size: int = 8,
    min_subjects: int = 1,
    save_crops: bool = False,
    progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Detect, filter, segment and write `out_dir/manifest.jsonl` (+ `masks/`, `crops/`).

    `detector(images, phrases_per_image, threshold)` returns `Detection`s per image (see
    `detection.OpenVocabularyDetector`); `segmenter(images, boxes_per_image)` boolean masks
    (`detection.BoxSegmenter`). Lines are written batch by batch, so a long build can be watched.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    report = BuildReport()
    with open(manifest_path, "w", encoding="utf-8") as handle:
        batch: list[SourceItem] = []
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                _build_batch(
                    batch, out_dir, handle, detector, rules, find_phrases, segmenter, min_subjects, save_crops, report
                )
                batch = []
                if progress:
                    progress(report.items)
        if batch:
            _build_batch(
                batch, out_dir, handle, detector, rules, find_phrases, segmenter, min_subjects, save_crops, report
            )
            if progress:
                progress(report.items)
    return report


def _build_batch(batch, out_dir, handle, detector, rules, find_phrases, segmenter, min_subjects, save_crops, report):
    report.items += len(batch)
    readable, targets, references = [], [], []
    for item in batch:
        try:
            target = _open(item.image)
            reference = _open(item.reference_image) if item.reference_image != item.image else target
        except ValueError:
            report.skipped["unreadable image"] += 1
            continue
        readable.append(item)
        targets.append(target)
        references.append(reference)
    batch = readable
    phrases = [item_phrases(item, find_phrases) for item in batch]
    video = [item.reference_image != item.image for item in batch]

    # Clips are detected on both frames in one batch: boxes come from the target frame, crops from the reference frame.
    extra = [k for k, v in enumerate(video) if v]
    found = detector(
        targets + [references[k] for k in extra], phrases + [phrases[k] for k in extra], rules.score_threshold
    )
    target_found = found[: len(batch)]
    reference_found = {k: found[len(batch) + n] for n, k in enumerate(extra)}

    chosen: list[list[tuple[Detection, Detection]]] = []
    for k, item in enumerate(batch):
        if not phrases[k]:
            chosen.append([])
            report.skipped["no subject phrase in the caption"] += 1
            continue
        pairs = []
        reference_best = best_per_phrase(reference_found[k], rules) if video[k] else None
        for subject in select_subjects(target_found[k], rules):
            reference = subject if reference_best is None else reference_best.get(subject.phrase)
            if reference is not None:
                pairs.append((subject, reference))
        if len(pairs) < min_subjects:
            chosen.append([])
            report.skipped[f"fewer than {min_subjects} subject(s) detected"] += 1
            continue
        chosen.append(pairs)

    masks: list[list[np.ndarray | None]] = [[None] * len(pairs) for pairs in chosen]
    if segmenter is not None:
        todo = [k for k, pairs in enumerate(chosen) if pairs]
        segmented = segmenter([references[k] for k in todo], [[ref.box for _, ref in chosen[k]] for k in todo])
        for k, image_masks in zip(todo, segmented):
            masks[k] = list(image_masks)

    for k, (item, pairs) in enumerate(zip(batch, chosen)):
        if not pairs:
            continue
        key = f"{report.written:07d}_{_safe_stem(item.image)}"
        subjects = []
        for j, (subject, reference) in enumerate(pairs):
            ref = _write_reference(
                item.reference_image,
                references[k],
                reference.box,
                masks[k][j],
                out_dir,
                f"{key}_{j}",
                save_crops,
                report,
            )
            subjects.append(SubjectRecord(subject.phrase, subject.box, ref, {"score": round(subject.score, 4)}))
        width, height = targets[k].size
        sample = Sample(item.image, item.caption, subjects, id=key, width=width, height=height)
        handle.write(json.dumps(sample.to_json(out_dir), ensure_ascii=False) + "\n")
        report.written += 1
        report.subjects_per_sample[len(subjects)] += 1
    handle.flush()


def _write_reference(
    path, image, box, mask, out_dir: Path, name: str, save_crops: bool, report: BuildReport
) -> Reference:
    box = tuple(round(v, 6) for v in box)  # as the manifest stores it, so the dataset finds the same pixels
    left, top, width, height = crop_pixels(box, image.size)
    rect = (left, top, left + width, top + height)
    mask_path = None
    if mask is not None:
        crop_mask = np.asarray(mask, dtype=bool)[rect[1] : rect[3], rect[0] : rect[2]]
        if crop_mask.mean() >= MIN_MASK_FRACTION:
            mask_path = out_dir / "masks" / f"{name}.png"
            mask_path.parent.mkdir(exist_ok=True)
            PIL.Image.fromarray(crop_mask.astype(np.uint8) * 255).save(mask_path)
            report.masks += 1
    if save_crops:
        crop_path = out_dir / "crops" / f"{name}.png"
        crop_path.parent.mkdir(exist_ok=True)
        image.crop(rect).save(crop_path)
        return Reference(crop_path, None, mask_path)
    return Reference(Path(path), box, mask_path)


def _open(path: Path) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as opened:
            return opened.convert("RGB")
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise ValueError(f"cannot read {path} as an image ({error})") from error


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem)[:40] or "image"
