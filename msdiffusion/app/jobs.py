"""Generation jobs: the job file format, its validation, running it, and PNGs that remember it.

A job is what `msdiff generate` does, written down (YAML or JSON):

    base: stabilityai/stable-diffusion-xl-base-1.0     # hub id, diffusers folder, or .safetensors file
    adapter: doge1516/MS-Diffusion                       # hub id, ms_adapter.bin, or project folder
    image_encoder: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k
    prompt: a dog and a cat on the beach
    subjects:
      - {image: dog.jpg, phrase: dog, box: [0.0, 0.25, 0.4, 0.75]}
      - {image: cat.jpg, phrase: cat, box: [0.6, 0.25, 1.0, 0.75], scale: 0.8}
    size: [1344, 768]                                    # width, height
    seed: 0
    images: 4

Every written image carries the job that made it (with its own seed) in its PNG metadata, so
`msdiff generate --from image.png` makes it again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msdiffusion.errors import UserInputError, did_you_mean
from msdiffusion.loading import NAMED_MODELS
from msdiffusion.settings import (
    GENERATION_FIELDS,
    MODEL_FIELDS,
    SUBJECT_ENCODING_ARGUMENTS,
    ControlNetSpec,
    GenerationSettings,
    LoraSpec,
    ModelSettings,
    SettingsError,
    check_generation_values,
    check_model_values,
    check_types,
)

PNG_METADATA_KEY = "msdiffusion-job"
SEED_MODES = ("per-image", "release")

# A job's errors are settings errors (one class, so `except JobError` catches the settings' refusals too).
JobError = SettingsError


@dataclass
class JobSubject:
    images: list[str]
    phrase: str
    box: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    scale: float | None = None


@dataclass(kw_only=True)
class Job(ModelSettings, GenerationSettings):
    """A job file: which models, how to generate (the shared settings), and what to draw."""

    prompt: str
    subjects: list[JobSubject]
    seed: int | None = None
    seed_mode: str = "per-image"  # or "release": one generator on the device draws the whole batch
    images: int = 1
    output: str = "outputs"
    preview: bool = True
    save_masks: bool = True

    def to_dict(self) -> dict:
        """The job in job-file form (what `job_from_dict` reads back)."""
        data = dataclasses.asdict(self)
        data["subjects"] = [
            {
                "image": s.images if len(s.images) > 1 else s.images[0],
                "phrase": s.phrase,
                "box": s.box,
                "scale": s.scale,
            }
            for s in self.subjects
        ]
        return data

    def pipeline_arguments(self) -> dict:
        """The settings' pipeline arguments with this job's prompt, subjects and control image."""
        import PIL.Image

        arguments = super().pipeline_arguments()
        arguments.update(
            prompt=self.prompt,
            subject_images=[[PIL.Image.open(p).convert("RGB") for p in s.images] for s in self.subjects],
            subject_phrases=[s.phrase for s in self.subjects],
            subject_boxes=[s.box for s in self.subjects],
            subject_scales=[s.scale for s in self.subjects]
            if any(s.scale is not None for s in self.subjects)
            else None,
        )
        if self.controlnet is not None:
            arguments.update(
                image=PIL.Image.open(self.controlnet.image).convert("RGB"),
                controlnet_conditioning_scale=self.controlnet.scale,
                controlnet_image_tokens=self.controlnet.image_tokens,
            )
        return arguments


# field -> (accepted types, what is allowed); the table is the schema and the error messages.
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    **MODEL_FIELDS,
    "prompt": ((str,), "text that names every subject's phrase"),
    "subjects": ((list,), "a list of {image, phrase, box, scale}"),
    **GENERATION_FIELDS,
    "seed": ((int, type(None)), "an integer (omit for a random one)"),
    "seed_mode": (
        (str,),
        "per-image (image k: a CPU generator seeded seed + k) or release (one generator on the "
        "device seeded seed draws all images at once, as the released code)",
    ),
    "images": ((int,), "a positive integer"),
    "output": ((str,), "a folder to write images into"),
    "preview": ((bool,), "true or false"),
    "save_masks": ((bool,), "true or false"),
}
_REQUIRED = ("base", "adapter", "prompt", "subjects")
_SUBJECT_FIELDS = {"image", "phrase", "box", "scale"}


def _unknown(name: str, allowed, where: str) -> JobError:
    return JobError(
        f"{where}: unknown field {name!r}{did_you_mean(name, allowed)}; allowed: {', '.join(sorted(allowed))}."
    )


def _path(value: Any, base_dir: Path | None, what: str, must_exist: bool = True) -> str:
    if not isinstance(value, str) or not value:
        raise JobError(f"{what}: expected a file path, got {value!r}.")
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if must_exist and not path.exists():
        raise JobError(f"{what}: {value!r} does not exist{f' (relative to {base_dir})' if base_dir else ''}.")
    return str(path.resolve())


def _model_ref(value: str, base_dir: Path | None) -> str:
    """A model given as a local path (resolved against the job file) or a hub id (kept)."""
    if value in NAMED_MODELS:
        return value
    path = Path(value).expanduser()
    local = path if path.is_absolute() or base_dir is None else base_dir / path
    return str(local.resolve()) if local.exists() else value


def job_from_dict(data: Any, source: str = "job", base_dir: Path | None = None) -> Job:
    """Validate a job given as a dict (from a file, flags, or PNG metadata).

    A named model set as the base (`msdiff-world`) brings its own generation defaults for the
    fields the job leaves out.
    """
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job is a mapping of fields, got {type(data).__name__}.")
    for name in data:
        if name not in _FIELDS:
            raise _unknown(name, _FIELDS, source)
    for name in _REQUIRED:
        if data.get(name) in (None, "", []):
            raise JobError(f"{source}: {name}: required field is missing ({_FIELDS[name][1]}).")
    check_types(data, _FIELDS, source)

    named = NAMED_MODELS.get(data["base"])
    values = {**(named.defaults if named else {}), **data}
    values = check_model_values(check_generation_values(values, source), source)
    for name in ("base", "adapter", "image_encoder", "vae"):
        if values.get(name) is not None:
            values[name] = _model_ref(values[name], base_dir)
    if "loras" in values:
        values["loras"] = [_lora(entry, f"{source}: loras[{i}]", base_dir) for i, entry in enumerate(values["loras"])]
    values["subjects"] = [_subject(s, f"{source}: subjects[{i}]", base_dir) for i, s in enumerate(data["subjects"])]
    if values.get("images", 1) < 1:
        raise JobError(f"{source}: images: got {values['images']}; expected a positive integer.")
    if values.get("seed_mode", "per-image") not in SEED_MODES:
        raise JobError(f"{source}: seed_mode: got {values['seed_mode']!r}; expected {_FIELDS['seed_mode'][1]}.")
    if values.get("controlnet") is not None:
        values["controlnet"] = _controlnet(values["controlnet"], f"{source}: controlnet", base_dir)
    if "output" in values:
        values["output"] = _path(values["output"], base_dir, f"{source}: output", must_exist=False)
    return Job(**values)


def job_warnings(job: Job) -> list[str]:
    """Settings that are valid but probably not what was meant (one line each)."""
    warnings = []
    if job.mask_threshold is not None and job.start_step >= job.steps:
        warnings.append(
            f"start_step {job.start_step} is not below steps {job.steps}: auto layout never takes over "
            f"(lower --start-step, or raise --steps)."
        )
    if job.base not in NAMED_MODELS and min(job.size) < 512:
        warnings.append(
            f"size {job.size[0]}x{job.size[1]}: SDXL was trained at about 1024x1024 and degrades below 512."
        )
    if 0 < job.guidance < 1:
        warnings.append(f"guidance {job.guidance} is below 1: classifier-free guidance is off (as with 1).")
    return warnings


def _subject(data: Any, where: str, base_dir: Path | None) -> JobSubject:
    from msdiffusion.subjects import check_box

    if not isinstance(data, dict):
        raise JobError(f"{where}: expected {{image, phrase, box, scale}}, got {data!r}.")
    for name in data:
        if name not in _SUBJECT_FIELDS:
            raise _unknown(name, _SUBJECT_FIELDS, where)
    if "image" not in data or "phrase" not in data:
        raise JobError(f"{where}: needs `image` (a path, or a list of paths of the same subject) and `phrase`.")
    images = data["image"] if isinstance(data["image"], list) else [data["image"]]
    if not images:
        raise JobError(f"{where}.image: an empty list; give at least one image path.")
    paths = [_path(image, base_dir, f"{where}.image") for image in images]
    phrase = data["phrase"]
    if not isinstance(phrase, str) or not phrase.strip():
        raise JobError(f"{where}.phrase: expected the words naming the subject in the prompt, got {phrase!r}.")
    box = data.get("box") or [0.0, 0.0, 0.0, 0.0]
    try:
        box = list(check_box(box, f"{where}.box"))
    except ValueError as error:
        raise JobError(str(error)) from None
    scale = data.get("scale")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0
    ):
        raise JobError(f"{where}.scale: got {scale!r}; expected a number >= 0 (the subject's own strength).")
    return JobSubject(paths, phrase, box, None if scale is None else float(scale))


def _lora(data: Any, where: str, base_dir: Path | None) -> LoraSpec:
    if isinstance(data, str):
        data = {"path": data}
    if not isinstance(data, dict):
        raise JobError(f"{where}: expected {{path, scale}} (or just a path), got {data!r}.")
    allowed = {"path", "scale", "weight_name"}
    for name in data:
        if name not in allowed:
            raise _unknown(name, allowed, where)
    if not isinstance(data.get("path"), str) or not data["path"]:
        raise JobError(f"{where}: needs `path` (a LoRA .safetensors file, folder or hub id).")
    scale = data.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise JobError(f"{where}.scale: got {scale!r}; expected a number (1.0 is the LoRA's full strength).")
    weight_name = data.get("weight_name")
    if weight_name is not None and not isinstance(weight_name, str):
        raise JobError(f"{where}.weight_name: got {weight_name!r}; expected a file name.")
    return LoraSpec(_model_ref(data["path"], base_dir), float(scale), weight_name)


def _controlnet(data: dict, where: str, base_dir: Path | None) -> ControlNetSpec:
    allowed = {"model", "image", "scale", "image_tokens"}
    for name in data:
        if name not in allowed:
            raise _unknown(name, allowed, where)
    if not isinstance(data.get("model"), str) or "image" not in data:
        raise JobError(f"{where}: needs `model` (hub id or folder) and `image` (the control image path).")
    scale = data.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise JobError(f"{where}.scale: got {scale!r}; expected a number.")
    image_tokens = data.get("image_tokens", False)
    if not isinstance(image_tokens, bool):
        raise JobError(f"{where}.image_tokens: got {image_tokens!r}; expected true or false.")
    model, image = _model_ref(data["model"], base_dir), _path(data["image"], base_dir, f"{where}.image")
    return ControlNetSpec(model, image, float(scale), image_tokens)


def read_job_file(path: str | Path) -> dict:
    """The raw mapping of a YAML or JSON job file (validated later, with flags applied)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise JobError(f"job file {str(path)!r} not found.")
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as error:
        raise JobError(f"{path}: not valid YAML/JSON: {error}") from None
    if not isinstance(data, dict):
        raise JobError(f"{path}: a job file holds a mapping of fields (base, adapter, prompt, subjects, ...).")
    return data


def read_job_from_png(path: str | Path) -> dict:
    """The job recorded in an image written by `msdiff generate`."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            text = image.text.get(PNG_METADATA_KEY) if hasattr(image, "text") else None
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise JobError(f"--from {path}: cannot read the image ({error}).") from None
    if not text:
        raise JobError(
            f"--from {path}: the image has no msdiffusion job in its metadata (was it written by msdiff generate?)."
        )
    return json.loads(text)


def check_inputs(job: Job) -> None:
    """Decode every subject and control image (cheap; done before any model loads)."""
    from msdiffusion.checks import check_image_file

    for j, subject in enumerate(job.subjects):
        for k, image in enumerate(subject.images):
            label = f"subjects[{j}].image" + (f"[{k}]" if len(subject.images) > 1 else "") + f" ({subject.phrase})"
            check_image_file(image, label)
    if job.controlnet is not None:
        check_image_file(job.controlnet.image, "controlnet.image")


def _next_stem(folder: Path) -> str:
    """`msdiff-00001`, `msdiff-00002`, ...: never overwrite an earlier result."""
    taken = [int(p.stem.split("-")[1]) for p in folder.glob("msdiff-*.png") if p.stem.split("-")[1].isdigit()]
    return f"msdiff-{max(taken, default=0) + 1:05d}"


def run_job(job: Job, pipe=None, progress: bool = True, log=print) -> list[Path]:
    """Generate the job's images (one seed each: `seed`, `seed + 1`, ...) and write them with previews."""
    import PIL.Image
    import PIL.PngImagePlugin
    import torch

    from msdiffusion.preview import attention_map_image, draw_layout, subjects_sheet

    check_inputs(job)
    if not progress:
        from msdiffusion.app.cli import quiet_libraries

        quiet_libraries()
    if pipe is None:
        from msdiffusion.loading import check_models, device_and_dtype, load_pipeline

        adapter = check_models(job)
        device, dtype = device_and_dtype(job.device, job.dtype)
        log(f"Loading {job.base} + {job.adapter} on {device} ({dtype})")
        try:
            pipe = load_pipeline(job, device, dtype, adapter)
        except (OSError, ValueError) as error:
            if isinstance(error, UserInputError):
                raise
            # The locations were checked; what is left is a library refusing a model's files.
            text = str(error).strip()
            first_line = text.splitlines()[0] if text else type(error).__name__
            raise JobError(f"cannot load the models: {type(error).__name__}: {first_line}") from error
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    seed = job.seed if job.seed is not None else random.randrange(2**31)
    folder = Path(job.output)
    folder.mkdir(parents=True, exist_ok=True)
    arguments = job.pipeline_arguments()
    subject_images = arguments["subject_images"]
    written: list[Path] = []

    def write(image, image_seed: int, record: dict, maps) -> None:
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text(PNG_METADATA_KEY, json.dumps(record))
        info.add_text("prompt", job.prompt)
        stem = _next_stem(folder)
        path = folder / f"{stem}.png"
        image.save(path, pnginfo=info)
        written.append(path)
        if job.preview:
            phrases = [s.phrase for s in job.subjects]
            regions = None
            if maps is not None:  # where auto layout put each subject (shown for those without a box)
                regions = [(maps[j] > job.mask_threshold).cpu().numpy() for j in range(len(job.subjects))]
            preview = draw_layout(image, [s.box for s in job.subjects], phrases, regions=regions)
            preview.save(folder / f"{stem}-layout.png")
            subjects_sheet(subject_images, phrases, preview).save(folder / f"{stem}-sheet.png")
            written.extend([folder / f"{stem}-layout.png", folder / f"{stem}-sheet.png"])
        if job.save_masks and maps is not None:
            for j, subject in enumerate(job.subjects):
                mask_path = folder / f"{stem}-mask{j}-{_slug(subject.phrase)}.png"
                attention_map_image(maps[j], image.size).save(mask_path)
                written.append(mask_path)
        log(f"wrote {path} (seed {image_seed}{', release draw' if job.seed_mode == 'release' else ''})")

    if job.seed_mode == "release":
        # As the released generate(): one generator on the pipeline's device draws every image's noise
        # in one batch, so its images can be matched seed for seed (on the same kind of device).
        generator = torch.Generator(pipe._execution_device).manual_seed(seed)
        out = pipe(**arguments, num_images_per_prompt=job.images, generator=generator)
        record = dataclasses.replace(job, seed=seed).to_dict()  # the batch is made again as a whole
        for i in range(job.images):
            write(out.images[i], seed, record, _maps(out, i))
    else:
        if job.images > 1:  # the subjects are encoded once, for every image
            subject_arguments = (
                "subject_images",
                "subject_phrases",
                "subject_boxes",
                "subject_scales",
                *SUBJECT_ENCODING_ARGUMENTS,
            )
            arguments["prepared_subjects"] = pipe.prepare_subjects(
                **{name: arguments.pop(name) for name in subject_arguments}
            )
        for i in range(job.images):  # each image its own CPU generator: the same noise on any device
            if job.images > 1:  # the step bar says which image it is drawing
                pipe.set_progress_bar_config(disable=not progress, leave=False, desc=f"image {i + 1}/{job.images}")
            out = pipe(**arguments, generator=torch.Generator("cpu").manual_seed(seed + i))
            write(out.images[0], seed + i, dataclasses.replace(job, seed=seed + i, images=1).to_dict(), _maps(out, 0))
    return written


def _maps(out, index: int):
    """Auto-layout maps (N, h, w) of image `index` of a pipeline output, if auto layout ran."""
    maps = getattr(out, "auto_layout_maps", None)
    return None if maps is None else maps[index]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40] or "subject"
