"""Benchmark definitions (MS-Bench, DreamBench, the world bench) as data, and the samples they expand to.

A *sample* is one prompt with its subjects (reference images, phrase, box); the runner generates
`images_per_sample` images for each. Definitions live in `data/*.json` inside the package so a fresh
install can count, list and run them; the subject photos come from a directory the user points at
(the world bench renders its own, see `world.py`).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
# key -> definition file. Benchmarks defined in a higher layer (the world's, `msdiffusion.world.bench`)
# add themselves with `register_benchmark`, so this package never imports them.
BENCHMARKS: dict[str, Path] = {"msbench": DATA_DIR / "msbench.json", "dreambench": DATA_DIR / "dreambench.json"}
_EXPANDERS: dict[str, Callable[[dict], list]] = {}
# key -> (metric names, report writer) for benchmarks whose report is not MS-Bench's table
REPORTERS: dict[str, tuple[dict, Callable]] = {}


def register_benchmark(
    key: str, definition: Path, expand: Callable[[dict], list], metrics: dict, report: Callable
) -> None:
    """Add a benchmark defined elsewhere: its definition file, how it expands to samples, and its report."""
    BENCHMARKS[key] = definition
    _EXPANDERS[key] = expand
    REPORTERS[key] = (metrics, report)
    load_benchmark.cache_clear()


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class BenchSubject:
    name: str  # the subject's key in the definition, e.g. "dog2"
    phrase: str  # its class word, as it appears in the prompt
    source: str  # reference file, or folder of reference photos, relative to the images directory
    box: tuple[float, float, float, float]
    identity: int | None = None  # the world bench's subjects: which identity the references show


@dataclass(frozen=True)
class BenchSample:
    benchmark: str
    sample_id: str
    group: str  # MS-Bench: combination type; DreamBench: "live" or "object"; world: subject count and layout
    prompt: str
    subjects: tuple[BenchSubject, ...]

    @property
    def combination(self) -> tuple[str, ...]:
        return tuple(subject.name for subject in self.subjects)


@dataclass
class Benchmark:
    key: str
    name: str
    samples: list[BenchSample]
    images_per_sample: int
    definition: dict = field(repr=False)

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(sample.group for sample in self.samples))

    @property
    def num_combinations(self) -> int:
        return len({sample.combination for sample in self.samples})

    def summary(self) -> str:
        unit = "subjects" if self.key == "dreambench" else "combinations"
        return (
            f"{self.name}: {self.num_combinations} {unit}, {len(self.samples)} samples "
            f"({self.images_per_sample} image{'s' if self.images_per_sample > 1 else ''} per sample by default)"
        )


def load_definition(key: str) -> dict:
    if key not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {key!r}; choose one of: {', '.join(BENCHMARKS)}.")
    return json.loads(BENCHMARKS[key].read_text())


@cache
def load_benchmark(key: str) -> Benchmark:
    """The packaged definition of `key`, expanded to samples and checked against its expected counts."""
    definition = load_definition(key)
    if key in _EXPANDERS:
        samples = _EXPANDERS[key](definition)
    else:
        samples = expand_msbench(definition) if key == "msbench" else expand_dreambench(definition)
    benchmark = Benchmark(key, definition["name"], samples, int(definition.get("images_per_sample", 1)), definition)
    expected = definition.get("expected", {})
    found = {
        "combinations": benchmark.num_combinations,
        "subjects": benchmark.num_combinations,
        "samples": len(samples),
    }
    for what, count in expected.items():
        if found[what] != count:
            raise RuntimeError(f"{benchmark.name} definition expands to {found[what]} {what}, expected {count}.")
    return benchmark


def expand_msbench(definition: dict) -> list[BenchSample]:
    """Combinations follow the definition's `note`: distinct unordered subjects when all types are the
    same, one subject per type otherwise; each combination takes every prompt template of its type."""
    subjects_by_type: dict[str, list[str]] = {}
    for name, subject in definition["subjects"].items():
        subjects_by_type.setdefault(subject["type"], []).append(name)

    samples = []
    for combination_type, spec in definition["combination_types"].items():
        types = spec["types"]
        if len(set(types)) == 1:
            combinations = itertools.combinations(subjects_by_type[types[0]], len(types))
        elif len(set(types)) == len(types):
            combinations = itertools.product(*(subjects_by_type[t] for t in types))
        else:  # e.g. ["living", "living", "object"]: the note does not define it, so refuse to guess
            raise ValueError(f"{combination_type}: mixed repeated types {types} are not defined by MS-Bench.")
        for names in combinations:
            subjects = tuple(
                BenchSubject(
                    name, definition["subjects"][name]["class"], definition["subjects"][name]["file"], tuple(box)
                )
                for name, box in zip(names, spec["boxes"])
            )
            for index, template in enumerate(spec["prompts"]):
                prompt = template.format(*(subject.phrase for subject in subjects))
                sample_id = f"{combination_type}.{'+'.join(names)}.p{index}"
                samples.append(BenchSample("msbench", sample_id, combination_type, prompt, subjects))
    return samples


def expand_dreambench(definition: dict) -> list[BenchSample]:
    samples = []
    box = tuple(definition["box"])
    for name, subject in definition["subjects"].items():
        group = "live" if subject["live"] else "object"
        spec = BenchSubject(name, subject["class"], subject["folder"], box)
        for index, template in enumerate(definition["prompts"][group]):
            prompt = template.format(subject["class"])
            samples.append(BenchSample("dreambench", f"dreambench.{name}.p{index:02d}", group, prompt, (spec,)))
    return samples


# --- reference images on disk -------------------------------------------------------------------


def reference_files(images_dir: Path, source: str) -> list[Path]:
    """The reference photos for `source`: the file itself, or the image files of a folder, sorted."""
    path = Path(images_dir) / source
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return []


@dataclass
class Availability:
    """Which samples can be built from an images directory, and why the others cannot."""

    buildable: list[BenchSample]
    missing_sources: dict[str, list[BenchSample]]  # subject source -> samples that need it

    @property
    def unbuildable(self) -> list[BenchSample]:
        seen: dict[str, BenchSample] = {}
        for samples in self.missing_sources.values():
            for sample in samples:
                seen.setdefault(sample.sample_id, sample)
        return list(seen.values())

    def describe(self, images_dir: Path, total: int) -> list[str]:
        lines = [f"buildable from {images_dir}: {len(self.buildable)} of {total} samples"]
        for source, samples in self.missing_sources.items():
            name = next(s.name for s in samples[0].subjects if s.source == source)
            reason = "file not found" if Path(source).suffix.lower() in IMAGE_SUFFIXES else "no folder of images"
            per_group = ", ".join(f"{group} {count}" for group, count in Counter(s.group for s in samples).items())
            lines.append(
                f"  missing {source} (subject {name}: {reason}): {len(samples)} samples cannot be built ({per_group})"
            )
        return lines


def check_images(samples: Sequence[BenchSample], images_dir: Path) -> Availability:
    images_dir = Path(images_dir)
    present: dict[str, bool] = {}
    missing: dict[str, list[BenchSample]] = {}
    buildable = []
    for sample in samples:
        ok = True
        for subject in sample.subjects:
            if subject.source not in present:
                present[subject.source] = bool(reference_files(images_dir, subject.source))
            if not present[subject.source]:
                missing.setdefault(subject.source, []).append(sample)
                ok = False
        if ok:
            buildable.append(sample)
    return Availability(buildable, missing)


# --- choosing a subset ----------------------------------------------------------------------------


def select_samples(
    benchmark: Benchmark, only: Sequence[str] | None = None, fraction: float | None = None, seed: int = 0
) -> list[BenchSample]:
    """Samples matching any of `only` (a group name, or a glob on sample ids), then a seeded random
    `fraction` of them. The choice depends only on the arguments, never on the machine or process."""
    samples = benchmark.samples
    if only:
        unmatched = [p for p in only if not any(_matches(p, s) for s in samples)]
        if unmatched:
            raise ValueError(
                f"{benchmark.name}: {', '.join(map(repr, unmatched))} match no sample. Give a group "
                f"({', '.join(benchmark.groups)}) or a pattern on sample ids such as {samples[0].sample_id!r} "
                f"(see `msdiff bench list --bench {benchmark.key} --samples`)."
            )
        samples = [s for s in samples if any(_matches(p, s) for p in only)]
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
        count = max(1, round(fraction * len(samples)))
        chosen = set(random.Random(seed).sample([s.sample_id for s in samples], count))
        samples = [s for s in samples if s.sample_id in chosen]
    return list(samples)


def _matches(pattern: str, sample: BenchSample) -> bool:
    return pattern == sample.group or fnmatch.fnmatchcase(sample.sample_id, pattern)
