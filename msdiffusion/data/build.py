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
  of clip folders, captions in `CLIP/caption.txt` or `CLIP.txt`, or a captions file naming them;
- WebDataset tar shards (img2dataset's and video2dataset's layout, `tars.py`), local or any fsspec URL.

Output: one `manifest.jsonl`, or a sharded manifest (`manifest-NNNNN.jsonl` per shard and
`manifest-index.json`, `manifest.py`), which a stopped build continues shard by shard. Images of
tar sources are written under `images/` so the manifest stays paths to files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TextIO

import numpy as np
import PIL.Image

from ..subjects import IMAGE_READ_ERRORS, opaque_rgb
from .detection import Detection, SubjectFilter, best_per_phrase, select_subjects
from .manifest import (
    Reference,
    Sample,
    SubjectRecord,
    crop_pixels,
    phrase_occurrences,
    shard_file_name,
    write_index,
)
from .phrases import extract_noun_phrases, find_vocabulary_phrases
from .tars import TXT_FIELD, clip_frames, is_tar_source, iter_tar_samples, list_shards, sample_caption, still_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST_NAME = "manifest.jsonl"
# A SAM mask covering less than this fraction of its crop is treated as a failure and not written.
MIN_MASK_FRACTION = 0.02
# Per finished shard of a sharded build: its source and report (a later run skips the shard).
STATE_FOLDER = ".build"


@dataclass
class SourceItem:
    """One captioned target, and where its references come from."""

    image: Path
    caption: str
    reference_image: Path
    phrases: list[str] | None = None  # given by the captions file; otherwise extracted from the caption
    # Tar sources: the encoded images, in memory; `image` / `reference_image` are then paths relative
    # to the output folder, where they are written if the sample is kept.
    image_bytes: bytes | None = None
    reference_bytes: bytes | None = None


@dataclass
class BuildReport:
    items: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    subjects_per_sample: Counter = field(default_factory=Counter)
    masks: int = 0

    def add(self, work: "Work") -> None:
        """Count one item that went through the stages."""
        self.items += 1
        if work.skipped is not None:
            self.skipped[work.skipped] += 1
        elif work.line is not None:
            self.written += 1
            self.subjects_per_sample[len(work.pairs)] += 1
            self.masks += work.masks_written

    def to_json(self) -> dict:
        return {
            "items": self.items,
            "written": self.written,
            "skipped": dict(self.skipped),
            "subjects_per_sample": {str(k): v for k, v in self.subjects_per_sample.items()},
            "masks": self.masks,
        }

    @classmethod
    def from_json(cls, record: dict) -> "BuildReport":
        subjects = Counter({int(k): v for k, v in record["subjects_per_sample"].items()})
        return cls(record["items"], record["written"], Counter(record["skipped"]), subjects, record["masks"])

    @classmethod
    def total(cls, reports: Iterable["BuildReport"]) -> "BuildReport":
        total = cls()
        for report in reports:
            total.items += report.items
            total.written += report.written
            total.skipped.update(report.skipped)
            total.subjects_per_sample.update(report.subjects_per_sample)
            total.masks += report.masks
        return total

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


# --- stages ----------------------------------------------------------------------------------------
# Each stage takes a list of `Work` and fills in what it finds; the local engine runs them in turn
# on one batch at a time, the Ray engine (`ray_engine.py`) runs the same functions on its workers.


@dataclass
class Work:
    """One item on its way through the stages, and what each stage found."""

    item: SourceItem | None
    key: str  # the sample's id, and the stem of its masks, crops and written images
    folder: str = ""  # sub-folder of masks/ and crops/: a shard's number, "" for a single manifest
    position: int = 0  # index of the item in its shard (or source), skipped items counted
    skipped: str | None = None  # why the item is left out, once a stage decides so
    target: PIL.Image.Image | None = None
    reference: PIL.Image.Image | None = None
    phrases: list[str] = field(default_factory=list)
    pairs: list[tuple[Detection, Detection]] = field(default_factory=list)  # (target box, reference box)
    masks: list[np.ndarray | None] = field(default_factory=list)
    line: str | None = None  # the manifest line, once written
    masks_written: int = 0

    @property
    def active(self) -> bool:
        return self.skipped is None


def load_stage(works: Sequence[Work]) -> None:
    """Decode the target and reference images (CPU)."""
    for work in works:
        if not work.active:
            continue
        item = work.item
        try:
            work.target = _open(item.image, item.image_bytes)
            if item.reference_image != item.image:
                work.reference = _open(item.reference_image, item.reference_bytes)
            else:
                work.reference = work.target
        except ValueError:
            work.skipped = "unreadable image"


def detect_stage(
    works: Sequence[Work],
    detector,
    rules: SubjectFilter,
    find_phrases: Callable[[str], list[str]],
    min_subjects: int = 1,
) -> None:
    """Find the caption's phrases, detect them, filter, and pair each subject with its reference box."""
    active = [work for work in works if work.active]
    if not active:
        return
    for work in active:
        work.phrases = item_phrases(work.item, find_phrases)
    video = [work.item.reference_image != work.item.image for work in active]
    # Clips are detected on both frames in one batch: boxes come from the target frame, crops from the reference frame.
    extra = [k for k, v in enumerate(video) if v]
    found = detector(
        [work.target for work in active] + [active[k].reference for k in extra],
        [work.phrases for work in active] + [active[k].phrases for k in extra],
        rules.score_threshold,
    )
    reference_found = {k: found[len(active) + n] for n, k in enumerate(extra)}
    for k, work in enumerate(active):
        if not work.phrases:
            work.skipped = "no subject phrase in the caption"
            continue
        pairs = []
        reference_best = best_per_phrase(reference_found[k], rules) if video[k] else None
        for subject in select_subjects(found[k], rules):
            reference = subject if reference_best is None else reference_best.get(subject.phrase)
            if reference is not None:
                pairs.append((subject, reference))
        if len(pairs) < min_subjects:
            work.skipped = f"fewer than {min_subjects} subject(s) detected"
            continue
        work.pairs = pairs
        work.masks = [None] * len(pairs)


def segment_stage(works: Sequence[Work], segmenter) -> None:
    """SAM masks of each kept subject in its reference image."""
    todo = [work for work in works if work.active and work.pairs]
    if segmenter is None or not todo:
        return
    segmented = segmenter([work.reference for work in todo], [[ref.box for _, ref in work.pairs] for work in todo])
    for work, image_masks in zip(todo, segmented):
        work.masks = list(image_masks)


def write_stage(works: Sequence[Work], out_dir: str | os.PathLike, save_crops: bool = False) -> None:
    """Write each kept sample's files (masks, crops; tar sources: its images) and its manifest line.

    The decoded images are dropped afterwards: what is left of a `Work` is small.
    """
    out_dir = Path(out_dir)
    for work in works:
        if work.active and work.pairs:
            _write_sample(work, out_dir, save_crops)
        work.target = work.reference = None
        work.masks = []
        if work.item is not None and work.item.image_bytes is not None:
            work.item = replace(work.item, image_bytes=None, reference_bytes=None)


def _write_sample(work: Work, out_dir: Path, save_crops: bool) -> None:
    item = work.item
    # Tar sources: the images exist only in memory; they are written next to the manifest, so it stays
    # the one training format (paths to files).
    image_path = _materialize(item.image, item.image_bytes, out_dir)
    reference_path = image_path
    if item.reference_image != item.image:
        reference_path = _materialize(item.reference_image, item.reference_bytes, out_dir)
    subjects = []
    for j, (subject, reference) in enumerate(work.pairs):
        ref = _write_reference(
            reference_path,
            work.reference,
            reference.box,
            work.masks[j],
            out_dir,
            work.folder,
            f"{work.key}_{j}",
            save_crops,
        )
        work.masks_written += ref.mask is not None
        subjects.append(SubjectRecord(subject.phrase, subject.box, ref, {"score": round(subject.score, 4)}))
    width, height = work.target.size
    sample = Sample(image_path, item.caption, subjects, id=work.key, width=width, height=height)
    work.line = json.dumps(sample.to_json(out_dir), ensure_ascii=False)


def _materialize(path: Path, data: bytes | None, out_dir: Path) -> Path:
    if data is None:
        return path
    target = out_dir / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def run_stages(
    works: Sequence[Work],
    out_dir: str | os.PathLike,
    detector,
    rules: SubjectFilter,
    find_phrases: Callable[[str], list[str]],
    segmenter=None,
    min_subjects: int = 1,
    save_crops: bool = False,
) -> None:
    """Every stage on one batch, in one process (the local engine)."""
    load_stage(works)
    detect_stage(works, detector, rules, find_phrases, min_subjects)
    segment_stage(works, segmenter)
    write_stage(works, out_dir, save_crops)


@dataclass(frozen=True)
class ModelSpec:
    """How to load the detector or the segmenter where it runs (a Ray actor loads its own copy).

    `device` None: the best device of the process that loads it (the GPU Ray gave an actor).
    `dtype` "auto": fp16 on CUDA, fp32 elsewhere.
    """

    kind: str  # "detector" or "segmenter"
    name: str
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = 8

    def resolved(self) -> tuple[str, object]:
        import torch

        from ..loading import default_device

        device = self.device or default_device()
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(self.dtype)
        if dtype is None:
            dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        return device, dtype

    def __call__(self):
        from .detection import BoxSegmenter, OpenVocabularyDetector

        device, dtype = self.resolved()
        if self.kind == "detector":
            return OpenVocabularyDetector(self.name, device, dtype, batch_size=self.batch_size)
        return BoxSegmenter(self.name, device, dtype)


# --- progress --------------------------------------------------------------------------------------


class BuildProgress:
    """Shards and samples done, samples/s and the estimated time left, on one line of stderr.

    A "sample" is a source item, kept or skipped. On a terminal the line is redrawn at most every
    `interval` seconds; elsewhere (a log file, a batch job) it is printed as a new line at most every
    `log_interval` seconds, so a week-long build's log stays short. The time left extrapolates this
    run's rate over the samples still to do: counted where the source lists its items, otherwise
    the finished shards' average times the shards left.
    """

    def __init__(
        self,
        shards: int | None = None,
        samples_total: int | None = None,
        stream: TextIO | None = None,
        quiet: bool = False,
        interval: float = 0.5,
        log_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.shards, self.samples_total = shards, samples_total
        self.stream = stream if stream is not None else sys.stderr
        self.quiet, self.clock = quiet, clock
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.terminal else log_interval
        self.shards_done = 0
        self.samples_done = 0  # earlier runs' finished shards included
        self.finished_samples = 0  # samples of finished shards
        self.run_samples = 0  # done by this run: the rate's numerator
        self.started = clock()
        self.shown = None  # when the line was last printed

    def resume(self, reports: Iterable["BuildReport"]) -> None:
        """Count the shards an earlier run finished (they do not count towards the rate)."""
        for report in reports:
            self.shards_done += 1
            self.samples_done += report.items
            self.finished_samples += report.items

    def add_samples(self, count: int) -> None:
        self.samples_done += count
        self.run_samples += count
        self._show()

    def shard_done(self, report: "BuildReport") -> None:
        self.shards_done += 1
        self.finished_samples += report.items
        self._show()

    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.run_samples / elapsed if elapsed > 0 else 0.0

    def samples_left(self) -> float | None:
        if self.samples_total is not None:
            return max(0, self.samples_total - self.samples_done)
        if not self.shards or not self.shards_done:
            return None
        per_shard = self.finished_samples / self.shards_done
        in_progress = self.samples_done - self.finished_samples
        return max(0.0, per_shard * (self.shards - self.shards_done) - in_progress)

    def line(self) -> str:
        parts = [f"shards {self.shards_done}/{self.shards}"] if self.shards is not None else []
        total = f"/{self.samples_total:,}" if self.samples_total is not None else ""
        parts.append(f"samples {self.samples_done:,}{total}")
        rate, left = self.rate(), self.samples_left()
        parts.append(f"{rate:.1f} samples/s")
        if left is not None and (rate > 0 or left == 0):
            parts.append(f"{format_duration(left / rate if left else 0)} left")
        else:
            parts.append("time left: after the first shard" if self.shards else "time left: unknown")
        return " | ".join(parts)

    def close(self) -> None:
        """The final line (always printed, unless quiet)."""
        self._show(force=True)
        if not self.quiet and self.terminal:
            print(file=self.stream)

    def _show(self, force: bool = False) -> None:
        if self.quiet:
            return
        now = self.clock()
        if not force and self.shown is not None and now - self.shown < self.interval:
            return
        self.shown = now
        if self.terminal:
            print(f"\r  {self.line()}\x1b[K", end="", file=self.stream, flush=True)
        else:
            print(f"  {self.line()}", file=self.stream, flush=True)


def format_duration(seconds: float) -> str:
    """12s, 3m 05s, 4h 02m, 2d 03h."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


# --- building: one manifest ------------------------------------------------------------------------


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
    progress: BuildProgress | None = None,
) -> BuildReport:
    """Detect, filter, segment and write `out_dir/manifest.jsonl` (+ `masks/`, `crops/`).

    `detector(images, phrases_per_image, threshold)` returns `Detection`s per image (see
    `detection.OpenVocabularyDetector`); `segmenter(images, boxes_per_image)` boolean masks
    (`detection.BoxSegmenter`). Lines are written batch by batch, so a long build can be watched.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = BuildReport()
    works = (Work(item, f"{k:07d}_{_safe_stem(item.image)}", position=k) for k, item in enumerate(items))
    with open(out_dir / MANIFEST_NAME, "w", encoding="utf-8") as handle:
        for batch in _batched(works, batch_size):
            run_stages(batch, out_dir, detector, rules, find_phrases, segmenter, min_subjects, save_crops)
            for work in batch:
                report.add(work)
                if work.line is not None:
                    handle.write(work.line + "\n")
            handle.flush()
            if progress is not None:
                progress.add_samples(len(batch))
    if progress is not None:
        progress.close()
    return report


# --- building: a sharded manifest ------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work and of output: a tar shard, or a slice of a folder or captions file."""

    number: int
    source: str  # the tar's URL, or where the slice comes from (for the index and messages)
    items: tuple[SourceItem, ...] | None = None  # a slice of a listed source; None: read the tar
    video: bool = False
    caption_field: str = TXT_FIELD

    @property
    def folder(self) -> str:
        return f"{self.number:05d}"


def plan_shards(
    source: str | os.PathLike,
    video: bool = False,
    caption_field: str = TXT_FIELD,
    shard_size: int = 1000,
) -> tuple[list[ShardSpec], Counter]:
    """The shards of a build: one per tar shard, or slices of `shard_size` items of a folder or captions file."""
    if is_tar_source(source):
        return [ShardSpec(k, url, None, video, caption_field) for k, url in enumerate(list_shards(source))], Counter()
    items, skipped = collect_items(source, video=video)
    specs = [
        ShardSpec(k, f"{os.fspath(source)}[{start}:{start + shard_size}]", tuple(items[start : start + shard_size]))
        for k, start in enumerate(range(0, len(items), shard_size))
    ]
    return specs, skipped


def planned_samples(specs: Sequence[ShardSpec]) -> int | None:
    """How many items the shards hold, where the source lists them (None for tar shards: unknown until read)."""
    if any(spec.items is None for spec in specs):
        return None
    return sum(len(spec.items) for spec in specs)


def shard_works(spec: ShardSpec) -> Iterator[Work]:
    """The items of one shard as `Work`, in order; items that cannot be used come already skipped."""
    if spec.items is not None:
        for position, item in enumerate(spec.items):
            yield Work(item, f"{spec.folder}_{position:06d}_{_safe_stem(item.image)}", spec.folder, position)
        return
    for position, sample in enumerate(iter_tar_samples(spec.source)):
        key = f"{spec.folder}_{position:06d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', sample.key)[:80]}"
        work = Work(None, key, spec.folder, position)
        caption, phrases = sample_caption(sample, spec.caption_field)
        images = Path("images") / spec.folder
        if not caption:
            work.skipped = "no caption file or empty caption"
        elif spec.video:
            frames = clip_frames(sample)
            if isinstance(frames, str):
                work.skipped = frames
            else:
                (target_ext, target), (reference_ext, reference) = frames
                work.item = SourceItem(
                    images / f"{key}.target.{target_ext}",
                    caption,
                    images / f"{key}.reference.{reference_ext}",
                    phrases,
                    target,
                    reference,
                )
        else:
            found = still_image(sample)
            if found is None:
                work.skipped = "no image in the sample"
            else:
                path = images / f"{key}.{found[0]}"
                work.item = SourceItem(path, caption, path, phrases, found[1])
        yield work


def tar_items(
    source: str | os.PathLike, video: bool = False, caption_field: str = TXT_FIELD, limit: int | None = None
) -> tuple[list[SourceItem], Counter]:
    """The first `limit` usable items of tar shards (for a trial build into one manifest), and the skips."""
    items, skipped = [], Counter()
    for spec in plan_shards(source, video, caption_field)[0]:
        for work in shard_works(spec):
            if limit is not None and len(items) >= limit:
                return items, skipped
            if work.skipped:
                skipped[work.skipped] += 1
            else:
                items.append(work.item)
    return items, skipped


def finished_shards(out_dir: str | os.PathLike, specs: Sequence[ShardSpec]) -> dict[int, BuildReport]:
    """Reports of the shards an earlier run of the same build finished (these are skipped).

    Raises ValueError when a finished shard came from another source: the output belongs to another build.
    """
    out_dir = Path(out_dir)
    done = {}
    for spec in specs:
        state = out_dir / STATE_FOLDER / f"{spec.folder}.json"
        if not (state.is_file() and (out_dir / shard_file_name(spec.number)).is_file()):
            continue
        record = json.loads(state.read_text(encoding="utf-8"))
        if record.get("source") != spec.source:
            raise ValueError(
                f"{out_dir} holds shard {spec.number} of another build (from {record.get('source')}, not "
                f"{spec.source}); choose another --out, or pass --overwrite to start again"
            )
        done[spec.number] = BuildReport.from_json(record["report"])
    return done


def finish_shard(out_dir: str | os.PathLike, spec: ShardSpec, works: Sequence[Work]) -> BuildReport:
    """Write a shard's manifest (lines in item order) and its state, so a later run skips it."""
    out_dir = Path(out_dir)
    report = BuildReport()
    lines = []
    for work in sorted(works, key=lambda w: w.position):
        report.add(work)
        if work.line is not None:
            lines.append(work.line + "\n")
    state = out_dir / STATE_FOLDER / f"{spec.folder}.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    # The state first, then the manifest: a shard counts as finished only once both exist.
    _write_atomic(state, json.dumps({"source": spec.source, "report": report.to_json()}))
    _write_atomic(out_dir / shard_file_name(spec.number), "".join(lines))
    return report


def finish_build(out_dir: str | os.PathLike, specs: Sequence[ShardSpec], reports: dict[int, BuildReport]) -> Path:
    """Write the manifest index once every shard is finished; returns its path."""
    shards = [
        {"file": shard_file_name(spec.number), "samples": reports[spec.number].written, "source": spec.source}
        for spec in specs
    ]
    return write_index(out_dir, shards)


def build_sharded(
    specs: Sequence[ShardSpec],
    out_dir: str | os.PathLike,
    detector,
    rules: SubjectFilter,
    find_phrases: Callable[[str], list[str]],
    segmenter=None,
    batch_size: int = 8,
    min_subjects: int = 1,
    save_crops: bool = False,
    progress: BuildProgress | None = None,
) -> BuildReport:
    """The local engine's sharded build: `manifest-NNNNN.jsonl` per shard and `manifest-index.json`.

    Shards finished by an earlier run are skipped (a stopped build continues where it stopped).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = finished_shards(out_dir, specs)
    if progress is not None:
        progress.resume(reports.values())
    for spec in specs:
        if spec.number in reports:
            continue
        works: list[Work] = []
        for batch in _batched(shard_works(spec), batch_size):
            run_stages(batch, out_dir, detector, rules, find_phrases, segmenter, min_subjects, save_crops)
            works.extend(batch)
            if progress is not None:
                progress.add_samples(len(batch))
        reports[spec.number] = finish_shard(out_dir, spec, works)
        if progress is not None:
            progress.shard_done(reports[spec.number])
    if progress is not None:
        progress.close()
    finish_build(out_dir, specs, reports)
    return BuildReport.total(reports.values())


def _batched(works: Iterable[Work], size: int) -> Iterator[list[Work]]:
    batch: list[Work] = []
    for work in works:
        batch.append(work)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _write_reference(path, image, box, mask, out_dir: Path, folder: str, name: str, save_crops: bool) -> Reference:
    box = tuple(round(v, 6) for v in box)  # as the manifest stores it, so the dataset finds the same pixels
    left, top, width, height = crop_pixels(box, image.size)
    rect = (left, top, left + width, top + height)
    mask_path = None
    if mask is not None:
        crop_mask = np.asarray(mask, dtype=bool)[rect[1] : rect[3], rect[0] : rect[2]]
        if crop_mask.mean() >= MIN_MASK_FRACTION:
            mask_path = out_dir / "masks" / folder / f"{name}.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(crop_mask.astype(np.uint8) * 255).save(mask_path)
    if save_crops:
        crop_path = out_dir / "crops" / folder / f"{name}.png"
        crop_path.parent.mkdir(parents=True, exist_ok=True)
        image.crop(rect).save(crop_path)
        return Reference(crop_path, None, mask_path)
    return Reference(Path(path), box, mask_path)


def _open(path: Path, data: bytes | None = None) -> PIL.Image.Image:
    try:
        with PIL.Image.open(io.BytesIO(data) if data is not None else path) as opened:
            return opaque_rgb(opened)
    except IMAGE_READ_ERRORS as error:
        raise ValueError(f"cannot read {path} as an image ({error})") from error


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem)[:40] or "image"
