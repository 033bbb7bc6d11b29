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
import difflib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import UserInputError
from .release import RELEASE_NEGATIVE_PROMPT

DEFAULT_IMAGE_ENCODER = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
# Pseudo model id: base, adapter and image encoder all set to it build `msdiffusion.tiny`'s random
# models (what `msdiff demo` uses without weights; images show the wiring, not quality).
TINY = "tiny-random"
# Pseudo model id of the small models trained in the procedural world and shipped in the package
# (`msdiffusion.world`; what `msdiff demo` uses by default). Also a whole set, like TINY.
from .world.weights import WORLD  # noqa: E402  (a constant; the module imports nothing heavy)
PNG_METADATA_KEY = "msdiffusion-job"
DTYPES = ("fp32", "fp16", "bf16")
SEED_MODES = ("per-image", "release")


class JobError(UserInputError):
    """A job file or flag that is not valid; the message names the field and what is allowed."""


@dataclass
class SubjectSpec:
    images: list[str]
    phrase: str
    box: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    scale: float | None = None


@dataclass
class ControlNetSpec:
    model: str
    image: str
    scale: float = 1.0
    image_tokens: bool = False  # true: attend over the subject tokens too, as the released script


@dataclass
class LoraSpec:
    path: str  # a .safetensors file, a folder, or a hub id
    scale: float = 1.0
    weight_name: str | None = None  # the file inside a folder or hub repo


@dataclass
class Job:
    base: str
    adapter: str
    prompt: str
    subjects: list[SubjectSpec]
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    adapter_weight_name: str | None = None
    variant: str | None = None
    vae: str | None = None
    loras: list[LoraSpec] = field(default_factory=list)
    negative_prompt: str | None = RELEASE_NEGATIVE_PROMPT  # the release's; None (or "") for none
    size: list[int] = field(default_factory=lambda: [1024, 1024])  # width, height
    seed: int | None = None
    seed_mode: str = "per-image"  # or "release": one generator on the device draws the whole batch
    images: int = 1
    steps: int = 30
    guidance: float = 7.5
    scale: float = 0.6
    mask_threshold: float | None = None
    start_step: int = 5
    phrase_matching: str = "tokens"  # or "release": the released code's phrase positions (auto layout)
    drop_grounding: bool = False
    scheduler: str | None = None
    controlnet: ControlNetSpec | None = None
    output: str = "outputs"
    preview: bool = True
    save_masks: bool = True
    device: str | None = None
    dtype: str | None = None
    cpu_offload: bool = False

    def to_dict(self) -> dict:
        """The job in job-file form (what `job_from_dict` reads back)."""
        data = dataclasses.asdict(self)
        data["subjects"] = [
            {"image": s.images if len(s.images) > 1 else s.images[0], "phrase": s.phrase, "box": s.box, "scale": s.scale}
            for s in self.subjects
        ]
        return data


# field -> (accepted types, what is allowed); the table is the schema and the error messages.
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "base": ((str,), "a hub id, a diffusers SDXL folder, or a single .safetensors/.ckpt file"),
    "adapter": ((str,), "a hub id, an ms_adapter.bin file, or a project adapter folder"),
    "image_encoder": ((str,), "a hub id or folder of a CLIP vision model"),
    "adapter_weight_name": ((str, type(None)), "a file name inside the adapter repo/folder"),
    "variant": ((str, type(None)), "a weight variant of the base's files, e.g. fp16 (half the download)"),
    "vae": ((str, type(None)), "another VAE: a hub id, a diffusers folder or a .safetensors file, e.g. madebyollin/sdxl-vae-fp16-fix"),
    "loras": ((list,), "a list of {path, scale, weight_name}: LoRA .safetensors files, folders or hub ids"),
    "prompt": ((str,), "text that names every subject's phrase"),
    "negative_prompt": ((str, type(None)), f"text (default: the release's {RELEASE_NEGATIVE_PROMPT!r}), or null / \"\" for none"),
    "subjects": ((list,), "a list of {image, phrase, box, scale}"),
    "size": ((list, int, str), "[width, height] or WIDTHxHEIGHT in pixels, multiples of 8 and at least 64 (one number for a square)"),
    "seed": ((int, type(None)), "an integer (omit for a random one)"),
    "seed_mode": ((str,), "per-image (image k: a CPU generator seeded seed + k) or release (one generator on the "
                  "device seeded seed draws all images at once, as the released code)"),
    "images": ((int,), "a positive integer"),
    "steps": ((int,), "a positive integer"),
    "guidance": ((int, float), "a number >= 0 (1 or less disables classifier-free guidance)"),
    "scale": ((int, float), "a number >= 0, 0.6 by default (0.4 suits background-like subjects)"),
    "mask_threshold": ((int, float, type(None)), "a number in [0, 1) to enable auto layout, or null"),
    "start_step": ((int,), "a positive integer"),
    "phrase_matching": ((str,), "tokens (default) or release (the released code's positions of repeated phrases)"),
    "drop_grounding": ((bool,), "true or false"),
    "scheduler": ((str, type(None)), "a diffusers scheduler class name, e.g. DPMSolverMultistepScheduler"),
    "controlnet": ((dict, type(None)), "{model: hub id or folder, image: path, scale: number, image_tokens: bool}"),
    "output": ((str,), "a folder to write images into"),
    "preview": ((bool,), "true or false"),
    "save_masks": ((bool,), "true or false"),
    "device": ((str, type(None)), "cuda, cuda:N, mps or cpu"),
    "dtype": ((str, type(None)), f"one of {', '.join(DTYPES)}"),
    "cpu_offload": ((bool,), "true or false: keep each model on the CPU until it runs (less GPU memory, slower)"),
}
_REQUIRED = ("base", "adapter", "prompt", "subjects")
_SUBJECT_FIELDS = {"image", "phrase", "box", "scale"}


def _unknown(name: str, allowed, where: str) -> JobError:
    close = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return JobError(f"{where}: unknown field {name!r}{hint}; allowed: {', '.join(sorted(allowed))}.")


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
    if value in (TINY, WORLD):
        return value
    path = Path(value).expanduser()
    local = path if path.is_absolute() or base_dir is None else base_dir / path
    return str(local.resolve()) if local.exists() else value


def job_from_dict(data: Any, source: str = "job", base_dir: Path | None = None) -> Job:
    """Validate a job given as a dict (from a file, flags, or PNG metadata)."""
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job is a mapping of fields, got {type(data).__name__}.")
    for name in data:
        if name not in _FIELDS:
            raise _unknown(name, _FIELDS, source)
    for name in _REQUIRED:
        if data.get(name) in (None, "", []):
            raise JobError(f"{source}: {name}: required field is missing ({_FIELDS[name][1]}).")
    for name, value in data.items():
        types, allowed = _FIELDS[name]
        if isinstance(value, bool) and bool not in types:
            types = ()  # YAML `yes` is not a number
        if not isinstance(value, types):
            raise JobError(f"{source}: {name}: got {value!r}; expected {allowed}.")

    values = dict(data)
    if values.get("negative_prompt") == "":
        values["negative_prompt"] = None  # no negative prompt: SDXL then uses zero embeddings
    for name in ("base", "adapter", "image_encoder", "vae"):
        if values.get(name) is not None:
            values[name] = _model_ref(values[name], base_dir)
    if "loras" in values:
        values["loras"] = [_lora(entry, f"{source}: loras[{i}]", base_dir) for i, entry in enumerate(values["loras"])]
    values["subjects"] = [_subject(s, f"{source}: subjects[{i}]", base_dir) for i, s in enumerate(data["subjects"])]
    values["size"] = parse_size(values.get("size", [1024, 1024]), f"{source}: size")
    for name in ("images", "steps", "start_step"):
        if name in values and values[name] < 1:
            raise JobError(f"{source}: {name}: got {values[name]}; expected a positive integer.")
    threshold = values.get("mask_threshold")
    if threshold is not None and not 0 <= threshold < 1:
        raise JobError(f"{source}: mask_threshold: got {threshold}; expected {_FIELDS['mask_threshold'][1]}.")
    for name in ("guidance", "scale"):
        if name in values and not math.isfinite(values[name]):
            raise JobError(f"{source}: {name}: must be a finite number.")
        if name in values and values[name] < 0:
            raise JobError(f"{source}: {name}: got {values[name]}; expected {_FIELDS[name][1]}.")
    if values.get("seed_mode", "per-image") not in SEED_MODES:
        raise JobError(f"{source}: seed_mode: got {values['seed_mode']!r}; expected {_FIELDS['seed_mode'][1]}.")
    if values.get("phrase_matching", "tokens") not in ("tokens", "release"):
        raise JobError(f"{source}: phrase_matching: got {values['phrase_matching']!r}; expected {_FIELDS['phrase_matching'][1]}.")
    if values.get("dtype") is not None and values["dtype"] not in DTYPES:
        raise JobError(f"{source}: dtype: got {values['dtype']!r}; expected {_FIELDS['dtype'][1]}.")
    if values.get("controlnet") is not None:
        values["controlnet"] = _controlnet(values["controlnet"], f"{source}: controlnet", base_dir)
    if "output" in values:
        values["output"] = _path(values["output"], base_dir, f"{source}: output", must_exist=False)
    return Job(**values)


MIN_SIZE = 64  # the UNet halves the 1/8 latent twice; below this its deepest grid is 2x2 or less


def parse_size(value: Any, what: str = "size") -> list[int]:
    """[width, height] from `[w, h]`, a number (square), or text `WxH` / `N` (flags and job files alike)."""
    allowed = _FIELDS["size"][1]
    size = value
    if isinstance(value, str):
        try:
            size = [int(v) for v in value.lower().replace(" ", "").split("x")]
        except ValueError:
            raise JobError(f"{what}: got {value!r}; expected {allowed}, e.g. 1344x768.") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        size = [value]
    if not isinstance(size, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise JobError(f"{what}: got {value!r}; expected {allowed}.")
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or not all(v % 8 == 0 and v >= MIN_SIZE for v in size):
        raise JobError(f"{what}: got {value!r}; expected {allowed}.")
    return size


def job_warnings(job: Job) -> list[str]:
    """Settings that are valid but probably not what was meant (one line each)."""
    warnings = []
    if job.mask_threshold is not None and job.start_step >= job.steps:
        warnings.append(
            f"start_step {job.start_step} is not below steps {job.steps}: auto layout never takes over "
            f"(lower --start-step, or raise --steps)."
        )
    if job.base not in (TINY, WORLD) and min(job.size) < 512:
        warnings.append(f"size {job.size[0]}x{job.size[1]}: SDXL was trained at about 1024x1024 and degrades below 512.")
    if 0 < job.guidance < 1:
        warnings.append(f"guidance {job.guidance} is below 1: classifier-free guidance is off (as with 1).")
    return warnings


def _subject(data: Any, where: str, base_dir: Path | None) -> SubjectSpec:
    from .subjects import check_box

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
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0):
        raise JobError(f"{where}.scale: got {scale!r}; expected a number >= 0 (the subject's own strength).")
    return SubjectSpec(paths, phrase, box, None if scale is None else float(scale))


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
        raise JobError(f"--from {path}: the image has no msdiffusion job in its metadata (was it written by msdiff generate?).")
    return json.loads(text)


def check_inputs(job: Job) -> None:
    """Decode every subject and control image (cheap; done before any model loads)."""
    from .checks import check_image_file

    for j, subject in enumerate(job.subjects):
        for k, image in enumerate(subject.images):
            label = f"subjects[{j}].image" + (f"[{k}]" if len(subject.images) > 1 else "") + f" ({subject.phrase})"
            check_image_file(image, label)
    if job.controlnet is not None:
        check_image_file(job.controlnet.image, "controlnet.image")


def check_models(job: Job):
    """Check the device and every model location before loading; returns the adapter checkpoint, read.

    Local paths must exist and hold the expected files (safetensors headers are checked, which finds
    truncated downloads); hub ids must be in the local cache or the hub reachable. The adapter is
    small next to SDXL, so it is read here in full and handed to `load_pipeline`.
    """
    from .adapter import AdapterMismatchError, load_checkpoint
    from .checks import InputCheckError, check_device, check_locations

    check_device(job.device)
    loras = [
        (str(Path(lora.path) / lora.weight_name) if lora.weight_name and Path(lora.path).is_dir() else lora.path, "lora", f"loras[{i}]")
        for i, lora in enumerate(job.loras)
        if not lora.weight_name or Path(lora.path).is_dir()
    ]
    if job.base in (TINY, WORLD):  # built or shipped with the package
        check_locations(loras)
        return None
    models = [
        (job.base, "base", "base"),
        (job.image_encoder, "image_encoder", "image_encoder"),
        (job.controlnet.model if job.controlnet else None, "controlnet", "controlnet.model"),
        (job.adapter, "adapter", "adapter"),
        (job.vae, "vae", "vae"),
        *loras,
    ]
    check_locations(models, adapter_weight_name=job.adapter_weight_name)
    try:
        return load_checkpoint(job.adapter, weight_name=job.adapter_weight_name)
    except (FileNotFoundError, AdapterMismatchError, OSError) as error:
        raise InputCheckError(f"adapter: {error}") from None


def choose_device(device: str | None, dtype: str | None) -> tuple[str, Any]:
    """CUDA fp16, else Apple MPS fp16, else CPU fp32; either overridable."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dtype is None:
        dtype = "fp32" if device == "cpu" else "fp16"
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def load_pipeline(job: Job, device: str, dtype, adapter=None):
    """The pipeline a job asks for (base, ControlNet, adapter, image encoder, scheduler) on `device`.

    `adapter`: the adapter checkpoint already read (by `check_models`), else `job.adapter` is read.
    """
    import diffusers
    import torch

    from .pipelines import MSDiffusionXLControlNetPipeline, MSDiffusionXLPipeline

    for model_set in (TINY, WORLD):
        named = [name for name in ("base", "adapter", "image_encoder") if getattr(job, name) == model_set]
        if named and len(named) != 3:
            raise JobError(
                f"{model_set!r} is a whole model set: give it as base, adapter and image_encoder together "
                f"(got it for {', '.join(named)})."
            )
    if job.base == TINY:
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline(seed=0, controlnet=job.controlnet is not None)
        pipe = pipe if dtype == torch.float32 else pipe.to(dtype)
    elif job.base == WORLD:
        if job.controlnet is not None:
            raise JobError(f"{WORLD!r} has no ControlNet: remove controlnet from the job.")
        from .world.weights import load_world_pipeline

        try:
            pipe = load_world_pipeline("cpu", dtype)  # moved to `device` (or offloaded) below
        except FileNotFoundError as error:
            raise JobError(str(error)) from None
    else:
        kwargs: dict = {"dtype": dtype}
        cls = MSDiffusionXLPipeline
        if job.controlnet is not None:
            kwargs["controlnet"] = diffusers.ControlNetModel.from_pretrained(job.controlnet.model, dtype=dtype)
            cls = MSDiffusionXLControlNetPipeline
        if job.vae:
            vae_class = diffusers.AutoencoderKL
            load = vae_class.from_single_file if Path(job.vae).suffix in (".safetensors", ".ckpt") else vae_class.from_pretrained
            kwargs["vae"] = load(job.vae, dtype=dtype)
        if Path(job.base).suffix in (".safetensors", ".ckpt"):
            pipe = cls.from_single_file(job.base, **kwargs)
        else:
            pipe = cls.from_pretrained(job.base, variant=job.variant, **kwargs)
        pipe.load_ms_adapter(adapter or job.adapter, image_encoder=job.image_encoder, weight_name=job.adapter_weight_name)
    if job.scheduler:
        _set_scheduler(pipe, job.scheduler)
    if job.loras:  # after the adapter, as the tests check: diffusers' LoRA layers wrap the UNet's projections
        names = []
        for i, lora in enumerate(job.loras):
            path, weight_name = Path(lora.path), lora.weight_name
            source = str(path.parent) if path.is_file() else lora.path
            weight_name = path.name if path.is_file() else weight_name
            pipe.load_lora_weights(source, weight_name=weight_name, adapter_name=f"lora{i}")
            names.append(f"lora{i}")
        pipe.set_adapters(names, adapter_weights=[lora.scale for lora in job.loras])
    if job.cpu_offload:  # each model moves to `device` only while it runs
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def _set_scheduler(pipe, name: str) -> None:
    import diffusers

    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise JobError(f"scheduler: {name!r} is not a diffusers scheduler class (e.g. EulerDiscreteScheduler).")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)


def _next_stem(folder: Path) -> str:
    """`msdiff-00001`, `msdiff-00002`, ...: never overwrite an earlier result."""
    taken = [int(p.stem.split("-")[1]) for p in folder.glob("msdiff-*.png") if p.stem.split("-")[1].isdigit()]
    return f"msdiff-{max(taken, default=0) + 1:05d}"


def run_job(job: Job, pipe=None, progress: bool = True, log=print) -> list[Path]:
    """Generate the job's images (one seed each: `seed`, `seed + 1`, ...) and write them with previews."""
    import PIL.Image
    import PIL.PngImagePlugin
    import torch

    from .preview import attention_map_image, draw_layout, subjects_sheet

    check_inputs(job)
    if not progress:
        from .cli import quiet_libraries

        quiet_libraries()
    if pipe is None:
        adapter = check_models(job)
        device, dtype = choose_device(job.device, job.dtype)
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
    subject_images = [[PIL.Image.open(p).convert("RGB") for p in s.images] for s in job.subjects]
    width, height = job.size
    control = {}
    if job.controlnet is not None:
        control = {
            "image": PIL.Image.open(job.controlnet.image).convert("RGB"),
            "controlnet_conditioning_scale": job.controlnet.scale,
            "controlnet_image_tokens": job.controlnet.image_tokens,
        }

    arguments = dict(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        subject_images=subject_images,
        subject_phrases=[s.phrase for s in job.subjects],
        subject_boxes=[s.box for s in job.subjects],
        subject_scales=[s.scale for s in job.subjects] if any(s.scale is not None for s in job.subjects) else None,
        ms_scale=job.scale,
        drop_grounding_tokens=job.drop_grounding,
        mask_threshold=job.mask_threshold,
        start_step=job.start_step,
        phrase_matching=job.phrase_matching,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        height=height,
        width=width,
        **control,
    )
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
            subject_arguments = ("subject_images", "subject_phrases", "subject_boxes", "subject_scales", "drop_grounding_tokens")
            arguments["prepared_subjects"] = pipe.prepare_subjects(**{name: arguments.pop(name) for name in subject_arguments})
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
