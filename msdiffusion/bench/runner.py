"""Generate a benchmark's images with MS-Diffusion: deterministic per sample, resumable, sharded.

Layout of an output directory:
    run_config.json                    what the images were generated with (checked on every resume)
    images/<group>/<sample_id>_<k>.png one file per generated image
    manifest.jsonl                     one line per image on disk: its sample, seed, prompt, subjects, settings

Each image's seed comes from (base seed, sample id, image index) alone, so any split of the work
across processes, and any resumption, produces the same files. Under `accelerate launch` every
process takes every `world_size`-th work item (accelerate's PartialState gives rank and size).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from ..atomic import atomic_path
from ..settings import GenerationSettings, ModelSettings
from .definitions import BenchSample, reference_files

MANIFEST = "manifest.jsonl"
RUN_CONFIG = "run_config.json"
BOX_SETTINGS = ("given", "none", "whole")


@dataclass(kw_only=True)
class BenchSettings(ModelSettings, GenerationSettings):
    """Everything that decides the pixels of a benchmark image besides the sample itself: the models
    and generation settings in the job file's words, and what a bench run adds."""

    seed: int = 0
    images_per_sample: int = 1
    prompt_prefix: str = ""
    # Ablations (docs/world.md). boxes: "given" (the sample's), "none" (all zeros: by the released
    # computation the image branch then acts only through auto layout) or "whole" (every box the
    # whole image: a layout-free, IP-Adapter-like use of the subjects).
    boxes: str = "given"
    subject_scales: list[float] | None = None  # by subject position; subjects past the end keep `scale`
    references: int = 1  # reference images per subject, the first ones of its folder

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def defaults(cls) -> dict:
        return {
            f.name: f.default if f.default is not MISSING else f.default_factory()
            for f in fields(cls)
            if f.default is not MISSING or f.default_factory is not MISSING
        }


@dataclass(frozen=True)
class WorkItem:
    sample: BenchSample
    index: int  # which of the sample's images

    @property
    def image(self) -> str:
        """Path of the image relative to the output directory."""
        return f"images/{self.sample.group}/{self.sample.sample_id}_{self.index}.png"


def sample_seed(base_seed: int, sample_id: str, index: int) -> int:
    """A seed that depends only on the run's seed and the image's identity (not on its position)."""
    digest = hashlib.sha256(f"{base_seed}/{sample_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def work_items(samples: Sequence[BenchSample], images_per_sample: int) -> list[WorkItem]:
    return [WorkItem(sample, k) for sample in samples for k in range(images_per_sample)]


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """This process's share: every `world_size`-th item starting at `rank` (balanced, order-stable)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes.")
    return list(items[rank::world_size])


def manifest_record(item: WorkItem, settings: BenchSettings, images_dir: Path) -> dict:
    images_dir = Path(images_dir).resolve()
    subjects = []
    for subject in item.sample.subjects:
        files = reference_files(images_dir, subject.source)
        subjects.append(
            {
                "name": subject.name,
                "phrase": subject.phrase,
                "box": list(subject.box),
                "reference": files[0].relative_to(images_dir).as_posix(),  # what the generator saw
                "references": [f.relative_to(images_dir).as_posix() for f in files],  # what scores compare with
                **({} if subject.identity is None else {"identity": subject.identity}),  # the world bench's
            }
        )
    return {
        "benchmark": item.sample.benchmark,
        "sample_id": item.sample.sample_id,
        "group": item.sample.group,
        "index": item.index,
        "image": item.image,
        "seed": sample_seed(settings.seed, item.sample.sample_id, item.index),
        "prompt": item.sample.prompt,
        "generation_prompt": settings.prompt_prefix + item.sample.prompt,
        "subjects": subjects,
        "images_dir": str(images_dir),
        "settings": settings.to_dict(),
    }


# --- run configuration: a resumed run must not mix settings ---------------------------------------


def check_run_config(output_dir: Path, benchmark: str, settings: BenchSettings, images_dir: Path) -> dict:
    """The run config for `output_dir`; raises ValueError if images there were made differently."""
    config = {"benchmark": benchmark, "images_dir": str(Path(images_dir).resolve()), "settings": settings.to_dict()}
    path = Path(output_dir) / RUN_CONFIG
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing.get("benchmark") != benchmark:
            raise ValueError(
                f"{output_dir} holds a {existing.get('benchmark')} run; use another --output for {benchmark}."
            )
        # a setting added since the directory was made counts as its default
        old = {**BenchSettings.defaults(), **existing.get("settings", {})}
        differing = [key for key in config["settings"] if old.get(key) != config["settings"][key]]
        if differing:
            changes = "; ".join(f"{key}: {old.get(key)!r} -> {config['settings'][key]!r}" for key in differing)
            raise ValueError(
                f"{output_dir} already holds images generated with other settings ({changes}). "
                "Resume with the same settings, or give a new --output."
            )
    return config


def write_json_atomic(path: Path, data, lines: bool = False) -> None:
    """Write JSON (or JSON lines) so that `path` holds the old content or all of the new, whenever a crash comes."""
    from ..atomic import write_text_atomic

    text = "".join(json.dumps(item) + "\n" for item in data) if lines else json.dumps(data, indent=1) + "\n"
    write_text_atomic(path, text)


def read_run_manifest(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"No {MANIFEST} in {output_dir}: run `msdiff bench run --output {output_dir}` first.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_manifest(output_dir: Path, items: Sequence[WorkItem], settings: BenchSettings, images_dir: Path) -> int:
    """Rewrite the manifest from the images on disk: merged with earlier runs' lines, one line per image."""
    output_dir = Path(output_dir)
    records = {}
    if (output_dir / MANIFEST).is_file():
        records = {r["image"]: r for r in read_run_manifest(output_dir)}
    for item in items:
        if (output_dir / item.image).is_file():
            records[item.image] = manifest_record(item, settings, images_dir)
    kept = [records[key] for key in sorted(records) if (output_dir / key).is_file()]
    write_json_atomic(output_dir / MANIFEST, kept, lines=True)
    return len(kept)


# --- generation -----------------------------------------------------------------------------------


def _box(setting: str, box) -> list[float]:
    return {"given": list(box), "none": [0.0] * 4, "whole": [0.0, 0.0, 1.0, 1.0]}[setting]


def _references(images_dir: Path, source: str, count: int) -> Path | list[Path]:
    """The subject's first `count` references (one image itself, as the pipeline takes a single photo)."""
    files = reference_files(images_dir, source)
    if len(files) < count:
        raise ValueError(
            f"{source}: {count} references per subject asked (--references), but {len(files)} found in {images_dir}."
        )
    return files[0] if count == 1 else files[:count]


def _scales(settings: BenchSettings, count: int) -> list[float]:
    given = list(settings.subject_scales or ())[:count]
    return given + [settings.scale] * (count - len(given))


@dataclass
class RunResult:
    assigned: int  # work items this process was given
    generated: int  # images it made
    skipped: int  # images already on disk


def generate_items(
    items: Sequence[WorkItem],
    output_dir: Path,
    images_dir: Path,
    settings: BenchSettings,
    pipeline_factory: Callable[[], object],
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Generate the images of `items` that are not on disk yet. The pipeline is only built if needed."""
    import torch

    output_dir = Path(output_dir)
    todo = [item for item in items if not (output_dir / item.image).is_file()]
    result = RunResult(len(items), 0, len(items) - len(todo))
    if progress and result.skipped:
        progress(result.skipped)
    if not todo:
        return result
    pipe = pipeline_factory()
    arguments = settings.pipeline_arguments()
    negative_prompt = arguments.pop("negative_prompt")  # None stays None: no negative prompt for any prompt
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        # a CPU generator per image: the same noise whatever the device or the batch it lands in
        generators = [
            torch.Generator("cpu").manual_seed(sample_seed(settings.seed, i.sample.sample_id, i.index)) for i in batch
        ]
        images = pipe(
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(batch),
            prompt=[settings.prompt_prefix + item.sample.prompt for item in batch],
            subject_images=[
                [_references(images_dir, s.source, settings.references) for s in item.sample.subjects] for item in batch
            ],
            subject_phrases=[[s.phrase for s in item.sample.subjects] for item in batch],
            subject_boxes=[[_box(settings.boxes, s.box) for s in item.sample.subjects] for item in batch],
            subject_scales=None
            if settings.subject_scales is None
            else [_scales(settings, len(item.sample.subjects)) for item in batch],
            generator=generators,
            **arguments,
        ).images
        for item, image in zip(batch, images):
            path = output_dir / item.image
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:  # a crash never leaves a half-written image that a resume would skip
                image.save(tmp)
        result.generated += len(batch)
        if progress:
            progress(len(batch))
    return result
