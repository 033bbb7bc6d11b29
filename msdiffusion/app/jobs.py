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

With `init_image: picture.jpg` the job redraws that picture (`strength`), with `inpaint` (a mask) as
well it repaints only the mask's white part; a subject may give `mask` (an image path, or a polygon of
[x, y] fractions) for its region beside or instead of `box`.

Every written image carries the job that made it (with its own seed) in its PNG metadata, so
`msdiff generate --from image.png` makes it again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msdiffusion.errors import UserInputError, did_you_mean
from msdiffusion.loading import NAMED_MODELS
from msdiffusion.settings import (
    GENERATION_FIELDS,
    MODEL_FIELDS,
    PICTURE_FIELDS,
    PIPELINE_STRENGTH,
    SUBJECT_ENCODING_ARGUMENTS,
    SUBJECTS_REGION,
    TEXT_TO_IMAGE,
    ControlNetSpec,
    GenerationSettings,
    LoraSpec,
    ModelSettings,
    PictureSettings,
    SettingsError,
    check_generation_values,
    check_model_values,
    check_picture_values,
    check_strength,
    picture_size,
)

PNG_METADATA_KEY = "msdiffusion-job"
SEED_MODES = ("per-image", "release")
# A job file is a few hundred bytes; these leave room for long prompts and many subjects while keeping
# a hostile job (a huge file, YAML aliases that expand a few hundred bytes into millions of values) cheap.
MAX_JOB_BYTES = 64 * 1024
MAX_JOB_VALUES = 10_000  # values in a job, each use of a YAML alias counted again
QUOTE_CHARS = 60  # the most of a given value an error message repeats

# A job's errors are settings errors (one class, so `except JobError` catches the settings' refusals too).
JobError = SettingsError


class JobProblems(SettingsError):
    """A job with one or more problems; the message lists them all, `problems` holds each without the source."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = [p.removeprefix(f"{source}: ") for p in problems]
        if len(self.problems) == 1:
            message = f"{source}: {self.problems[0]}"
        else:
            message = f"{source}: {len(self.problems)} problems:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` cut to at most `limit` characters, without ever building the whole repr (a value
    can be a YAML alias expanding to millions of items)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Collect:
    """Gathers the problems of independent checks, so that a job's message lists all of them at once."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[str] = []

    def __call__(self, check: Callable, *args, **kwargs):
        try:
            return check(*args, **kwargs)
        except SettingsError as error:
            self.problems.extend(getattr(error, "problems", None) or [str(error).removeprefix(f"{self.source}: ")])
            return None

    def raise_any(self) -> None:
        if self.problems:
            raise JobProblems(self.source, self.problems)


@dataclass
class JobSubject:
    images: list[str]
    phrase: str
    box: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    scale: float | None = None
    # The subject's region in place of its box: a mask image's path (white = the region, any size, stretched
    # over the output) or a polygon of [x, y] fractions. The resampler still reads the box, else the mask's.
    mask: str | list[list[float]] | None = None


@dataclass(kw_only=True)
class Job(ModelSettings, GenerationSettings, PictureSettings):
    """A job file: which models, how to generate (the shared settings), what to start from, and what to draw."""

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
                **({"mask": s.mask} if s.mask is not None else {}),  # older records stay as they were
            }
            for s in self.subjects
        ]
        return data

    def pipeline_arguments(self) -> dict:
        """The settings' pipeline arguments with this job's prompt, subjects, picture and control image, for
        the pipeline of its task (`loading.pipeline_class(job.task, controlnet)`)."""
        from msdiffusion.subjects import load_image

        arguments = super().pipeline_arguments()
        arguments.update(self.picture_arguments())
        if self.init_image is not None and self.size == picture_size(self.init_image):
            # The picture's own size: the pipeline takes it from the picture, without resizing it first.
            del arguments["height"], arguments["width"]
        arguments.update(
            prompt=self.prompt,
            subject_images=[[load_image(p, "subject image") for p in s.images] for s in self.subjects],
            subject_phrases=[s.phrase for s in self.subjects],
            subject_boxes=[s.box for s in self.subjects],
            subject_scales=[s.scale for s in self.subjects]
            if any(s.scale is not None for s in self.subjects)
            else None,
            subject_masks=[_mask_argument(s.mask) for s in self.subjects]
            if any(s.mask is not None for s in self.subjects)
            else None,
        )
        if self.controlnet is not None:
            # Text-to-image ControlNet takes the condition as `image`; image-to-image and inpainting as `control_image`.
            control = "image" if self.task == TEXT_TO_IMAGE else "control_image"
            arguments.update(
                {control: load_image(self.controlnet.image, "controlnet image")},
                controlnet_conditioning_scale=self.controlnet.scale,
                controlnet_image_tokens=self.controlnet.image_tokens,
            )
        return arguments


def _mask_argument(mask: str | list | None) -> Any:
    """A job subject's mask as the pipelines take it: a path, or a polygon as (x, y) tuples."""
    if mask is None or isinstance(mask, str):
        return mask
    return [tuple(point) for point in mask]


# field -> (accepted types, what is allowed); the table is the schema and the error messages.
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    **MODEL_FIELDS,
    "prompt": ((str,), "text that names every subject's phrase"),
    "subjects": (
        (list,),
        "a list of {image, phrase, box, scale}, each with an optional mask (an image path or a polygon "
        "[[x, y], ...]) beside or instead of its box",
    ),
    **GENERATION_FIELDS,
    **PICTURE_FIELDS,
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
MAX_SEED = 2**63 - 1  # the largest seed a torch generator takes
_SUBJECT_FIELDS = {"image", "phrase", "box", "mask", "scale"}
_PICTURE_PATHS = ("init_image", "inpaint")


def _is_path(name: str, value: Any) -> bool:
    """Whether a picture field's value names a file (`inpaint: subjects` does not)."""
    return value is not None and not (name == "inpaint" and value == SUBJECTS_REGION)


def _unknown(name: Any, allowed, where: str) -> JobError:
    hint = did_you_mean(name, allowed) if isinstance(name, str) and len(name) <= 100 else ""
    return JobError(f"{where}: unknown field {quote(name)}{hint}; allowed: {', '.join(sorted(allowed))}.")


def _path(value: Any, base_dir: Path | None, what: str, must_exist: bool = True) -> str:
    if not isinstance(value, str) or not value:
        raise JobError(f"{what}: expected a file path, got {quote(value)}.")
    path = Path(value).expanduser()
    relative = base_dir is not None and not path.is_absolute()
    if relative:
        path = base_dir / path
    if must_exist and not path.exists():
        raise JobError(f"{what}: {quote(value)} does not exist{f' (relative to {base_dir})' if relative else ''}.")
    return str(path.resolve())


def _model_ref(value: str, base_dir: Path | None) -> str:
    """A model given as a local path (resolved against the job file) or a hub id (kept)."""
    if value in NAMED_MODELS:
        return value
    path = Path(value).expanduser()
    local = path if path.is_absolute() or base_dir is None else base_dir / path
    return str(local.resolve()) if local.exists() else value


def job_from_dict(data: Any, source: str = "job", base_dir: Path | None = None) -> Job:
    """Validate a job given as a dict (from a file, flags, or PNG metadata); every problem is named at once.

    A named model set as the base (`msdiff-world`) brings its own generation defaults for the
    fields the job leaves out.
    """
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job is a mapping of fields, got {type(data).__name__}.")
    check_value_count(data, source)
    collect = _Collect(source)
    for name in data:
        if name not in _FIELDS:
            collect.problems.append(str(_unknown(name, _FIELDS, source)))
    missing = [name for name in _REQUIRED if data.get(name) is None or data.get(name) in ("", [])]
    collect.problems += [f"{name}: required field is missing ({_FIELDS[name][1]})." for name in missing]
    # Each known field's type, then its value: a bad field is named once, and the others are still checked.
    given = {
        name: value
        for name, value in data.items()
        if name in _FIELDS and name not in missing and collect(_check_type, name, value, source) is not None
    }
    named = NAMED_MODELS.get(given.get("base"))
    values = {**(named.defaults if named else {}), **given}
    for name in GENERATION_FIELDS:
        if name in values:
            checked = collect(_check_generation_value, name, values[name], source)
            values.update(checked or {name: values[name]})
    collect(check_model_values, values, source)
    for name in ("base", "adapter", "image_encoder", "vae"):
        if values.get(name) is not None:
            values[name] = _model_ref(values[name], base_dir)
    if "loras" in values:
        values["loras"] = [
            collect(_lora, entry, f"{source}: loras[{i}]", base_dir) for i, entry in enumerate(values["loras"])
        ]
    if "subjects" in values:
        values["subjects"] = [
            _subject(entry, f"{source}: subjects[{i}]", base_dir, collect) for i, entry in enumerate(values["subjects"])
        ]
    if values.get("images", 1) < 1:
        collect.problems.append(f"images: got {values['images']}; expected a positive integer.")
    seed, images = values.get("seed"), values.get("images", 1)
    if isinstance(seed, int) and isinstance(images, int) and not 0 <= seed <= MAX_SEED - max(images - 1, 0):
        collect.problems.append(
            f"seed: got {quote(seed)}; expected an integer from 0 to {MAX_SEED} (image k takes seed + k, which "
            "torch's generators must hold)."
        )
    if values.get("seed_mode", "per-image") not in SEED_MODES:
        collect.problems.append(f"seed_mode: got {quote(values['seed_mode'])}; expected {_FIELDS['seed_mode'][1]}.")
    if values.get("controlnet") is not None:
        values["controlnet"] = collect(_controlnet, values["controlnet"], f"{source}: controlnet", base_dir)
    if "output" in values:
        values["output"] = collect(_path, values["output"], base_dir, f"{source}: output", must_exist=False)
        if isinstance(values["output"], str) and Path(values["output"]).is_file():  # found now, not after generating
            collect.problems.append(
                f"{source}: output: {quote(values['output'])} is a file; give a folder to write the images into."
            )
    _picture(values, given, source, base_dir, collect)
    collect.raise_any()
    return Job(**values)


def _picture(values: dict, given: dict, source: str, base_dir: Path | None, collect: _Collect) -> None:
    """The picture fields checked in `values`: paths resolved, `strength` and `inpaint` only with
    `init_image`, and `size` from the picture where the job gives none (a named set's default size included)."""
    if not any(values.get(name) is not None for name in PICTURE_FIELDS):
        return
    missing = False
    for name in _PICTURE_PATHS:
        if _is_path(name, values.get(name)):
            values[name] = collect(_path, values[name], base_dir, f"{source}: {name}")
            missing = missing or values[name] is None
    if missing:  # its problem is listed; the checks below would judge another task than the one meant
        collect(check_strength, values.get("strength"), source)
        return
    steps = values.get("steps") if isinstance(values.get("steps"), int) else None
    collect(check_picture_values, values, source, steps, values.get("controlnet") is not None)
    subjects = [s for s in values.get("subjects") or [] if s is not None]
    if values.get("inpaint") == SUBJECTS_REGION and subjects and not any(any(s.box) or s.mask for s in subjects):
        collect.problems.append(
            f"{source}: inpaint: subjects repaints the subjects' regions, but no subject has a box or a mask; give "
            "them boxes or masks, or give inpaint a mask of the picture."
        )
    if values.get("init_image") is not None and "size" not in given:
        size = collect(picture_size, values["init_image"], f"{source}: init_image")
        if size is not None:
            values["size"] = size


def _check_type(name: str, value: Any, source: str) -> bool:
    """A field's value has one of its accepted types (YAML `yes` is not a number); True, or an error."""
    types, allowed = _FIELDS[name]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise JobError(f"{source}: {name}: got {quote(value)}; expected {allowed}.")
    return True


def _check_generation_value(name: str, value: Any, source: str) -> dict:
    """One generation field checked (and converted) by the settings' own checks."""
    too_long = isinstance(value, (list, str)) and len(value) > 16  # the settings' message would repeat all of it
    if name == "size" and too_long:
        raise JobError(f"{source}: size: got {quote(value)}; expected {GENERATION_FIELDS['size'][1]}.")
    return check_generation_values({name: value}, source)


def check_value_count(data: Any, source: str, limit: int = MAX_JOB_VALUES) -> None:
    """Refuse a job holding more than `limit` values, counting each use of a shared (YAML alias) value
    again: a few hundred bytes of nested aliases expand to billions, and every later step (checks,
    messages) would walk them all. Stops counting at the limit, so it costs at most `limit` steps."""
    count, stack = 0, [data]
    while stack:
        value = stack.pop()
        count += 1
        if count > limit:
            raise JobError(
                f"{source}: more than {limit} values (YAML aliases count each time they are used); "
                "a job lists its fields and subjects, each once."
            )
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


def portable_job(job: Job) -> dict:
    """The job as a job file to hand on: photos (and the control image) by file name, never the folders
    they were in; no output folder, device or dtype (where it runs is the runner's); and only the
    fields that differ from their defaults (a named model set's defaults included)."""
    data = job.to_dict()
    for name in ("output", "device", "dtype"):
        data.pop(name, None)
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(Job)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    named = NAMED_MODELS.get(job.base)
    if named is not None:
        defaults.update(named.defaults)
    first = ("base", "adapter", "image_encoder", "prompt", "subjects")  # the order a person writes a job in
    kept = {
        name: data[name]
        for name in (*first, *(n for n in data if n not in first))
        if name not in defaults or data[name] != defaults[name]
    }
    if "negative_prompt" in kept and kept["negative_prompt"] is None:
        kept["negative_prompt"] = ""  # none (job files read "" as null)
    subjects = []
    for subject in job.subjects:
        names = [Path(p).name for p in subject.images]
        entry: dict = {"image": names if len(names) > 1 else names[0], "phrase": subject.phrase}
        if any(subject.box):
            entry["box"] = subject.box
        if subject.scale is not None:
            entry["scale"] = subject.scale
        if subject.mask is not None:
            entry["mask"] = Path(subject.mask).name if isinstance(subject.mask, str) else subject.mask
        subjects.append(entry)
    kept["subjects"] = subjects
    if job.controlnet is not None:
        kept["controlnet"] = {**kept["controlnet"], "image": Path(job.controlnet.image).name}
    for name in _PICTURE_PATHS:
        if _is_path(name, kept.get(name)):
            kept[name] = Path(kept[name]).name
    return kept


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
    if job.init_image is not None:
        strength = (
            job.strength if job.strength is not None else PIPELINE_STRENGTH[(job.task, job.controlnet is not None)]
        )
        if strength < 0.5:
            warnings.append(
                f"strength {strength}{' (the default)' if job.strength is None else ''} is below 0.5: a subject can "
                "only tint what the picture already has there (--strength 0.7 gives it room)."
            )
        own = picture_size(job.init_image)
        if abs(job.size[0] / job.size[1] - own[0] / own[1]) > 0.02 * own[0] / own[1]:
            warnings.append(
                f"size {job.size[0]}x{job.size[1]} has other proportions than the picture ({own[0]}x{own[1]}): it is "
                "stretched to it (leave size out for the picture's own)."
            )
    return warnings


def _subject(data: Any, where: str, base_dir: Path | None, collect: _Collect) -> JobSubject | None:
    """One subject, its problems added to `collect` (None when it has any)."""
    from msdiffusion.subjects import check_box

    if not isinstance(data, dict):
        collect.problems.append(f"{where}: expected {{image, phrase, box, mask, scale}}, got {quote(data)}.")
        return None
    before = len(collect.problems)
    for name in data:
        if name not in _SUBJECT_FIELDS:
            collect.problems.append(str(_unknown(name, _SUBJECT_FIELDS, where)))
    if "image" not in data or "phrase" not in data:
        collect.problems.append(
            f"{where}: needs `image` (a path, or a list of paths of the same subject) and `phrase`."
        )
        return None
    images = data["image"] if isinstance(data["image"], list) else [data["image"]]
    if not images:
        collect.problems.append(f"{where}.image: an empty list; give at least one image path.")
    paths = [collect(_path, image, base_dir, f"{where}.image") for image in images]
    phrase = data["phrase"]
    if not isinstance(phrase, str) or not phrase.strip():
        collect.problems.append(
            f"{where}.phrase: expected the words naming the subject in the prompt, got {quote(phrase)}."
        )
    box = data.get("box") or [0.0, 0.0, 0.0, 0.0]
    if isinstance(box, list) and len(box) > 16:
        collect.problems.append(f"{where}.box: got {quote(box)}; expected four numbers x0, y0, x1, y1.")
    else:
        try:
            box = list(check_box(box, f"{where}.box"))
        except ValueError as error:
            collect.problems.append(str(error))
    scale = data.get("scale")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0
    ):
        collect.problems.append(
            f"{where}.scale: got {quote(scale)}; expected a number >= 0 (the subject's own strength)."
        )
    mask = data.get("mask")
    if mask is not None:
        mask = collect(_subject_mask, mask, base_dir, f"{where}.mask")
    if len(collect.problems) > before:
        return None
    return JobSubject(paths, phrase, box, None if scale is None else float(scale), mask)


def _subject_mask(value: Any, base_dir: Path | None, what: str) -> str | list[list[float]]:
    """A subject's mask: an image path (resolved; decoded by `check_inputs`), or a polygon of [x, y] fractions."""
    from msdiffusion.subjects import check_polygon

    if isinstance(value, str):
        return _path(value, base_dir, what)
    if not isinstance(value, list) or (value and not all(isinstance(p, list) for p in value)):
        raise JobError(
            f"{what}: got {quote(value)}; expected an image path (white = the subject's region) or a polygon "
            "[[x, y], ...] of three or more fractions of the output."
        )
    try:
        polygon = check_polygon(value, what)
    except ValueError as error:
        text = str(error)  # the polygon's own message, which repeats its points: kept short
        raise JobError(text if len(text) <= 300 else text[:297] + "...") from None
    return [list(point) for point in polygon]


def _lora(data: Any, where: str, base_dir: Path | None) -> LoraSpec:
    if isinstance(data, str):
        data = {"path": data}
    if not isinstance(data, dict):
        raise JobError(f"{where}: expected {{path, scale}} (or just a path), got {quote(data)}.")
    allowed = {"path", "scale", "weight_name"}
    for name in data:
        if name not in allowed:
            raise _unknown(name, allowed, where)
    if not isinstance(data.get("path"), str) or not data["path"]:
        raise JobError(f"{where}: needs `path` (a LoRA .safetensors file, folder or hub id).")
    scale = data.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise JobError(f"{where}.scale: got {quote(scale)}; expected a number (1.0 is the LoRA's full strength).")
    weight_name = data.get("weight_name")
    if weight_name is not None and not isinstance(weight_name, str):
        raise JobError(f"{where}.weight_name: got {quote(weight_name)}; expected a file name.")
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
        raise JobError(f"{where}.scale: got {quote(scale)}; expected a number.")
    image_tokens = data.get("image_tokens", False)
    if not isinstance(image_tokens, bool):
        raise JobError(f"{where}.image_tokens: got {quote(image_tokens)}; expected true or false.")
    model, image = _model_ref(data["model"], base_dir), _path(data["image"], base_dir, f"{where}.image")
    return ControlNetSpec(model, image, float(scale), image_tokens)


def parse_job_text(text: str, source: str = "job") -> dict:
    """The raw mapping of a job's YAML or JSON text (validated later by `job_from_dict`).

    Refuses text over `MAX_JOB_BYTES` and (YAML aliases expanded) over `MAX_JOB_VALUES` values, and
    names a syntax error by `source`, line and column.
    """
    import yaml

    if len(text) > MAX_JOB_BYTES:
        raise JobError(f"{source}: {len(text)} characters; a job is at most {MAX_JOB_BYTES // 1024} KiB.")
    try:
        data = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = f" ({error.context})" if error.context else ""
        raise JobError(f"{source}: not valid YAML/JSON{where}: {error.problem}{context}.") from None
    except yaml.YAMLError as error:
        raise JobError(f"{source}: not valid YAML/JSON: {quote(str(error), 200)}") from None
    except RecursionError:
        raise JobError(f"{source}: not a job: its values are nested too deeply.") from None
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job file holds a mapping of fields (base, adapter, prompt, subjects, ...).")
    check_value_count(data, source)
    return data


def read_job_file(path: str | Path, label: str | None = None) -> dict:
    """The raw mapping of a YAML or JSON job file (validated later, with flags applied); messages name it
    `label` (default: its path)."""
    path = Path(path)
    label = label or str(path)
    if not path.is_file():
        raise JobError(f"job file {quote(str(path), 200)} not found.")
    if path.stat().st_size > MAX_JOB_BYTES:
        raise JobError(f"{label}: {path.stat().st_size} bytes; a job file is at most {MAX_JOB_BYTES // 1024} KiB.")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise JobError(f"{label}: not a text file (a job file is YAML or JSON text).") from None
    return parse_job_text(text, label)


def read_job_from_png(path: str | Path, max_pixels: int | None = None) -> dict:
    """The job recorded in an image written by msdiff (`msdiff generate`, the page).

    Subject photos named relative to the image (the page's PNGs name them by file name) are taken
    from beside it. `max_pixels`: refuse larger images before decoding them.
    """
    import PIL.Image

    path = Path(path)
    try:
        with PIL.Image.open(path) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise JobError(
                    f"{path.name}: {image.width}x{image.height} pixels; an image made by msdiff is at most "
                    f"{max_pixels // 1_000_000} megapixels."
                )
            # msdiff writes its job before the pixels, where the header holds it; other writers may
            # put it after them, which only decoding the image finds.
            text = image.info.get(PNG_METADATA_KEY)
            if text is None and hasattr(image, "text"):
                text = image.text.get(PNG_METADATA_KEY)
    except (OSError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, SyntaxError, ValueError) as error:
        raise JobError(f"--from {path}: cannot read the image ({quote(str(error), 200)}).") from None
    if not text:
        raise JobError(
            f"--from {path}: the image has no msdiffusion job in its metadata (was it written by msdiff generate?)."
        )
    if len(text) > MAX_JOB_BYTES:
        raise JobError(
            f"--from {path}: its job is {len(text)} characters; a job is at most {MAX_JOB_BYTES // 1024} KiB."
        )
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise JobError(f"--from {path}: the job in its metadata is not valid JSON.") from None
    if not isinstance(data, dict):
        raise JobError(f"--from {path}: the job in its metadata is not a mapping of fields.")
    check_value_count(data, f"--from {path}")

    def beside(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str(path.resolve().parent / value)
        return value

    for subject in data.get("subjects") if isinstance(data.get("subjects"), list) else []:
        if isinstance(subject, dict) and isinstance(subject.get("image"), (str, list)):
            images = subject["image"] if isinstance(subject["image"], list) else [subject["image"]]
            subject["image"] = [beside(i) for i in images] if isinstance(subject["image"], list) else beside(images[0])
        if isinstance(subject, dict) and isinstance(subject.get("mask"), str):
            subject["mask"] = beside(subject["mask"])
    for name in _PICTURE_PATHS:
        if data.get(name) is None:
            data.pop(name, None)
        elif _is_path(name, data[name]):
            data[name] = beside(data[name])
    return data


def check_inputs(job: Job) -> None:
    """Decode every subject and control image (cheap; done before any model loads)."""
    from msdiffusion.checks import check_image_file

    for j, subject in enumerate(job.subjects):
        for k, image in enumerate(subject.images):
            label = f"subjects[{j}].image" + (f"[{k}]" if len(subject.images) > 1 else "") + f" ({subject.phrase})"
            check_image_file(image, label)
    if job.controlnet is not None:
        check_image_file(job.controlnet.image, "controlnet.image")
    for name in _PICTURE_PATHS:
        if _is_path(name, getattr(job, name)):
            check_image_file(getattr(job, name), name)
    for j, subject in enumerate(job.subjects):
        if isinstance(subject.mask, str):
            _check_mask_file(subject.mask, f"subjects[{j}].mask ({subject.phrase})")


def _check_mask_file(path: str, what: str) -> None:
    """A subject's mask image decodes and has a region (the pipeline would refuse an empty one after loading)."""
    from msdiffusion.checks import InputCheckError, check_image_file
    from msdiffusion.subjects import check_mask

    check_image_file(path, what)
    try:
        check_mask(path, what)
    except ValueError as error:
        raise InputCheckError(str(error)) from None


def _next_stem(folder: Path) -> str:
    """`msdiff-00001`, `msdiff-00002`, ...: the number after every earlier result's."""
    taken = [int(p.stem.split("-")[1]) for p in folder.glob("msdiff-*.png") if p.stem.split("-")[1].isdigit()]
    return f"msdiff-{max(taken, default=0) + 1:05d}"


def _save_numbered(image, folder: Path, pnginfo) -> Path:
    """Save `image` as the next `msdiff-NNNNN.png`, created exclusively: two runs writing into one folder at
    once (one per GPU, say) each take their own number instead of one overwriting the other's image."""
    while True:
        path = folder / f"{_next_stem(folder)}.png"
        try:
            handle = open(path, "xb")
        except FileExistsError:  # another run took this number since the folder was listed
            continue
        try:
            with handle:
                image.save(handle, format="PNG", pnginfo=pnginfo)
        except BaseException:
            path.unlink(missing_ok=True)  # no empty or partial image left to hold the number
            raise
        return path


def run_job(
    job: Job,
    pipe=None,
    progress: bool = True,
    log=print,
    on_step: Callable[[], None] | None = None,
    portable: bool = False,
) -> list[Path]:
    """Generate the job's images (one seed each: `seed`, `seed + 1`, ...) and write them with previews.

    `pipe`: a pipeline already loaded (else the job's models are loaded); the job's scheduler is set on
    it for this job and the pipeline's own put back after. `on_step`: called before each image and
    between denoising steps; an exception it raises stops the job there. `portable`: the PNGs record
    `portable_job` (photos by file name, only the fields that differ from the defaults) instead of
    the whole job with its paths.
    """
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
            pipe = load_pipeline(job, device, dtype, adapter, task=job.task)
        except (OSError, ValueError) as error:
            if isinstance(error, UserInputError):
                raise
            # The locations were checked; what is left is a library refusing a model's files.
            text = str(error).strip()
            first_line = text.splitlines()[0] if text else type(error).__name__
            raise JobError(f"cannot load the models: {type(error).__name__}: {first_line}") from error
    else:
        pipe = _for_task(pipe, job)
    check_phrases(job, getattr(pipe, "tokenizer", None))
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    own_scheduler = getattr(pipe, "scheduler", None)
    if job.scheduler and type(own_scheduler).__name__ != job.scheduler:
        from msdiffusion.loading import scheduler_named

        pipe.scheduler = scheduler_named(job.scheduler, own_scheduler)  # for this job only
    try:
        return _run_loaded(job, pipe, progress, log, on_step, portable)
    finally:
        if own_scheduler is not None and pipe.scheduler is not own_scheduler:
            pipe.scheduler = own_scheduler


def check_phrases(job: Job, tokenizer) -> None:
    """Each subject's phrase must be words of its prompt, as often as it is given (as `--help` and the page
    say): refused here, where the released pipeline only warns and goes on without locating it."""
    if tokenizer is None:  # a stand-in pipeline
        return
    from msdiffusion.layout import phrase_token_positions

    phrases = [s.phrase for s in job.subjects]
    positions = phrase_token_positions(tokenizer, job.prompt, phrases, job.phrase_matching)
    missing = [phrase for phrase, found in zip(phrases, positions) if not found]
    if missing:
        raise JobError(
            f"subjects: the phrase(s) {', '.join(quote(p) for p in missing)} are not in the prompt {quote(job.prompt)} "
            "(or not as often as given): use the exact words of the prompt as each subject's phrase."
        )


def _for_task(pipe, job: Job):
    """The loaded pipeline for the job's task: itself, or one built on its models (`from_pipe`), so that a
    loaded text-to-image pipeline (the page's, a script's) also redraws and inpaints without loading again."""
    from msdiffusion.loading import pipeline_for_task

    if job.controlnet is not None and getattr(pipe, "controlnet", None) is None:
        raise JobError("controlnet: the loaded pipeline has no ControlNet; load one with the job's controlnet.")
    return pipeline_for_task(pipe, job.task)


def _run_loaded(job: Job, pipe, progress: bool, log, on_step, portable: bool) -> list[Path]:
    import PIL.Image
    import PIL.PngImagePlugin
    import torch

    from msdiffusion.preview import attention_map_image, draw_layout, subjects_sheet
    from msdiffusion.subjects import load_image

    seed = job.seed if job.seed is not None else random.randrange(2**31)
    folder = Path(job.output)
    folder.mkdir(parents=True, exist_ok=True)
    if on_step is not None:
        on_step()
    arguments = job.pipeline_arguments()
    if on_step is not None:

        def step_end(pipeline, step, timestep, tensors):
            on_step()
            return tensors

        arguments["callback_on_step_end"] = step_end
    subject_images = arguments["subject_images"]
    preview_boxes = [_preview_box(s) for s in job.subjects] if job.preview else []
    written: list[Path] = []

    def write(image, image_seed: int, record: Job, maps, repaint) -> None:
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text(PNG_METADATA_KEY, json.dumps(portable_job(record) if portable else record.to_dict()))
        info.add_text("prompt", job.prompt)
        path = _save_numbered(image, folder, info)
        stem = path.stem
        written.append(path)
        if job.preview:
            phrases = [s.phrase for s in job.subjects]
            regions = None
            if maps is not None:  # where auto layout put each subject (shown for those without a box)
                regions = [(maps[j] > job.mask_threshold).cpu().numpy() for j in range(len(job.subjects))]
            masks = _preview_masks(job.subjects, image.size)
            preview = draw_layout(image, preview_boxes, phrases, regions=regions, masks=masks)
            preview.save(folder / f"{stem}-layout.png")
            if job.init_image is None:
                sheet = subjects_sheet(subject_images, phrases, preview)
            else:  # the picture with the subjects' regions (the repainted part bright), then the result as made
                picture = load_image(job.init_image, "init_image").resize(image.size, PIL.Image.LANCZOS)
                alpha = None if repaint is None else repaint[0].numpy()
                regions_drawn = draw_layout(picture, preview_boxes, phrases, masks=masks, repainted=alpha)
                sheet = subjects_sheet(subject_images, phrases, image, picture=regions_drawn)
            sheet.save(folder / f"{stem}-sheet.png")
            written.extend([folder / f"{stem}-layout.png", folder / f"{stem}-sheet.png"])
        if job.save_masks and maps is not None:
            for j, subject in enumerate(job.subjects):
                mask_path = folder / f"{stem}-mask{j}-{_slug(subject.phrase)}.png"
                attention_map_image(maps[j], image.size).save(mask_path)
                written.append(mask_path)
        if job.save_masks and repaint is not None:  # how much of each pixel was repainted (white) or kept
            repaint_path = folder / f"{stem}-repainted.png"
            PIL.Image.fromarray((repaint[0].numpy() * 255).round().astype("uint8")).save(repaint_path)
            written.append(repaint_path)
        log(f"wrote {path} (seed {image_seed}{', release draw' if job.seed_mode == 'release' else ''})")

    if job.seed_mode == "release":
        # As the released generate(): one generator on the pipeline's device draws every image's noise
        # in one batch, so its images can be matched seed for seed (on the same kind of device).
        generator = torch.Generator(pipe._execution_device).manual_seed(seed)
        out = pipe(**arguments, num_images_per_prompt=job.images, generator=generator)
        record = dataclasses.replace(job, seed=seed)  # the batch is made again as a whole
        for i in range(job.images):
            write(out.images[i], seed, record, _maps(out, i), _repainted(out, i))
    else:
        if job.images > 1:  # the subjects are encoded once, for every image
            subject_arguments = (
                "subject_images",
                "subject_phrases",
                "subject_boxes",
                "subject_scales",
                "subject_masks",
                *SUBJECT_ENCODING_ARGUMENTS,
            )
            arguments["prepared_subjects"] = pipe.prepare_subjects(
                **{name: arguments.pop(name) for name in subject_arguments}
            )
        for i in range(job.images):  # each image its own CPU generator: the same noise on any device
            if on_step is not None:
                on_step()
            if job.images > 1:  # the step bar says which image it is drawing
                pipe.set_progress_bar_config(disable=not progress, leave=False, desc=f"image {i + 1}/{job.images}")
            out = pipe(**arguments, generator=torch.Generator("cpu").manual_seed(seed + i))
            write(
                out.images[0],
                seed + i,
                dataclasses.replace(job, seed=seed + i, images=1),
                _maps(out, 0),
                _repainted(out, 0),
            )
    return written


def _preview_box(subject: JobSubject) -> list[float]:
    """The box the preview outlines: the subject's, else its mask's bounding box (the one the resampler reads)."""
    if any(subject.box) or subject.mask is None:
        return subject.box
    from msdiffusion.subjects import check_mask, mask_bounding_box

    return list(mask_bounding_box(check_mask(_mask_argument(subject.mask))))


def _preview_masks(subjects: list[JobSubject], size: tuple[int, int]) -> list | None:
    """Each subject's region mask as a bool array of the output's `size` (width, height), None where it has none."""
    if all(s.mask is None for s in subjects):
        return None
    from msdiffusion.subjects import check_mask, rasterise_polygon

    masks = []
    for subject in subjects:
        mask = None if subject.mask is None else check_mask(_mask_argument(subject.mask))
        if mask is not None and not hasattr(mask, "numpy"):
            mask = rasterise_polygon(mask, size[1], size[0])
        masks.append(None if mask is None else mask.numpy())
    return masks


def _repainted(out, index: int):
    """The (1, H, W) repaint alpha of image `index`, when inpainting pasted the picture back."""
    masks = getattr(out, "repaint_masks", None)
    return None if masks is None else masks[index % masks.shape[0]].cpu()


def _maps(out, index: int):
    """Auto-layout maps (N, h, w) of image `index` of a pipeline output, if auto layout ran."""
    maps = getattr(out, "auto_layout_maps", None)
    return None if maps is None else maps[index]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40] or "subject"
