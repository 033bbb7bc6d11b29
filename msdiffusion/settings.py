"""One settings vocabulary: the names of job files, flags, the bench, training validation and the page.

`GenerationSettings` is how to generate (size, steps, guidance, scale, auto layout ...) and
`ModelSettings` which models to generate with; `GenerationSettings.pipeline_arguments` is the one
place their names become the pipelines' keyword arguments (`guidance` -> `guidance_scale`,
`scale` -> `ms_scale`, `size` -> `width`, `height`, ...). Checking a value is done here too, so a
job file, a flag and a bench run refuse the same mistake with the same words.

`PictureSettings` is the picture a job starts from (image-to-image, inpainting): kept apart from
`GenerationSettings`, which the bench and training validation share and which only draw from noise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UserInputError
from .release import REFERENCE_COMBINE, RELEASE_NEGATIVE_PROMPT

DEFAULT_IMAGE_ENCODER = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
DTYPES = ("fp32", "fp16", "bf16")
PHRASE_MATCHING = ("tokens", "release")
MIN_SIZE = 64  # the UNet halves the 1/8 latent twice; below this its deepest grid is 2x2 or less


class SettingsError(UserInputError):
    """A setting that is not valid; the message names it and what is allowed."""


@dataclass(kw_only=True)
class GenerationSettings:
    """How an image is generated, in the job file's words."""

    negative_prompt: str | None = RELEASE_NEGATIVE_PROMPT  # the release's; None (or "") for none
    size: list[int] = field(default_factory=lambda: [1024, 1024])  # width, height
    steps: int = 30
    guidance: float = 7.5
    scale: float = 0.6
    mask_threshold: float | None = None
    start_step: int = 5
    phrase_matching: str = "tokens"  # or "release": the released code's phrase positions (auto layout)
    drop_grounding: bool = False
    reference_combine: str = "concat"  # several photos of one subject: resampled together, or "mean"

    def pipeline_arguments(self) -> dict:
        """The pipelines' keyword arguments for these settings (subjects, prompt and noise are the caller's)."""
        width, height = self.size
        return {
            "negative_prompt": self.negative_prompt or None,
            "ms_scale": self.scale,
            "drop_grounding_tokens": self.drop_grounding,
            "reference_combine": self.reference_combine,
            "mask_threshold": self.mask_threshold,
            "start_step": self.start_step,
            "phrase_matching": self.phrase_matching,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "height": height,
            "width": width,
        }

    def generation_settings(self) -> GenerationSettings:
        """Only the generation settings of a larger record (a job, a bench run)."""
        names = {f.name for f in dataclasses.fields(GenerationSettings)}
        return GenerationSettings(**{name: getattr(self, name) for name in names})


# What a generation starts from: noise, a picture to redraw, or a picture with a part to repaint.
TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINTING = "text-to-image", "image-to-image", "inpainting"
TASKS = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINTING)
# The pipelines' own `strength` defaults (diffusers'), by task and ControlNet; `strength: null` means
# these. Written out so a job is checked without importing the pipelines (a test keeps them equal).
PIPELINE_STRENGTH = {
    (IMAGE_TO_IMAGE, False): 0.3,
    (IMAGE_TO_IMAGE, True): 0.8,
    (INPAINTING, False): 0.9999,
    (INPAINTING, True): 0.9999,
}


# `inpaint: subjects`: repaint the subjects' regions (grown by `repaint_margin`), keep the rest.
SUBJECTS_REGION = "subjects"


@dataclass(kw_only=True)
class PictureSettings:
    """The picture to start from (paths): `init_image` alone redraws it (image-to-image), with `inpaint`
    (a mask: white = repaint, or `subjects` for the subjects' regions) only that part is repainted
    (inpainting); None is the pipeline's default for the rest. `picture_arguments` maps them to the
    pipelines' `image`, `mask_image`, `strength`, `repaint_margin`, `repaint_feather` and `keep_outside`."""

    init_image: str | None = None
    strength: float | None = None
    inpaint: str | None = None
    repaint_margin: float | None = None
    repaint_feather: float | None = None
    keep_outside: bool | None = None

    @property
    def task(self) -> str:
        """text-to-image, image-to-image or inpainting: which pipeline runs these settings."""
        if self.init_image is None:
            return TEXT_TO_IMAGE
        return INPAINTING if self.inpaint is not None else IMAGE_TO_IMAGE

    def picture_arguments(self) -> dict:
        """The pipelines' `image`, `mask_image` and `strength` (pictures opened), or {} for text-to-image."""
        if self.init_image is None:
            return {}
        import PIL.Image

        from .subjects import load_image, upright

        arguments: dict = {"image": load_image(self.init_image, "init_image")}
        if self.inpaint is not None and self.inpaint != SUBJECTS_REGION:
            with PIL.Image.open(self.inpaint) as mask:
                arguments["mask_image"] = upright(mask).convert("L")
        for name in ("strength", *REPAINT_FIELDS):
            if getattr(self, name) is not None:
                arguments[name] = getattr(self, name)
        return arguments


# Inpainting's own fields: they need `inpaint`.
REPAINT_FIELDS = ("repaint_margin", "repaint_feather", "keep_outside")


# Which arguments `pipe.prepare_subjects` takes of `pipeline_arguments()` (with the subjects themselves).
SUBJECT_ENCODING_ARGUMENTS = ("drop_grounding_tokens", "reference_combine")


@dataclass
class LoraSpec:
    path: str  # a .safetensors file, a folder, or a hub id
    scale: float = 1.0
    weight_name: str | None = None  # the file inside a folder or hub repo


@dataclass
class ControlNetSpec:
    model: str
    image: str
    scale: float = 1.0
    image_tokens: bool = False  # true: attend over the subject tokens too, as the released script


@dataclass(kw_only=True)
class ModelSettings:
    """Which models generate, and where they run. Model values are hub ids, paths, or named sets
    (`msdiffusion.loading.NAMED_MODELS`)."""

    base: str
    adapter: str
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    adapter_weight_name: str | None = None
    variant: str | None = None
    vae: str | None = None
    loras: list[LoraSpec] = field(default_factory=list)
    scheduler: str | None = None
    controlnet: ControlNetSpec | None = None
    cpu_offload: bool = False
    image_encoder_offload: bool = False
    device: str | None = None
    dtype: str | None = None

    def model_settings(self) -> ModelSettings:
        names = {f.name for f in dataclasses.fields(ModelSettings)}
        return ModelSettings(**{name: getattr(self, name) for name in names})


# field -> (accepted types, what is allowed): the schema of the settings and the words of its errors.
GENERATION_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "negative_prompt": (
        (str, type(None)),
        f'text (default: the release\'s {RELEASE_NEGATIVE_PROMPT!r}), or null / "" for none',
    ),
    "size": (
        (list, int, str),
        "[width, height] or WIDTHxHEIGHT in pixels, multiples of 8 and at least 64 (one number for a square)",
    ),
    "steps": ((int,), "a positive integer"),
    "guidance": ((int, float), "a number >= 0 (1 or less disables classifier-free guidance)"),
    "scale": ((int, float), "a number >= 0, 0.6 by default (0.4 suits background-like subjects)"),
    "mask_threshold": ((int, float, type(None)), "a number in [0, 1) to enable auto layout, or null"),
    "start_step": ((int,), "a positive integer"),
    "phrase_matching": ((str,), "tokens (default) or release (the released code's positions of repeated phrases)"),
    "drop_grounding": ((bool,), "true or false"),
    "reference_combine": (
        (str,),
        "concat (default: a subject's photos resampled together) or mean (each alone, averaged)",
    ),
}
PICTURE_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "init_image": (
        (str, type(None)),
        "the path of a picture to start from (image-to-image; with inpaint, inpainting); the output takes its "
        "size unless size is given",
    ),
    "strength": (
        (int, float, type(None)),
        "a number in (0, 1]: how far the picture is redrawn (0.3 by default, 0.9999 for inpainting; a subject "
        "needs about 0.5 or more)",
    ),
    "inpaint": (
        (str, type(None)),
        "subjects (repaint the subjects' regions, keep the rest) or the path of a mask of the picture: white is "
        "repainted, black kept (inpainting)",
    ),
    "repaint_margin": (
        (int, float, type(None)),
        "a number in [0, 0.5]: with inpaint: subjects, how far around the subjects' regions is repainted, as a "
        "fraction of the shorter side (default 0.02)",
    ),
    "repaint_feather": (
        (int, float, type(None)),
        "a number in [0, 0.5]: the width of the repainted part's soft edge where the picture is pasted back, as a "
        "fraction of the shorter side (default 0.02)",
    ),
    "keep_outside": (
        (bool, type(None)),
        "true or false: paste the picture back outside the repainted part, so it is kept exactly (default: true "
        "with inpaint: subjects, false with a mask, whose kept part is then the picture's VAE round trip)",
    ),
}
MODEL_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "base": (
        (str,),
        "a hub id, a diffusers SDXL folder, a single .safetensors/.ckpt file, or a named model set (`msdiffusion.loading.NAMED_MODELS`)",
    ),
    "adapter": ((str,), "a hub id, an ms_adapter.bin file, a project adapter folder, or a named set"),
    "image_encoder": ((str,), "a hub id or folder of a CLIP vision model, or a named set"),
    "adapter_weight_name": ((str, type(None)), "a file name inside the adapter repo/folder"),
    "variant": ((str, type(None)), "a weight variant of the base's files, e.g. fp16 (half the download)"),
    "vae": (
        (str, type(None)),
        "another VAE: a hub id, a diffusers folder or a .safetensors file, e.g. madebyollin/sdxl-vae-fp16-fix",
    ),
    "loras": ((list,), "a list of {path, scale, weight_name}: LoRA .safetensors files, folders or hub ids"),
    "scheduler": ((str, type(None)), "a diffusers scheduler class name, e.g. DPMSolverMultistepScheduler"),
    "controlnet": ((dict, type(None)), "{model: hub id or folder, image: path, scale: number, image_tokens: bool}"),
    "cpu_offload": ((bool,), "true or false: keep each model on the CPU until it runs (less GPU memory, slower)"),
    "image_encoder_offload": (
        (bool,),
        "true or false: keep the image encoder on the CPU except while it encodes subjects (its 3.7 GB in fp16 "
        "leave the GPU while denoising; each encoding moves it there and back)",
    ),
    "device": ((str, type(None)), "cuda, cuda:N, mps or cpu"),
    "dtype": ((str, type(None)), f"one of {', '.join(DTYPES)}"),
}


def check_types(values: dict, fields: dict, source: str) -> None:
    """Each value of a known field has one of its accepted types (YAML `yes` is not a number)."""
    for name, value in values.items():
        if name not in fields:
            continue
        types, allowed = fields[name]
        if isinstance(value, bool) and bool not in types:
            types = ()
        if not isinstance(value, types):
            raise SettingsError(f"{source}: {name}: got {value!r}; expected {allowed}.")


def check_generation_values(values: dict, source: str) -> dict:
    """Range checks of the generation fields present in `values` (types already checked); returns
    `values` with `size` as [width, height] and an empty negative prompt as None."""
    values = dict(values)
    if values.get("negative_prompt") == "":
        values["negative_prompt"] = None  # no negative prompt: SDXL then uses zero embeddings
    if "size" in values:
        values["size"] = parse_size(values["size"], f"{source}: size")
    for name in ("steps", "start_step"):
        if name in values and values[name] < 1:
            raise SettingsError(f"{source}: {name}: got {values[name]}; expected a positive integer.")
    threshold = values.get("mask_threshold")
    if threshold is not None and not 0 <= threshold < 1:
        raise SettingsError(
            f"{source}: mask_threshold: got {threshold}; expected {GENERATION_FIELDS['mask_threshold'][1]}."
        )
    for name in ("guidance", "scale"):
        if name in values and not math.isfinite(values[name]):
            raise SettingsError(f"{source}: {name}: must be a finite number.")
        if name in values and values[name] < 0:
            raise SettingsError(f"{source}: {name}: got {values[name]}; expected {GENERATION_FIELDS[name][1]}.")
    for name, allowed in (("phrase_matching", PHRASE_MATCHING), ("reference_combine", REFERENCE_COMBINE)):
        if name in values and values[name] not in allowed:
            raise SettingsError(f"{source}: {name}: got {values[name]!r}; expected {GENERATION_FIELDS[name][1]}.")
    return values


def check_picture_values(values: dict, source: str, steps: int | None = None, controlnet: bool = False) -> None:
    """`strength` and `inpaint` need `init_image`; `strength` is in (0, 1] and, of `steps`, leaves a step
    (diffusers runs int(steps * strength) of them). Paths are the caller's to check."""
    init_image, strength = values.get("init_image"), values.get("strength")
    for name in ("strength", "inpaint"):
        if values.get(name) is not None and init_image is None:
            raise SettingsError(
                f"{source}: {name}: needs init_image (the picture to start from); add init_image or remove {name}."
            )
    for name in REPAINT_FIELDS:
        if values.get(name) is not None and values.get("inpaint") is None:
            raise SettingsError(
                f"{source}: {name}: is for inpainting; add inpaint (subjects, or a mask) or remove {name}."
            )
    for name in ("repaint_margin", "repaint_feather"):
        value = values.get(name)
        if value is not None and not (math.isfinite(value) and 0 <= value <= 0.5):
            raise SettingsError(f"{source}: {name}: got {value}; expected {PICTURE_FIELDS[name][1]}.")
    if strength is None and init_image is None:
        return
    check_strength(strength, source)
    task = INPAINTING if values.get("inpaint") is not None else IMAGE_TO_IMAGE
    effective = PIPELINE_STRENGTH[(task, controlnet)] if strength is None else strength
    if steps is not None and int(steps * effective) < 1:
        given = f"strength {strength}" if strength is not None else f"the default strength {effective}"
        raise SettingsError(
            f"{source}: strength: {given} of steps {steps} leaves no denoising step (int(steps * strength) are run); "
            f"raise steps to at least {math.ceil(1 / effective)} or raise strength."
        )


def check_strength(strength: float | None, source: str) -> None:
    """`strength` is None (the pipeline's default) or in (0, 1]."""
    if strength is not None and not (math.isfinite(strength) and 0 < strength <= 1):
        raise SettingsError(f"{source}: strength: got {strength}; expected {PICTURE_FIELDS['strength'][1]}.")


def picture_size(path: str, what: str = "init_image") -> list[int]:
    """[width, height] a picture gives the output when no size is given: its own, rounded down to multiples
    of 8 as diffusers' preprocessing does, turned upright (`subjects.upright`). Reads only the file's header."""
    import PIL.Image

    from .subjects import upright_size

    try:
        with PIL.Image.open(path) as image:
            width, height = upright_size(image)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise SettingsError(f"{what}: cannot read {path!r} as an image ({error}).") from None
    size = [width - width % 8, height - height % 8]
    if min(size) < MIN_SIZE:
        raise SettingsError(
            f"{what}: the picture is {width}x{height} pixels, below {MIN_SIZE} on a side; give size to enlarge it "
            "(e.g. size: 512x512)."
        )
    return size


def check_model_values(values: dict, source: str) -> dict:
    if values.get("dtype") is not None and values["dtype"] not in DTYPES:
        raise SettingsError(f"{source}: dtype: got {values['dtype']!r}; expected {MODEL_FIELDS['dtype'][1]}.")
    return values


def parse_size(value: Any, what: str = "size") -> list[int]:
    """[width, height] from `[w, h]`, a number (square), or text `WxH` / `N` (flags and job files alike)."""
    allowed = GENERATION_FIELDS["size"][1]
    size = value
    if isinstance(value, str):
        try:
            size = [int(v) for v in value.lower().replace(" ", "").split("x")]
        except ValueError:
            raise SettingsError(f"{what}: got {value!r}; expected {allowed}, e.g. 1344x768.") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        size = [value]
    if not isinstance(size, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise SettingsError(f"{what}: got {value!r}; expected {allowed}.")
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or not all(v % 8 == 0 and v >= MIN_SIZE for v in size):
        raise SettingsError(f"{what}: got {value!r}; expected {allowed}.")
    return size
