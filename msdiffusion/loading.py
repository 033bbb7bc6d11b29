"""One loader: a pipeline from `ModelSettings`, whatever names its models.

A model is a hub id, a local folder, a single `.safetensors`/`.ckpt` file, or a *named set*
shipped or built with the package (`NAMED_MODELS`): `msdiff-world`, the small models trained in the
procedural world, and `tiny-random`, tiny random SDXL-shaped models. Each named set brings its own
generation defaults (a 64-pixel model is not run at SDXL's 1024). The VAE, ControlNet, LoRAs,
scheduler and CPU offload are applied here too, and `default_device` is the one device policy.

This module names the world's weights folder but imports nothing of `msdiffusion.world`: the world
is a client of the product, not a part of loading.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError, did_you_mean
from .settings import (
    IMAGE_TO_IMAGE,
    INPAINTING,
    TASKS,
    TEXT_TO_IMAGE,
    GenerationSettings,
    ModelSettings,
    SettingsError,
)

TINY = "tiny-random"
WORLD = "msdiff-world"
WORLD_WEIGHTS = Path(__file__).resolve().parent / "world" / "weights"
MODEL_PARTS = ("base", "adapter", "image_encoder")


@dataclass(frozen=True)
class NamedModels:
    name: str
    defaults: dict = field(default_factory=dict)  # generation settings (job-file names) it is run with
    whole_set: bool = False  # its parts only work together (random models built at one go)


NAMED_MODELS = {
    # the small models trained on a CPU in the procedural world (docs/world.md), shipped in the package
    WORLD: NamedModels(
        WORLD,
        {"size": [64, 64], "steps": 25, "guidance": 5.0, "scale": 1.0, "negative_prompt": None},
    ),
    # tiny random SDXL-shaped models: their images are noise, for checking the wiring
    TINY: NamedModels(
        TINY,
        {"size": [512, 384], "steps": 20},
        whole_set=True,
    ),
}


def named_settings(name: str, **overrides) -> GenerationSettings:
    """The generation settings a named set is run with, with `overrides` (job-file names)."""
    return GenerationSettings(**{**NAMED_MODELS[name].defaults, **overrides})


def named_set(models: ModelSettings) -> NamedModels | None:
    """The named set the base belongs to (whose defaults apply), checking how the parts combine.

    `tiny-random` is a whole set. A world part may be combined with others (an adapter trained on
    the world's base, say): each named part is replaced by the shipped folder of that part.
    """
    named = {part: getattr(models, part) for part in MODEL_PARTS if getattr(models, part) in NAMED_MODELS}
    for name, info in NAMED_MODELS.items():
        parts = [part for part, value in named.items() if value == name]
        if info.whole_set and parts and len(parts) != len(MODEL_PARTS):
            raise SettingsError(
                f"{name!r} is a whole model set: give it as base, adapter and image_encoder together (got it for "
                f"{', '.join(parts)})."
            )
    base_set = NAMED_MODELS.get(models.base)
    # Settings that replace or pick a part's files: a whole set is built in memory and has none.
    ignored = [name for name in ("vae", "variant", "adapter_weight_name") if getattr(models, name) is not None]
    if base_set is not None and base_set.whole_set and ignored:
        raise SettingsError(
            f"{base_set.name!r} is a whole model set of random models built in memory: {', '.join(ignored)} would be "
            "ignored; remove it, or write the set to files (`msdiff tiny-models FOLDER`) and give those."
        )
    if models.controlnet is not None and models.base == WORLD:
        raise SettingsError(f"{WORLD!r} has no ControlNet: remove controlnet.")
    return base_set


def world_model_paths() -> dict[str, str]:
    """{base, adapter, image_encoder, evaluator} of the shipped world models."""
    names = {
        "base": "base",
        "adapter": "adapter",
        "image_encoder": "image_encoder",
        "evaluator": "evaluator.safetensors",
    }
    missing = [name for name in names.values() if not (WORLD_WEIGHTS / name).exists()]
    if missing:
        raise UserInputError(
            f"The world's weights are not in {WORLD_WEIGHTS} (missing: {', '.join(missing)}). They ship with the "
            "package; in a source checkout rebuild them with `msdiff world build` (docs/world.md)."
        )
    return {key: str(WORLD_WEIGHTS / name) for key, name in names.items()}


def world_weights_present() -> bool:
    try:
        world_model_paths()
    except UserInputError:
        return False
    return True


def part_location(value: str | None, part: str) -> str | None:
    """Where model `part` (base, adapter, image_encoder) named `value` lies: the shipped folder for the world."""
    return world_model_paths()[part] if value == WORLD else value


def resolved_locations(models: ModelSettings) -> dict[str, str]:
    """{base, adapter, image_encoder} with named world parts replaced by their folders."""
    return {part: part_location(getattr(models, part), part) for part in MODEL_PARTS}


# ---- devices -------------------------------------------------------------------------------------
def default_device() -> str:
    """CUDA, else Apple MPS, else the CPU: where every command runs unless told otherwise."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def device_and_dtype(device: str | None = None, dtype: str | None = None) -> tuple[str, Any]:
    """The device (`default_device` if None) and its torch dtype: fp16 on a GPU, fp32 on the CPU."""
    device = device or default_device()
    return device, torch_dtype(dtype or ("fp32" if device == "cpu" else "fp16"))


# ---- checks before loading -----------------------------------------------------------------------
def check_models(models: ModelSettings):
    """Check the device and every model location before loading; returns the adapter checkpoint, read
    (None for named sets, which are built or shipped with the package).

    Local paths must exist and hold the expected files (safetensors headers are checked, which finds
    truncated downloads); hub ids must be in the local cache or the hub reachable.
    """
    from .adapter import AdapterMismatchError, load_checkpoint
    from .checks import InputCheckError, check_device, check_locations

    check_device(models.device)
    check_scheduler_name(models.scheduler)
    named = named_set(models)
    loras = [
        (
            str(Path(lora.path) / lora.weight_name) if lora.weight_name and Path(lora.path).is_dir() else lora.path,
            "lora",
            f"loras[{i}]",
        )
        for i, lora in enumerate(models.loras)
        if not lora.weight_name or Path(lora.path).is_dir()
    ]
    if named is not None and named.whole_set:
        check_locations(loras)
        return None
    locations = resolved_locations(models)
    checks = [
        (locations["base"], "base", "base"),
        (locations["image_encoder"], "image_encoder", "image_encoder"),
        (models.controlnet.model if models.controlnet else None, "controlnet", "controlnet.model"),
        (locations["adapter"], "adapter", "adapter"),
        (models.vae, "vae", "vae"),
        *loras,
    ]
    check_locations(checks, adapter_weight_name=models.adapter_weight_name)
    try:
        return load_checkpoint(locations["adapter"], weight_name=models.adapter_weight_name)
    except (FileNotFoundError, AdapterMismatchError, OSError) as error:
        raise InputCheckError(f"adapter: {error}") from None


def check_scheduler_name(name: str | None) -> None:
    """A scheduler is a diffusers scheduler class name; refused before loading, with the close match."""
    if name is None:
        return
    import diffusers

    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config") or not name.endswith("Scheduler"):
        known = [n for n in dir(diffusers) if n.endswith("Scheduler") and n[0].isupper()]
        hint = did_you_mean(name, known, cutoff=0.5) or " (e.g. EulerDiscreteScheduler)"
        raise SettingsError(f"scheduler: {name!r} is not a diffusers scheduler class{hint}.")


def scheduler_named(name: str, current):
    """The diffusers scheduler class `name` configured from the scheduler `current` (its training schedule)."""
    import diffusers

    check_scheduler_name(name)
    return getattr(diffusers, name).from_config(current.config)


# ---- loading -------------------------------------------------------------------------------------
def pipeline_class(task: str = TEXT_TO_IMAGE, controlnet: bool = False) -> type:
    """The MS-Diffusion pipeline class of a task (`settings.TASKS`), with or without a ControlNet."""
    from . import pipelines

    if task not in TASKS:
        raise SettingsError(f"task: got {task!r}; expected one of {', '.join(TASKS)}.")
    names = {
        (TEXT_TO_IMAGE, False): "MSDiffusionXLPipeline",
        (TEXT_TO_IMAGE, True): "MSDiffusionXLControlNetPipeline",
        (IMAGE_TO_IMAGE, False): "MSDiffusionXLImg2ImgPipeline",
        (IMAGE_TO_IMAGE, True): "MSDiffusionXLControlNetImg2ImgPipeline",
        (INPAINTING, False): "MSDiffusionXLInpaintPipeline",
        (INPAINTING, True): "MSDiffusionXLControlNetInpaintPipeline",
    }
    return getattr(pipelines, names[(task, controlnet)])


def pipeline_for_task(pipe, task: str):
    """`pipe` itself if it runs `task`, else a pipeline of that task on its models (`from_pipe`: nothing is
    loaded or copied, the adapter comes along), so one loaded SDXL serves every task."""
    wanted = pipeline_class(task, getattr(pipe, "controlnet", None) is not None)
    if isinstance(pipe, wanted):
        return pipe
    return wanted.from_pipe(pipe)


def load_pipeline(
    models: ModelSettings, device: str | None = None, dtype=None, adapter=None, task: str = TEXT_TO_IMAGE
):
    """The pipeline `models` describe (base, ControlNet, adapter, image encoder, VAE, LoRAs,
    scheduler) on `device` (or CPU-offloaded to it), with progress bars off.

    `device`, `dtype`: default from `models.device`/`models.dtype` (`device_and_dtype`).
    `adapter`: the adapter checkpoint already read (by `check_models`), else it is read here.
    `task`: text-to-image (default), image-to-image or inpainting: which pipeline class is loaded.
    """
    import torch

    if device is None or dtype is None:
        chosen_device, chosen_dtype = device_and_dtype(models.device, models.dtype)
        device, dtype = device or chosen_device, dtype or chosen_dtype
    named = named_set(models)
    if named is not None and named.whole_set:  # tiny-random
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline(seed=0, controlnet=models.controlnet is not None)
        pipe = pipe if dtype == torch.float32 else pipe.to(dtype)
        pipe = pipeline_for_task(pipe, task)
    else:
        with _one_loading_bar():
            pipe = _load_files(models, dtype, adapter, task)
    if models.scheduler:
        pipe.scheduler = scheduler_named(models.scheduler, pipe.scheduler)
    if models.loras:  # after the adapter, as the tests check: diffusers' LoRA layers wrap the UNet's projections
        names = []
        for i, lora in enumerate(models.loras):
            path, weight_name = Path(lora.path), lora.weight_name
            source = str(path.parent) if path.is_file() else lora.path
            weight_name = path.name if path.is_file() else weight_name
            pipe.load_lora_weights(source, weight_name=weight_name, adapter_name=f"lora{i}")
            names.append(f"lora{i}")
        pipe.set_adapters(names, adapter_weights=[lora.scale for lora in models.loras])
    pipe.set_progress_bar_config(disable=True)
    if models.cpu_offload:  # each model moves to `device` only while it runs (the image encoder included)
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    pipe.to(device)
    if models.image_encoder_offload:
        pipe.enable_image_encoder_offload()
    return pipe


def _load_files(models: ModelSettings, dtype, adapter, task: str):
    """The pipeline of `models` read from their files (hub ids, folders, single files), with the adapter."""
    import diffusers

    locations = resolved_locations(models)
    kwargs: dict = {"dtype": dtype}
    loaded_class = pipeline_class(task, models.controlnet is not None)
    if models.controlnet is not None:
        kwargs["controlnet"] = diffusers.ControlNetModel.from_pretrained(models.controlnet.model, dtype=dtype)
    if models.vae:
        vae_class = diffusers.AutoencoderKL
        single_file = Path(models.vae).suffix in (".safetensors", ".ckpt")
        kwargs["vae"] = (vae_class.from_single_file if single_file else vae_class.from_pretrained)(
            models.vae, dtype=dtype
        )
    if Path(locations["base"]).suffix in (".safetensors", ".ckpt"):
        pipe = loaded_class.from_single_file(locations["base"], **kwargs)
    else:
        pipe = loaded_class.from_pretrained(locations["base"], variant=models.variant, **kwargs)
    pipe.load_ms_adapter(
        adapter or locations["adapter"],
        image_encoder=locations["image_encoder"],
        weight_name=models.adapter_weight_name,
    )
    return pipe


@contextlib.contextmanager
def _one_loading_bar():
    """diffusers draws one bar for the pipeline's components; transformers adds a "Loading weights" bar for
    each text encoder and the image encoder. Those are hidden while loading (download bars are not)."""
    try:
        from transformers.utils.logging import set_tqdm_hook
    except ImportError:  # a transformers without the hook: its bars stay
        yield
        return

    def hook(factory, args, kwargs):
        return factory(*args, **({**kwargs, "disable": True} if kwargs.get("desc") == "Loading weights" else kwargs))

    previous = set_tqdm_hook(hook)
    try:
        yield
    finally:
        set_tqdm_hook(previous)
