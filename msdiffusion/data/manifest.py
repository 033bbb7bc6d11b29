"""The training manifest: one JSON object per line, one training sample per object.

```json
{"image": "photos/0001.jpg", "caption": "a dog and a cat on a sofa",
 "subjects": [
   {"phrase": "dog", "box": [0.05, 0.30, 0.48, 0.95],
    "reference": {"image": "photos/0001.jpg", "crop": [0.05, 0.30, 0.48, 0.95], "mask": "masks/0001_0.png"}},
   {"phrase": "cat", "box": [0.55, 0.40, 0.90, 0.92], "reference": "refs/cat.png"}]}
```

Paths are relative to the manifest's folder (or absolute). Boxes and crops are `[x0, y0, x1, y1]`
fractions of their image's width and height. Full description: docs/data.md.

A manifest may also be sharded: `manifest-00000.jsonl`, `manifest-00001.jsonl`... listed, in order,
by `manifest-index.json` (what `msdiff data build` writes at scale). Everything that takes a manifest
takes the index (or the folder holding it) too, and reads the shards as one manifest in index order.

Validation collects every problem (up to a limit) as `manifest.jsonl:LINE: field: problem (what is
allowed)`, so a whole file can be fixed in one pass.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import PIL.Image

from ..errors import did_you_mean
from ..subjects import IMAGE_READ_ERRORS

Box = tuple[float, float, float, float]

SAMPLE_KEYS = ("image", "caption", "subjects", "id", "width", "height", "meta")
SUBJECT_KEYS = ("phrase", "box", "reference", "meta")
REFERENCE_KEYS = ("image", "crop", "mask")
DEFAULT_MAX_PROBLEMS = 50
INDEX_NAME = "manifest-index.json"
INDEX_FORMAT = "msdiffusion-manifest-index"
INDEX_VERSION = 1

_BOX_RULE = "[x0, y0, x1, y1] fractions of the image size, 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"


@dataclass(frozen=True)
class Reference:
    """Where a subject's reference image comes from: a file, optionally cropped and masked."""

    image: Path
    crop: Box | None = None
    mask: Path | None = None


@dataclass(frozen=True)
class SubjectRecord:
    phrase: str
    box: Box
    reference: Reference
    meta: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One manifest line, with paths resolved against the manifest's folder."""

    image: Path
    caption: str
    subjects: list[SubjectRecord]
    id: str | None = None
    width: int | None = None
    height: int | None = None
    meta: dict = field(default_factory=dict)
    line: int = 0

    def to_json(self, manifest_dir: str | os.PathLike) -> dict[str, Any]:
        """The JSON object of this sample, with paths written relative to `manifest_dir` where possible."""
        record: dict[str, Any] = {}
        if self.id is not None:
            record["id"] = self.id
        record["image"] = _relative(self.image, manifest_dir)
        if self.width is not None and self.height is not None:
            record["width"], record["height"] = self.width, self.height
        record["caption"] = self.caption
        record["subjects"] = []
        for subject in self.subjects:
            reference: dict[str, Any] = {"image": _relative(subject.reference.image, manifest_dir)}
            if subject.reference.crop is not None:
                reference["crop"] = [round(v, 6) for v in subject.reference.crop]
            if subject.reference.mask is not None:
                reference["mask"] = _relative(subject.reference.mask, manifest_dir)
            entry: dict[str, Any] = {
                "phrase": subject.phrase,
                "box": [round(v, 6) for v in subject.box],
                "reference": reference,
            }
            if subject.meta:
                entry["meta"] = subject.meta
            record["subjects"].append(entry)
        if self.meta:
            record["meta"] = self.meta
        return record


@dataclass(frozen=True)
class Problem:
    line: int
    field: str
    message: str
    kind: str = "schema"  # "schema", "missing" (a file that does not exist) or "unreadable"
    file: str | None = None  # the shard of a sharded manifest the line is in; None: the manifest itself

    def format(self, manifest: str | os.PathLike) -> str:
        where = f"{self.file or os.fspath(manifest)}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ManifestError(ValueError):
    """A manifest with problems; `problems` lists them (up to the collection limit)."""

    def __init__(self, manifest: str | os.PathLike, problems: list[Problem], total: int | None = None):
        self.manifest = os.fspath(manifest)
        self.problems = problems
        self.total = len(problems) if total is None else total
        lines = [problem.format(self.manifest) for problem in problems]
        if self.total > len(problems):
            lines.append(f"... and {self.total - len(problems)} more problems")
        super().__init__(f"{self.total} problem(s) in manifest {self.manifest}:\n" + "\n".join(lines))


def phrase_occurrences(phrase: str, caption: str) -> int:
    """How many times `phrase` occurs in `caption` as whole words, ignoring case."""
    pattern = r"(?<!\w)" + re.escape(phrase.strip()) + r"(?!\w)"
    return len(re.findall(pattern, caption, flags=re.IGNORECASE))


class _Checker:
    """Collects the problems of one manifest line."""

    def __init__(self, line: int):
        self.line = line
        self.problems: list[Problem] = []

    def add(self, where: str, message: str, kind: str = "schema") -> None:
        self.problems.append(Problem(self.line, where, message, kind))

    def keys(self, obj: dict, allowed: tuple[str, ...], where: str) -> None:
        for key in obj:
            if key not in allowed:
                label = f"{where}.{key}" if where else key
                self.add(label, f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")

    def text(self, obj: dict, key: str, where: str, required: bool = True) -> str | None:
        label = f"{where}.{key}" if where else key
        if key not in obj:
            if required:
                self.add(label, "missing (required)")
            return None
        value = obj[key]
        if not isinstance(value, str):
            self.add(label, f"expected a string, got {_json_type(value)} {_short(value)}")
            return None
        if not value.strip():
            self.add(label, "is empty (a non-empty string is required)")
            return None
        return value

    def box(self, value: Any, label: str) -> Box | None:
        if not isinstance(value, list) or len(value) != 4:
            self.add(label, f"expected a list of four numbers, got {_short(value)} ({_BOX_RULE})")
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            self.add(label, f"expected four finite numbers, got {_short(value)} ({_BOX_RULE})")
            return None
        x0, y0, x1, y1 = (float(v) for v in value)
        if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) > 1:
            hint = "; pixel coordinates must be divided by the image width and height" if max(value) > 1 else ""
            self.add(label, f"{_short(value)} is outside [0, 1]{hint} ({_BOX_RULE})")
            return None
        if x1 <= x0 or y1 <= y0:
            self.add(label, f"{_short(value)} is empty or reversed ({_BOX_RULE})")
            return None
        return (x0, y0, x1, y1)

    def path(self, value: str, label: str, base: Path, check_files: bool) -> Path:
        path = Path(os.path.normpath(value if os.path.isabs(value) else base / value))
        if check_files and not path.is_file():
            self.add(
                label, f"file not found: {path} (paths are relative to the manifest's folder, or absolute)", "missing"
            )
        return path


def parse_line(text: str, line: int, base: Path, check_files: bool = True) -> tuple[Sample | None, list[Problem]]:
    """Parse and check one manifest line; returns the sample (None if it has problems) and its problems."""
    check = _Checker(line)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        check.add("", f"not valid JSON: {error.msg} at column {error.colno} (one JSON object per line)")
        return None, check.problems
    if not isinstance(record, dict):
        check.add("", f"expected a JSON object, got {_json_type(record)} (one object per line)")
        return None, check.problems
    check.keys(record, SAMPLE_KEYS, "")

    image_value = check.text(record, "image", "")
    image = check.path(image_value, "image", base, check_files) if image_value else None
    caption = check.text(record, "caption", "")

    sample_id = record.get("id")
    if sample_id is not None and not isinstance(sample_id, (str, int)):
        check.add("id", f"expected a string or an integer, got {_json_type(sample_id)}")
    size = {}
    for key in ("width", "height"):
        value = record.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            check.add(key, f"expected a positive integer (pixels), got {_short(value)}")
        size[key] = value
    if (size["width"] is None) != (size["height"] is None):
        check.add("width" if size["width"] is None else "height", "give both width and height, or neither")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        check.add("meta", f"expected an object, got {_json_type(meta)}")

    subjects_value = record.get("subjects")
    subjects: list[SubjectRecord] = []
    if subjects_value is None:
        check.add("subjects", "missing (required: a list of subjects, [] for none)")
    elif not isinstance(subjects_value, list):
        check.add("subjects", f"expected a list of subject objects, got {_json_type(subjects_value)}")
    else:
        for j, entry in enumerate(subjects_value):
            subject = _parse_subject(entry, f"subjects[{j}]", check, base, check_files, caption)
            if subject is not None:
                subjects.append(subject)
        if caption:
            _check_repeated_phrases(subjects_value, caption, check)

    if check.problems:
        return None, check.problems
    width, height = size["width"], size["height"]
    sample = Sample(image, caption, subjects, None if sample_id is None else str(sample_id), width, height, meta, line)
    return sample, []


def _parse_subject(entry: Any, where: str, check: _Checker, base: Path, check_files: bool, caption: str | None):
    if not isinstance(entry, dict):
        check.add(where, f"expected an object with phrase, box and reference, got {_json_type(entry)}")
        return None
    before = len(check.problems)
    check.keys(entry, SUBJECT_KEYS, where)
    phrase = check.text(entry, "phrase", where)
    if phrase and caption and not phrase_occurrences(phrase, caption):
        check.add(
            f"{where}.phrase",
            f"{phrase!r} does not appear in the caption (the phrase must be words of the caption, any case)",
        )
    box = check.box(entry["box"], f"{where}.box") if "box" in entry else None
    if "box" not in entry:
        check.add(f"{where}.box", f"missing (required: {_BOX_RULE})")
    meta = entry.get("meta", {})
    if not isinstance(meta, dict):
        check.add(f"{where}.meta", f"expected an object, got {_json_type(meta)}")

    reference = None
    value = entry.get("reference")
    label = f"{where}.reference"
    if value is None:
        check.add(label, 'missing (required: a path, or {"image": path, "crop": box, "mask": path})')
    elif isinstance(value, str):
        value = {"image": value}
    elif not isinstance(value, dict):
        check.add(label, f'expected a path or an object {{"image", "crop", "mask"}}, got {_json_type(value)}')
        value = None
    if isinstance(value, dict):
        check.keys(value, REFERENCE_KEYS, label)
        ref_image = check.text(value, "image", label)
        crop = check.box(value["crop"], f"{label}.crop") if value.get("crop") is not None else None
        mask_value = check.text(value, "mask", label, required=False) if value.get("mask") is not None else None
        if ref_image:
            reference = Reference(
                check.path(ref_image, f"{label}.image", base, check_files),
                crop,
                check.path(mask_value, f"{label}.mask", base, check_files) if mask_value else None,
            )
    if len(check.problems) > before or phrase is None or box is None or reference is None:
        return None
    return SubjectRecord(phrase, box, reference, meta)


def _check_repeated_phrases(entries: list, caption: str, check: _Checker) -> None:
    # The k-th subject with a given phrase is matched to the k-th occurrence of the phrase in the caption.
    counts: dict[str, list[int]] = {}
    for j, entry in enumerate(entries):
        if isinstance(entry, dict) and isinstance(entry.get("phrase"), str) and entry["phrase"].strip():
            counts.setdefault(entry["phrase"].strip().lower(), []).append(j)
    for phrase, indices in counts.items():
        found = phrase_occurrences(phrase, caption)
        if found and len(indices) > found:
            check.add(
                f"subjects[{indices[found]}].phrase",
                f"{len(indices)} subjects are named {phrase!r} but the caption has it {found} time(s) "
                "(the k-th subject with a phrase is matched to its k-th occurrence in the caption)",
            )


def check_sample_files(sample: Sample, decode: bool = False) -> list[Problem]:
    """Open the sample's images and check readability, declared sizes and mask sizes.

    Headers only by default; `decode=True` decodes every pixel, which finds truncated files (their
    headers are intact, and training would fail on them mid-run).
    """
    problems: list[Problem] = []
    size = _image_size(sample.image, sample.line, "image", problems, decode)
    if size and sample.width is not None and (sample.width, sample.height) != size:
        problems.append(
            Problem(
                sample.line,
                "width",
                f"width/height {sample.width}x{sample.height} differ from the image's {size[0]}x{size[1]} "
                "(drop them or give the real size)",
            )
        )
    for j, subject in enumerate(sample.subjects):
        where = f"subjects[{j}].reference"
        ref_size = _image_size(subject.reference.image, sample.line, f"{where}.image", problems, decode)
        if subject.reference.mask is None:
            continue
        mask_size = _image_size(subject.reference.mask, sample.line, f"{where}.mask", problems, decode)
        if ref_size and mask_size:
            allowed = {ref_size}
            if subject.reference.crop is not None:
                allowed.add(crop_pixels(subject.reference.crop, ref_size)[2:])
            if mask_size not in allowed:
                sizes = " or ".join(f"{w}x{h}" for w, h in sorted(allowed))
                problems.append(
                    Problem(
                        sample.line,
                        f"{where}.mask",
                        f"mask is {mask_size[0]}x{mask_size[1]} (must be the reference image's size or its crop's: {sizes})",
                    )
                )
    return problems


def crop_pixels(crop: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel rectangle (left, top, width, height) of a normalised crop box, rounded outwards, at least 1 px."""
    width, height = size
    # Coordinates within 1/100 px of a pixel edge snap to it: boxes are stored with 6 decimals, and
    # 25/96 stored as 0.260417 must still end at pixel 25, not 26.
    snap = 0.01
    left = min(int(math.floor(crop[0] * width + snap)), width - 1)
    top = min(int(math.floor(crop[1] * height + snap)), height - 1)
    right = max(int(math.ceil(crop[2] * width - snap)), left + 1)
    bottom = max(int(math.ceil(crop[3] * height - snap)), top + 1)
    return left, top, min(right, width) - left, min(bottom, height) - top


def _image_size(
    path: Path, line: int, where: str, problems: list[Problem], decode: bool = False
) -> tuple[int, int] | None:
    try:
        with PIL.Image.open(path) as image:
            if decode:
                image.load()
            return image.size
    except FileNotFoundError:
        problems.append(Problem(line, where, f"file not found: {path}", "missing"))
    except (*IMAGE_READ_ERRORS, ValueError) as error:
        problems.append(Problem(line, where, f"cannot read {path} as an image ({error})", "unreadable"))
    return None


def shard_file_name(number: int) -> str:
    """The file of shard `number` of a sharded manifest."""
    return f"manifest-{number:05d}.jsonl"


def write_index(folder: str | os.PathLike, shards: list[dict[str, Any]]) -> Path:
    """Write `folder/manifest-index.json` listing `shards` ({"file", "samples"[, "source"]}, in order)."""
    path = Path(folder) / INDEX_NAME
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "samples": sum(int(shard["samples"]) for shard in shards),
        "shards": shards,
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


def manifest_files(path: str | os.PathLike) -> list[Path]:
    """The JSON-lines files of a manifest: the file itself, or the shards its index lists, in order.

    `path` is a `.jsonl` manifest, a `manifest-index.json`, or a folder holding one of
    `manifest-index.json` and `manifest.jsonl`.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in (INDEX_NAME, "manifest.jsonl") if (path / name).is_file()]
        if not found:
            unfinished = any(path.glob("manifest-*.jsonl"))
            raise FileNotFoundError(
                f"no manifest in {path} (expected {INDEX_NAME} or manifest.jsonl)"
                + ("; it holds shards of a build that did not finish: run the build again to finish it" * unfinished)
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix.lower() != ".json":
        return [path]
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(path, [Problem(0, "", f"not a valid manifest index ({error})")]) from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise ManifestError(
            path,
            [Problem(0, "", f'not a manifest index (expected {{"format": "{INDEX_FORMAT}", "shards": [...]}})')],
        )
    files = []
    for k, shard in enumerate(index["shards"]):
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
            raise ManifestError(path, [Problem(0, f"shards[{k}]", 'expected an object with "file" (a .jsonl path)')])
        file = path.parent / shard["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{path}: shards[{k}]: shard not found: {file}")
        files.append(file)
    return files


def iter_manifest_lines(path: str | os.PathLike) -> Iterator[tuple[Path, int, int, str]]:
    """Yield (file, line number in it, byte offset in it, text) for every non-blank line of a manifest or its shards."""
    for file in manifest_files(path):
        for number, offset, text in _file_lines(file):
            yield file, number, offset, text


def _file_lines(file: Path) -> Iterator[tuple[int, int, str]]:
    with open(file, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, offset, raw.decode("utf-8", errors="replace")
            offset += len(raw)


def _line_count(file: Path) -> int:
    with open(file, "rb") as handle:
        return sum(1 for _ in handle)


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, int, str]]:
    """Yield (line number, byte offset, text) for every non-blank line of a manifest.

    Of a sharded manifest: the line number counts through the shards in order (the line of the
    shards joined into one file) and the offset is in the line's shard.
    """
    before = 0
    for file in manifest_files(path):
        for number, offset, text in _file_lines(file):
            yield before + number, offset, text
        before += _line_count(file)


def validate_manifest(
    path: str | os.PathLike,
    check_files: bool = True,
    open_images: bool = False,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    decode: bool = False,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Sample], list[Problem], int]:
    """Check every line; returns the valid samples, the first `max_problems` problems and the problem count.

    `open_images` opens every image (headers; with `decode`, every pixel) on `workers` threads (image
    decoding releases the GIL); `progress(done, total)` is called as samples are checked.
    """
    files = manifest_files(path)
    sharded = files != [Path(path)]
    parsed, where = [], []
    for file, number, _, text in iter_manifest_lines(path):
        parsed.append(parse_line(text, number, file.parent, check_files))
        where.append(str(file) if sharded else None)
    if open_images:
        to_open = [sample for sample, found in parsed if sample is not None]
        checked = iter(_check_files_parallel(to_open, decode, workers, progress))
        parsed = [(sample, next(checked)) if sample is not None else (sample, found) for sample, found in parsed]
    if sharded:  # problems name the shard they are in
        parsed = [(sample, [replace(p, file=file) for p in found]) for (sample, found), file in zip(parsed, where)]
    samples: list[Sample] = []
    problems: list[Problem] = []
    total = 0
    for sample, found in parsed:
        if found:
            total += len(found)
            problems.extend(found[: max(0, max_problems - len(problems))])
        else:
            samples.append(sample)
    return samples, problems, total


def _check_files_parallel(
    samples: list[Sample], decode: bool, workers: int, progress: Callable[[int, int], None] | None
) -> list[list[Problem]]:
    """`check_sample_files` of each sample, in order, on `workers` threads."""
    from concurrent.futures import ThreadPoolExecutor

    results: list[list[Problem]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for found in pool.map(lambda sample: check_sample_files(sample, decode), samples):
            results.append(found)
            if progress is not None:
                progress(len(results), len(samples))
    return results


def read_manifest(
    path: str | os.PathLike, check_files: bool = True, max_problems: int = DEFAULT_MAX_PROBLEMS
) -> list[Sample]:
    """Parse a whole manifest; raises `ManifestError` listing the problems if there are any."""
    samples, problems, total = validate_manifest(path, check_files=check_files, max_problems=max_problems)
    if problems:
        raise ManifestError(path, problems, total)
    return samples


def write_manifest(samples: list[Sample], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample.to_json(path.parent), ensure_ascii=False) + "\n")


def _relative(path: Path, base: str | os.PathLike) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
