"""`msdiff ui`: a Gradio page where people upload their subjects, draw their boxes and generate.

The page speaks the job format of `msdiffusion.app.jobs`: what it generates is a `Job` validated by
`job_from_dict` and run by `run_job`, so its PNGs carry their job as `msdiff generate` writes them
(with photos by file name: a PNG or exported job never names the server's folders), and its YAML
export and import are job files. The models are the server's (given when it starts).

A picture to start from (`init_image`) makes the page repaint its subjects' regions (`inpaint: subjects`)
or redraw all of it; a subject's region may be painted on the canvas with a brush, which the page writes
as the subject's `mask` image.

The page is made to be shared (README: "Sharing the page"). Each visitor's photos, picture, painted
regions and results live in a folder of their own, removed when they leave (or, for API callers, after
`--keep-minutes`); photos and pictures come only from what that visitor uploaded (and the package's
example photos), checked and shrunk on receipt; a painted region is decoded within fixed bounds; every
request is held to the server's `PageLimits` (size, steps, images, photos, upload size and pixels, queue
length, time per job); a generation stops between two steps when its requester leaves or presses Stop;
`--auth` asks for a login.

Gradio is an optional extra (`pip install -e ".[ui]"`); this module imports it only when building
the page, so that `msdiff --help` works without it.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import math
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msdiffusion.errors import UserInputError

MAX_SUBJECTS = 4
# SDXL's usual sizes (its training buckets), width x height.
SDXL_SIZES = (
    "1024x1024",
    "1152x896",
    "896x1152",
    "1216x832",
    "832x1216",
    "1344x768",
    "768x1344",
    "1536x640",
    "640x1536",
)
SCHEDULERS = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DDIMScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
)
MODEL_DEFAULT_SCHEDULER = "(model default)"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
# The page's fields, in the order of the generate function's inputs (and of `page_to_job`'s values).
SETTING_FIELDS = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "seed",
    "steps",
    "guidance",
    "scale",
    "images",
    "auto_layout",
    "mask_threshold",
    "start_step",
    "drop_grounding",
    "scheduler",
    "picture",
    "picture_mode",
    "strength",
    "repaint_margin",
)
# `region`: the subject's painted region as the canvas sends it (a PNG data URL), "" for none.
SUBJECT_FIELDS = ("images", "phrase", "box", "scale", "region")
# Photos are shrunk on receipt to this longest side: the encoder squashes each to 512x512 (and CLIP
# to 224), so more pixels only cost memory.
PHOTO_SIDE = 1024
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Bounds every request is held to (not options: beyond them the models make nothing useful).
MAX_GUIDANCE = 30.0
MAX_SCALE = 2.0
MAX_TEXT = 1000  # characters of a prompt, negative prompt or phrase (the text encoders read 77 tokens)
MAX_SEED = 2**63 - 1024  # torch seeds are 64-bit; each image adds one
# What the page does with a picture: inpainting of the subjects' regions (`inpaint: subjects`), or image-to-image.
REPAINT, REDRAW = "Repaint the subjects' regions", "Redraw the whole picture"
PICTURE_MODES = (REPAINT, REDRAW)
# The Strength slider's value for each mode (choosing a mode sets it). Repainting draws the regions anew: 1,
# from noise, every step (the pipeline's own 0.9999 runs int(steps * 0.9999), one step fewer, from a faint trace
# of the picture). Redrawing keeps the picture's composition and leaves a subject room to appear: 0.7 (below
# about 0.5 a subject only tints what is there; the pipeline's own 0.3 is below that).
MODE_STRENGTH = {REPAINT: 1.0, REDRAW: 0.7}
DEFAULT_MARGIN = 0.02  # the pipelines' repaint_margin
MAX_MARGIN = 0.2  # the Margin slider's end (jobs take up to 0.5; more repaints most of a picture)
# A painted region arrives as a PNG data URL of the canvas's mask (opaque = the region), painted at the output's
# size shrunk to fit REGION_SIDE: it is refused beyond that size or MAX_REGION_BYTES, before being decoded.
REGION_PREFIX = "data:image/png;base64,"
REGION_SIDE = 1024
MAX_REGION_BYTES = 2 * 1024 * 1024


@dataclass
class PageLimits:
    """What one request may ask of the server; each is a `msdiff ui` option (`--max-size`, ...)."""

    max_size: int = 1536  # pixels, the larger of width and height
    max_steps: int = 100
    max_images: int = 4  # images per request
    max_photos: int = 4  # photos per subject
    max_upload_mb: float = 20.0  # any one uploaded file
    max_megapixels: float = 40.0  # a photo's width x height, read from its header before decoding
    queue_size: int = 20  # requests waiting for the model; more are refused until one starts
    job_seconds: float = 600.0  # a generation running longer is stopped
    keep_minutes: float = 60.0  # a visitor's files are removed when they leave, or this long after last use

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class PageModels:
    """What the server serves: the models (job model ids or paths) and the page's starting values."""

    base: str
    adapter: str
    image_encoder: str
    adapter_weight_name: str | None = None
    device: str | None = None
    dtype: str | None = None
    defaults: dict = field(default_factory=dict)  # job fields that start the page (size, steps, ...)
    # The first visit's example: {prompt, subjects: [{images, phrase, box}]} (None: the served models' own)
    example: dict | None = None

    def model_settings(self):
        from msdiffusion.settings import ModelSettings

        return ModelSettings(
            base=self.base,
            adapter=self.adapter,
            image_encoder=self.image_encoder,
            adapter_weight_name=self.adapter_weight_name,
            device=self.device,
            dtype=self.dtype,
        )

    def job_fields(self) -> dict:
        return {
            "base": self.base,
            "adapter": self.adapter,
            "image_encoder": self.image_encoder,
            "adapter_weight_name": self.adapter_weight_name,
            "device": self.device,
            "dtype": self.dtype,
        }


def default_models() -> PageModels:
    """What `msdiff demo` serves by default: the world's trained models and their settings when they
    are installed, else (as the demo) the tiny random models."""
    from msdiffusion.loading import NAMED_MODELS, TINY, WORLD, world_weights_present

    if world_weights_present():
        return PageModels(WORLD, WORLD, WORLD, defaults=dict(NAMED_MODELS[WORLD].defaults))
    print("msdiff ui: the world's trained weights are not installed (docs/world.md): serving the tiny random models.")
    return PageModels(TINY, TINY, TINY, defaults=dict(NAMED_MODELS[TINY].defaults))


# ---- the first visit: a working example of the served models ------------------------------------
DOG_AND_CAT = {
    "prompt": "a dog and a cat on the beach",
    "subjects": [
        {"images": [str(ASSETS / "dog.jpg")], "phrase": "dog", "box": [0.05, 0.3, 0.45, 0.9]},
        {"images": [str(ASSETS / "cat.jpg")], "phrase": "cat", "box": [0.55, 0.3, 0.95, 0.9]},
    ],
}
# The package's example photos: public, so any visitor's page (or imported job) may use them by name.
EXAMPLE_PHOTOS = {p.name: p for p in sorted(ASSETS.rglob("*")) if p.suffix.lower() in (".jpg", ".png")}


def first_visit(models: PageModels) -> dict:
    """The page's opening example, {prompt, subjects: [{images, phrase, box}]}: the job file's the
    server was started with, else one the served models can draw (the world's ring and heart, with
    its example photos, for the world's models; a dog and a cat for others)."""
    from msdiffusion.loading import WORLD

    if models.example is not None:
        return models.example
    if models.base == WORLD:
        from msdiffusion.app.commands import WORLD_DEMO_PROMPT, WORLD_DEMO_SUBJECTS

        return {
            "prompt": WORLD_DEMO_PROMPT,
            "subjects": [
                {"images": [str(ASSETS / image)], "phrase": phrase, "box": list(box)}
                for image, phrase, box in WORLD_DEMO_SUBJECTS
            ],
        }
    return DOG_AND_CAT


def size_presets(models: PageModels, limits: PageLimits) -> list[str]:
    """Size presets that fit the served models, their own size first: the world's model knows only
    64x64; the tiny random models run small; SDXL its training buckets."""
    from msdiffusion.loading import TINY, WORLD

    size = models.defaults.get("size", [1024, 1024])
    own = f"{size}x{size}" if isinstance(size, int) else f"{size[0]}x{size[1]}"
    others = {WORLD: (), TINY: ("384x512", "64x64", "128x128")}.get(models.base, SDXL_SIZES)
    presets = [own, *(s for s in others if s != own)]
    return [s for s in presets if max(int(v) for v in s.split("x")) <= limits.max_size] or [own]


def model_note(models: PageModels) -> str:
    """What the served models can draw, for the page's header."""
    from msdiffusion.loading import TINY, WORLD

    if models.base == WORLD:
        from msdiffusion.world.scenes import CLASSES

        return (
            "The world's small models, trained on a CPU on 64x64 scenes (docs/world.md). They know ten shapes: "
            f"{', '.join(CLASSES)}. Each subject is one of them in its own colours and pattern; its phrase is the "
            "shape's name, its photo a picture of that subject (the example's are filled in below)."
        )
    if models.base == TINY:
        return "Tiny random models: they check the wiring, and their images are noise."
    return "Upload each subject's photos, name it in the prompt, draw its box."


# ---- page values <-> job ------------------------------------------------------------------------
class PageError(UserInputError):
    """Bad input on the page. `slot`: the subject it belongs to; `field`: the page field it sits
    next to ("size"), where it is not a subject's; `also`: the job's other problems, if several."""

    def __init__(self, message: str, slot: int | None = None, field: str | None = None):
        super().__init__(message)
        self.slot = slot
        self.field = field
        self.also: list[PageError] = []


def _box_value(text: str | None) -> list:
    """The box field's text as the job's list; an empty field is no box (all zeros: auto layout)."""
    words = re.split(r"[\s,;]+", (text or "").strip().strip("[]()"))
    words = [w for w in words if w]
    return words or [0, 0, 0, 0]  # `check_box` converts and validates the numbers and says what is wrong


def _number_value(text: Any):
    """A typed number as a float; other text is passed on for `job_from_dict` to refuse by name."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _number(value: Any):
    """Gradio numbers arrive as floats; the job wants ints where they are whole."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def page_to_job(settings: dict, subjects: list[dict], models: PageModels, output: str):
    """The `Job` the page describes, validated by `job_from_dict` (errors become `PageError`s).

    `subjects` holds one dict per subject slot ({images, phrase, box, scale} and `mask`, the path of its
    painted region written by `regions_to_masks`); empty slots are skipped. `settings["picture"]`, when
    given, is the picture as received (`VisitorFiles.receive_picture`): the output takes its size, whatever
    the width and height, and `picture_mode` says whether its subjects' regions are repainted or all of it
    is redrawn.
    """
    from msdiffusion.app.jobs import JobError, job_from_dict
    from msdiffusion.settings import SUBJECTS_REGION, SettingsError, picture_size

    slots, listed = [], []
    for slot, subject in enumerate(subjects):
        images = [str(p) for p in (subject.get("images") or [])]
        phrase = (subject.get("phrase") or "").strip()
        box = (subject.get("box") or "").strip()
        mask = subject.get("mask")
        if not images and not phrase and not box and not mask:
            continue
        if not images:
            raise PageError("photos: upload at least one photo of this subject.", slot)
        entry: dict = {"image": images, "phrase": phrase, "box": _box_value(box)}
        if str(subject.get("scale") or "").strip():
            entry["scale"] = _number_value(subject["scale"])
        if mask:
            entry["mask"] = str(mask)
        slots.append(slot)
        listed.append(entry)
    if not listed:
        raise PageError("add at least one subject: its photos, its phrase, and (or auto layout) its box.", 0)
    picture: dict = {}
    if settings.get("picture"):
        mode = settings.get("picture_mode") or REPAINT
        if mode not in PICTURE_MODES:
            raise PageError(f"mode: got {_short(str(mode))}; expected {' or '.join(PICTURE_MODES)}.", field="picture")
        try:
            size = picture_size(str(settings["picture"]), "picture")
        except SettingsError as error:
            raise PageError(str(error), field="picture") from None
        picture = {"init_image": str(settings["picture"]), "size": size, "strength": settings.get("strength")}
        if mode == REPAINT:
            if not any(entry["box"] != [0, 0, 0, 0] or "mask" in entry for entry in listed):
                raise PageError(
                    f"{REPAINT} needs a subject's box or painted region: draw one, or choose {REDRAW}.",
                    field="picture",
                )
            picture.update(inpaint=SUBJECTS_REGION, repaint_margin=settings.get("repaint_margin"))
    data = {
        **{k: v for k, v in models.job_fields().items() if v is not None},
        "prompt": (settings.get("prompt") or "").strip(),
        "negative_prompt": settings.get("negative_prompt") or "",
        "subjects": listed,
        "size": [_number(settings.get("width")), _number(settings.get("height"))],
        "seed": None if settings.get("seed") in (None, "") else _number(settings["seed"]),
        "images": _number(settings.get("images", 1)),
        "steps": _number(settings.get("steps")),
        "guidance": settings.get("guidance"),
        "scale": settings.get("scale"),
        "mask_threshold": settings.get("mask_threshold") if settings.get("auto_layout") else None,
        "start_step": _number(settings.get("start_step", 5)),
        "drop_grounding": bool(settings.get("drop_grounding")),
        "output": output,
        **picture,  # its size over the width and height
    }
    scheduler = settings.get("scheduler")
    if scheduler and scheduler != MODEL_DEFAULT_SCHEDULER:
        data["scheduler"] = scheduler
    try:
        job = job_from_dict(data, "page")
        if job.scheduler is not None:
            from msdiffusion.loading import check_scheduler_name

            check_scheduler_name(job.scheduler)
        return job, slots
    except JobError as error:
        problems = getattr(error, "problems", None) or [str(error).removeprefix("page: ")]
        first, *rest = [_located(problem, slots) for problem in problems]
        first.also = rest
        raise first from None


def _located(message: str, slots: list[int]) -> PageError:
    """A job error, worded for the page and tied to the subject (or field) it names."""
    message = message.removeprefix("page: ")
    found = re.match(r"subjects\[(\d+)\]\.?(\w*):?\s*", message)
    if found:
        slot = slots[int(found.group(1))]
        what = found.group(2) or "subject"
        return PageError(f"{what}: {message[found.end() :]}", slot)
    if message.startswith("size:"):
        return PageError(message, field="size")
    from msdiffusion.settings import PICTURE_FIELDS

    picture = any(message.startswith(f"{name}:") for name in PICTURE_FIELDS)
    return PageError(message, field="picture" if picture else None)


def check_limits(job, slots: list[int], limits: PageLimits) -> None:
    """Refuse what is more than this server gives one request (`PageLimits`), naming the option that sets it."""
    width, height = job.size
    if max(width, height) > limits.max_size:
        raise PageError(
            f"size: {width}x{height} is larger than this server makes ({limits.max_size} pixels a side at most; "
            "msdiff ui --max-size).",
            field="size",
        )
    for name, value, most, option in (
        ("steps", job.steps, limits.max_steps, "--max-steps"),
        ("start_step", job.start_step, limits.max_steps, "--max-steps"),
        ("images", job.images, limits.max_images, "--max-images"),
    ):
        if value > most:
            raise PageError(f"{name}: {value} is more than this server allows ({most} at most; msdiff ui {option}).")
    for name, value, most in (("guidance", job.guidance, MAX_GUIDANCE), ("scale", job.scale, MAX_SCALE)):
        if value > most:
            raise PageError(f"{name}: {value:g} is more than the page allows ({most:g} at most).")
    if job.seed is not None and not 0 <= job.seed <= MAX_SEED:
        raise PageError(f"seed: expected a whole number from 0 to {MAX_SEED}.")
    for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt or "")):
        if len(text) > MAX_TEXT:
            raise PageError(f"{name}: {len(text)} characters; the page takes up to {MAX_TEXT}.")
    if len(job.subjects) > MAX_SUBJECTS:
        raise PageError(f"subjects: {len(job.subjects)}; the page takes up to {MAX_SUBJECTS}.")
    for j, subject in enumerate(job.subjects):
        if len(subject.images) > limits.max_photos:
            raise PageError(
                f"photos: {len(subject.images)}; this server takes up to {limits.max_photos} photos of a subject "
                "(msdiff ui --max-photos).",
                slots[j],
            )
        if subject.scale is not None and subject.scale > MAX_SCALE:
            raise PageError(f"scale: {subject.scale:g} is more than the page allows ({MAX_SCALE:g}).", slots[j])
        if len(subject.phrase) > MAX_TEXT:
            raise PageError(f"phrase: {len(subject.phrase)} characters; the page takes up to {MAX_TEXT}.", slots[j])


def check_before_work(job, slots: list[int], tokenizer) -> None:
    """What fails only later in the pipeline, checked before any work: unreadable photos, phrases not in the prompt."""
    from msdiffusion.layout import phrase_token_positions
    from msdiffusion.subjects import load_image

    for j, subject in enumerate(job.subjects):
        for path in subject.images:
            try:
                load_image(path, "image")
            except ValueError:
                raise PageError(f"{_unreadable(Path(path).name)}", slots[j]) from None
    if tokenizer is None:
        return
    phrases = [s.phrase for s in job.subjects]
    for j, found in enumerate(phrase_token_positions(tokenizer, job.prompt, phrases, job.phrase_matching)):
        if not found:
            raise PageError(
                f"phrase: {_short(phrases[j])} is not in the prompt {_short(job.prompt)} (or not as often as it is "
                "given). Use the exact words of the prompt as the phrase.",
                slots[j],
            )


def _short(text: str) -> str:
    from msdiffusion.app.jobs import quote

    return quote(text, 120)


def _unreadable(name: str, what: str = "photo") -> str:
    return f"{name}: cannot read it as an image; upload a JPEG, PNG or WebP {what}."


def fitted_picture_size(width: int, height: int, most: int) -> tuple[int, int]:
    """The size a picture of `width` x `height` is worked on at: shrunk, keeping its proportions, so that its
    sides fit `most`, and rounded down to multiples of 8 (as the pipelines round a picture's sides)."""
    scale = min(1.0, most / max(width, height))
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


# ---- each visitor's files -----------------------------------------------------------------------
class VisitorFiles:
    """Each visitor's folder under one folder of the server's: the photos they sent (checked and
    shrunk on receipt) and their results. A visitor's folder is removed when they leave, and by
    `sweep` once they have asked for nothing for `keep_seconds` (API callers never "leave").

    `sources`: the folders photos may come from (Gradio's upload folder, the package's examples):
    a path a request names anywhere else is refused, whatever it points to.
    """

    def __init__(self, keep_seconds: float, sources: list[Path] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="msdiff-ui-"))
        self.keep_seconds = keep_seconds
        self.sources = [Path(p).resolve() for p in (sources if sources is not None else _photo_sources())]
        self.protected: set[str] = set()  # the page's own initial files (Gradio's copies of the examples)
        self._lock = threading.Lock()
        self._photos: dict[str, dict[str, Path]] = {}  # visitor -> file name -> the photo as sent
        self._senders: dict[Path, set[str]] = {}  # a photo as sent -> the visitors who sent it
        self._last: dict[str, float] = {}  # visitor -> when they last asked for something
        self._stop = threading.Event()

    def folder(self, visitor: str) -> Path:
        """The visitor's folder (not made until something is written into it)."""
        return self.root / hashlib.sha256(visitor.encode()).hexdigest()[:16]

    def results(self, visitor: str) -> Path:
        """Where the visitor's request writes its results; asking for it counts as a use (for `sweep`)."""
        with self._lock:
            self._last[visitor] = time.time()
        return self.folder(visitor) / "results"

    def _allowed(self, path: str | Path) -> Path | None:
        resolved = Path(path).resolve()
        if resolved.is_file() and any(resolved.is_relative_to(d) for d in self.sources):
            return resolved
        return None

    def remember(self, visitor: str, path: str | Path) -> None:
        """A photo the visitor has on their page, found later by its file name (an imported job names its photos)."""
        resolved = self._allowed(path)
        if resolved is not None:
            with self._lock:
                self._photos.setdefault(visitor, {})[resolved.name] = resolved
                self._senders.setdefault(resolved, set()).add(visitor)
                self._last[visitor] = time.time()

    def find(self, visitor: str, name: str) -> str | None:
        """The photo (or picture) called `name` that this visitor sent, else the package's example of that name."""
        with self._lock:
            found = self._photos.get(visitor, {}).get(name)
        if found is not None and found.is_file():
            return str(found)
        return str(EXAMPLE_PHOTOS[name]) if name in EXAMPLE_PHOTOS else None

    def receive(self, visitor: str, path: str | Path, limits: PageLimits, slot: int | None = None) -> str:
        """A photo the visitor sent, checked (an upload of this page, its size and pixels read from its
        header before anything is decoded) and shrunk to `PHOTO_SIDE`; returns the copy in their folder.

        A photo within `PHOTO_SIDE` is copied as it is, so that `msdiff generate --from` with the
        visitor's own file makes the same image.
        """
        return self._receive(visitor, path, limits, "photo", {"slot": slot})

    def receive_picture(self, visitor: str, path: str | Path, limits: PageLimits) -> str:
        """The picture to work on, checked as photos are and shrunk, keeping its proportions, so that its sides
        fit `--max-size` (`fitted_picture_size`); returns the copy in the visitor's folder. A picture within
        the limit is copied as it is (the pipelines round its sides down to multiples of 8)."""
        return self._receive(visitor, path, limits, "picture", {"field": "picture"})

    def _receive(self, visitor: str, path: str | Path, limits: PageLimits, what: str, where: dict) -> str:
        """`receive` (`what`: photo) and `receive_picture` (picture); `where`: the `PageError` place of its errors."""
        import PIL.Image

        from msdiffusion.settings import MIN_SIZE

        name = Path(str(path)).name
        source = self._allowed(path)
        if source is None:
            raise PageError(f"{name}: not a {what} uploaded to this page; upload it again.", **where)
        size = source.stat().st_size
        if size > limits.max_upload_bytes:
            raise PageError(
                f"{name}: {size / 2**20:.1f} MB; this server takes files up to {limits.max_upload_mb:g} MB "
                "(msdiff ui --max-upload-mb).",
                **where,
            )
        # One folder per file sent (Gradio names an upload's folder by its content): two files of one name stay apart.
        digest = hashlib.sha256(str(source).encode()).hexdigest()[:12]
        target = self.folder(visitor) / f"{what}s" / digest / name
        try:
            with warnings.catch_warnings():
                # PIL warns of a decompression bomb above 89 megapixels; this server's own limit decides.
                warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                image = PIL.Image.open(source)
            with image:
                if image.format not in PHOTO_FORMATS:
                    raise PageError(f"{name}: a {image.format} file; upload a JPEG, PNG or WebP {what}.", **where)
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise PageError(
                        f"{name}: {width}x{height} pixels; this server takes {what}s up to "
                        f"{limits.max_megapixels:g} megapixels (msdiff ui --max-megapixels): upload a smaller one.",
                        **where,
                    )
                if what == "picture":
                    fitted = fitted_picture_size(width, height, limits.max_size)
                    shrink = fitted if max(width, height) > limits.max_size else None
                    if min(fitted) < MIN_SIZE and shrink is None:
                        raise PageError(
                            f"{name}: {width}x{height} pixels, below {MIN_SIZE} on a side once rounded down to "
                            "multiples of 8: upload a larger one.",
                            **where,
                        )
                    if min(fitted) < MIN_SIZE:
                        raise PageError(
                            f"{name}: {width}x{height} pixels would be {fitted[0]}x{fitted[1]} here (at most "
                            f"{limits.max_size} pixels a side), below {MIN_SIZE} on a side: crop it to a less narrow one.",
                            **where,
                        )
                else:
                    shrink = image.size if max(width, height) > PHOTO_SIDE else None
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if shrink is None:
                        image.load()  # it decodes (the pipeline will decode it again)
                        shutil.copyfile(source, target)
                    else:
                        side = PHOTO_SIDE if what == "photo" else max(shrink)
                        image.draft("RGB", (side, side))  # a JPEG decodes at a fraction of its size
                        small = image.convert("RGB")
                        if what == "photo":
                            small.thumbnail((PHOTO_SIDE, PHOTO_SIDE), PIL.Image.Resampling.LANCZOS)
                        else:
                            small = small.resize(shrink, PIL.Image.Resampling.LANCZOS)
                        small.save(target, format="JPEG" if image.format == "JPEG" else "PNG", quality=95)
        except PageError:
            raise
        except (OSError, SyntaxError, ValueError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError):
            target.unlink(missing_ok=True)
            raise PageError(_unreadable(name, what), **where) from None
        self.remember(visitor, source)
        return str(target)

    def regions(self, visitor: str) -> Path:
        """Where the visitor's painted regions are written as mask images (`regions_to_masks`)."""
        return self.folder(visitor) / "regions"

    def find_region(self, visitor: str, name: str) -> str | None:
        """The mask image called `name` of a region this visitor painted (an imported job names it)."""
        if not REGION_NAME.fullmatch(name):
            return None
        found = self.regions(visitor) / name
        return str(found) if found.is_file() else None

    def forget(self, visitor: str) -> None:
        """The visitor left: remove their folder, and the uploads only they sent."""
        with self._lock:
            self._photos.pop(visitor, None)
            self._last.pop(visitor, None)
            mine = []
            for path, senders in list(self._senders.items()):
                senders.discard(visitor)
                if not senders:
                    del self._senders[path]
                    mine.append(path)
        shutil.rmtree(self.folder(visitor), ignore_errors=True)
        upload_folders = [d for d in self.sources if d != ASSETS.resolve()]
        for path in mine:
            # Gradio's copy of an upload; never the page's own examples, nor anything outside its upload folder
            if str(path) not in self.protected and any(path.is_relative_to(d) for d in upload_folders):
                path.unlink(missing_ok=True)
                try:
                    path.parent.rmdir()
                except OSError:
                    pass

    def sweep(self, now: float | None = None) -> list[str]:
        """Forget the visitors who asked for nothing for `keep_seconds` (their files too); returns them."""
        now = time.time() if now is None else now
        with self._lock:
            idle = [visitor for visitor, last in self._last.items() if now - last > self.keep_seconds]
        for visitor in idle:
            self.forget(visitor)
        return idle

    def start_sweeping(self) -> None:
        """Sweep in the background, a few times per `keep_seconds` (at most every 10 minutes)."""
        interval = min(max(self.keep_seconds / 4, 1.0), 600.0)

        def loop():
            while not self._stop.wait(interval):
                try:
                    self.sweep()
                except OSError:
                    pass  # a folder removed meanwhile; the next sweep sees the rest

        threading.Thread(target=loop, name="msdiff-ui-sweep", daemon=True).start()

    def close(self) -> None:
        """Stop sweeping and remove every visitor's files (the server is stopping)."""
        self._stop.set()
        shutil.rmtree(self.root, ignore_errors=True)


def _photo_sources() -> list[Path]:
    """Where a photo a request names may be: Gradio's upload folder, the package's examples."""
    from gradio.utils import get_upload_folder

    return [Path(get_upload_folder()), ASSETS]


def receive_photos(job, slots: list[int], visitor: str, files: VisitorFiles, limits: PageLimits):
    """The job with each subject's photos replaced by the visitor's checked, shrunk copies."""
    for j, subject in enumerate(job.subjects):
        subject.images = [files.receive(visitor, path, limits, slots[j]) for path in subject.images]
    return job


def visitor_job(
    settings: dict, subjects: list[dict], models: PageModels, visitor: str, files: VisitorFiles, limits: PageLimits
):
    """`page_to_job` for a visitor's page values: their picture received first (checked, fitted to
    `--max-size`), and their painted regions decoded and written into their folder as the subjects' masks
    at the output's size. Returns the job and its subjects' slots; `PageError`s say what is wrong."""
    if settings.get("picture"):
        settings = {**settings, "picture": files.receive_picture(visitor, settings["picture"], limits)}
    subjects = regions_to_masks(subjects, output_size(settings, limits), files.regions(visitor))
    return page_to_job(settings, subjects, models, str(files.results(visitor)))


# ---- painted regions --------------------------------------------------------------------------
# The mask images `write_region` names: the subject's phrase and a hash of the region (a region painted anew
# gets a new file, so an earlier PNG's record still names its own).
REGION_NAME = re.compile(r"region-[a-z0-9-]{1,40}-[0-9a-f]{12}\.png")


def decode_region(text: str | None, slot: int):
    """A subject's painted region as the canvas sends it (a PNG data URL; opaque pixels, or white ones in a
    picture without transparency, are the region) as an (H, W) bool array; None for an empty field.

    Anything else is refused with one line naming the subject (`slot`): text over `MAX_REGION_BYTES`, a PNG
    over `REGION_SIDE` a side (read from its header, before decoding), malformed data, an empty region."""
    import base64
    import binascii
    import io

    import numpy as np
    import PIL.Image

    text = (text or "").strip()
    if not text:
        return None
    fix = "press Clear region and paint it again"
    if not text.startswith(REGION_PREFIX):
        raise PageError(f"region: not a painted region (a PNG data URL); {fix}.", slot)
    if len(text) - len(REGION_PREFIX) > MAX_REGION_BYTES * 4 // 3 + 4:
        raise PageError(
            f"region: {len(text)} characters; a painted region is at most {MAX_REGION_BYTES // 2**20} MB of PNG.",
            slot,
        )
    try:
        data = base64.b64decode(text[len(REGION_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise PageError(f"region: its data is not base64; {fix}.", slot) from None
    try:
        with PIL.Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if max(image.size) > REGION_SIDE:
                raise PageError(
                    f"region: {image.width}x{image.height} pixels; a painted region is at most {REGION_SIDE} a side.",
                    slot,
                )
            alpha = image.getchannel("A") if "A" in image.getbands() else image.convert("L")
            region = np.asarray(alpha) >= 128
    except PageError:
        raise
    except PIL.Image.DecompressionBombError:  # PIL's own limit, hundreds of megapixels: read from the header too
        raise PageError(f"region: over {REGION_SIDE} pixels a side; a painted region is at most that.", slot) from None
    except (OSError, SyntaxError, ValueError, PIL.UnidentifiedImageError):
        raise PageError(f"region: not a PNG the page can read; {fix}.", slot) from None
    if not region.any():
        raise PageError("region: nothing is painted; paint the region, or press Clear region.", slot)
    return region


def region_data_url(region) -> str:
    """A region (an (H, W) bool array) as the canvas holds it: a PNG data URL, white and opaque in the region."""
    import base64
    import io

    import numpy as np
    import PIL.Image

    rgba = np.zeros((*region.shape, 4), np.uint8)
    rgba[region] = 255
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", optimize=True)
    return REGION_PREFIX + base64.b64encode(buffer.getvalue()).decode()


def _region_shape(size: list[int] | tuple[int, int]) -> tuple[int, int]:
    """(height, width) the canvas paints an output of `size` (width, height) at: within `REGION_SIDE`."""
    width, height = size
    scale = min(1.0, REGION_SIDE / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def write_region(region, size: tuple[int, int], folder: Path, phrase: str) -> str | None:
    """The region stretched over an output of `size` (width, height) and written into `folder` as a mask image
    (white = the region); returns its path, or None when nothing of it is left at that size. The name is the
    phrase and a hash of the mask."""
    import io

    import numpy as np
    import PIL.Image

    mask = PIL.Image.fromarray(region.astype(np.uint8) * 255, "L").resize(tuple(size), PIL.Image.Resampling.NEAREST)
    if mask.getbbox() is None:
        return None
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    data = buffer.getvalue()
    slug = re.sub(r"[^a-z0-9]+", "-", phrase.lower()).strip("-")[:40] or "subject"
    path = folder / f"region-{slug}-{hashlib.sha256(data).hexdigest()[:12]}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(path)


def output_size(settings: dict, limits: PageLimits) -> tuple[int, int] | None:
    """The output's (width, height) the page's values give: the picture's (as received) when there is one, else
    the width and height; None when those are not a size this server makes (the job then says why)."""
    from msdiffusion.settings import SettingsError, parse_size, picture_size

    try:
        if settings.get("picture"):
            size = picture_size(str(settings["picture"]), "picture")
        else:
            size = parse_size([_number(settings.get("width")), _number(settings.get("height"))])
    except SettingsError:
        return None
    return (size[0], size[1]) if max(size) <= limits.max_size else None


def regions_to_masks(subjects: list[dict], size: tuple[int, int] | None, folder: Path) -> list[dict]:
    """The subjects with each painted region decoded (`decode_region`) and, where the output's `size` is known,
    written into `folder` as the subject's `mask` image at that size; the subjects' dicts are left as they were."""
    out = []
    for slot, subject in enumerate(subjects):
        region = decode_region(subject.get("region"), slot)
        subject = dict(subject)
        if region is not None and size is not None:
            subject["mask"] = write_region(region, size, folder, (subject.get("phrase") or "").strip())
            if subject["mask"] is None:
                raise PageError("region: too little is painted to show at the output's size; paint more of it.", slot)
        out.append(subject)
    return out


def region_of_mask_file(path: str) -> str:
    """A mask image of this visitor's (`VisitorFiles.find_region`) as the canvas holds it (`region_data_url`)."""
    import numpy as np
    import PIL.Image

    with PIL.Image.open(path) as mask:
        grey = mask.convert("L")
        height, width = _region_shape(grey.size)
        return region_data_url(np.asarray(grey.resize((width, height), PIL.Image.Resampling.NEAREST)) >= 128)


def region_of_polygon(polygon: list, size: list[int]) -> str:
    """A polygon mask of [x, y] fractions, rasterised as the pipelines do, as the canvas holds a region."""
    from msdiffusion.subjects import rasterise_polygon

    height, width = _region_shape(size)
    return region_data_url(rasterise_polygon(polygon, height, width).numpy())


# ---- files a job names, from an API request or an imported job -----------------------------------
def picture_files_from_uploads(data: dict, uploads: dict[str, str]) -> dict[str, list[str]]:
    """An API job's picture (`init_image`), repaint mask (`inpaint`, unless `subjects`) and subject mask images
    named by file name, mapped (in `data`) to this request's `uploads` {file name: path}, as its photos are;
    polygon masks, which name no file, stay. A value naming anything else (a server path) is refused before
    any file is read. Returns the fields mapped, {"init_image": [path], "masks": [paths]}, to be received."""
    from msdiffusion.app.jobs import quote
    from msdiffusion.settings import SUBJECTS_REGION

    def upload(value: Any, what: str) -> str:
        if not isinstance(value, str) or value not in uploads:
            raise UserInputError(
                f"job: {what}: {quote(value)} is not among the uploaded images {quote(sorted(uploads))}; upload "
                "it with the job and name it by its file name."
            )
        return uploads[value]

    mapped: dict[str, list[str]] = {"init_image": [], "masks": []}
    if data.get("init_image") is not None:
        data["init_image"] = upload(data["init_image"], "init_image")
        mapped["init_image"].append(data["init_image"])
    if data.get("inpaint") is not None and data["inpaint"] != SUBJECTS_REGION:
        data["inpaint"] = upload(data["inpaint"], "inpaint")
        mapped["masks"].append(data["inpaint"])
    subjects = data.get("subjects")
    for i, subject in enumerate(subjects if isinstance(subjects, list) else []):
        if isinstance(subject, dict) and subject.get("mask") is not None and not isinstance(subject["mask"], list):
            subject["mask"] = upload(subject["mask"], f"subjects[{i}].mask")
            mapped["masks"].append(subject["mask"])
    return mapped


def _picture_settings(fields: dict, find_photo: Callable[[str], str | None], steps: int, notes: list[str]) -> dict:
    """An imported job's picture fields as the page's values (picture, picture_mode, strength, repaint_margin),
    checked without reading any file they name: the picture is the visitor's upload of its file name where
    there is one (`find_photo`), else left out with a note; what the page cannot show is named in `notes`."""
    from msdiffusion.app.jobs import quote
    from msdiffusion.settings import (
        IMAGE_TO_IMAGE,
        INPAINTING,
        PICTURE_FIELDS,
        PIPELINE_STRENGTH,
        SUBJECTS_REGION,
        check_picture_values,
        check_types,
    )

    values = {
        "picture": None,
        "picture_mode": REPAINT,
        "strength": MODE_STRENGTH[REPAINT],
        "repaint_margin": DEFAULT_MARGIN,
    }
    check_types(fields, PICTURE_FIELDS, "imported job")
    check_picture_values(fields, "imported job", steps)
    init_image, inpaint = fields.get("init_image"), fields.get("inpaint")
    if init_image is None:
        return values
    name = Path(init_image).name
    values["picture"] = find_photo(name) if name else None
    if values["picture"] is None:
        notes.append(
            f"upload {quote(name or init_image)} as the picture to work on (the job starts from it; it is not among yours)."
        )
    values["picture_mode"] = REDRAW if inpaint is None else REPAINT
    if inpaint is not None and inpaint != SUBJECTS_REGION:
        notes.append(
            f"inpaint: {quote(Path(inpaint).name)} (a mask of the picture) is left out: the page repaints the "
            "subjects' regions."
        )
    strength = fields.get("strength")
    if strength is None:  # the pipeline's default, which the job meant (the slider keeps 0.9999 as it is)
        strength = PIPELINE_STRENGTH[(INPAINTING if inpaint is not None else IMAGE_TO_IMAGE, False)]
    values["strength"] = strength
    if fields.get("repaint_margin") is not None:
        values["repaint_margin"] = fields["repaint_margin"]
    for field_name in ("repaint_feather", "keep_outside"):
        if fields.get(field_name) is not None:
            notes.append(f"{field_name}: left out (the page uses the default; msdiff generate takes it).")
    return values


def job_to_page(
    data: dict,
    find_photo: Callable[[str], str | None],
    models: PageModels,
    find_region: Callable[[str], str | None] = lambda name: None,
) -> tuple[dict, list[dict], list[str]]:
    """A job file's (or PNG's) fields as page values, validated by `job_from_dict`; and notes for the user.

    The server's `models` stay (a job's base/adapter/encoder are ignored), and their defaults fill
    what the job leaves out. A job names its photos and picture; only their file names are read, and
    `find_photo(name)` says which upload of this visitor's (or of the package's examples) it is; a subject's
    mask image is found by `find_region(name)` among the regions this visitor painted (as the canvas holds
    it), and a polygon mask is painted in. No path in a job reaches a file of the server: the files not
    found are named in the notes, to be uploaded or painted.
    """
    from msdiffusion.app.jobs import job_from_dict, quote
    from msdiffusion.settings import PICTURE_FIELDS

    data = dict(data)
    notes: list[str] = []
    # Checked apart, by value only: `job_from_dict` would read the picture's size, and look for mask files.
    picture_fields = {name: data.pop(name) for name in PICTURE_FIELDS if name in data}
    raw_subjects = data.get("subjects") if isinstance(data.get("subjects"), list) else []
    if len(raw_subjects) > MAX_SUBJECTS:
        raise UserInputError(f"imported job: {len(raw_subjects)} subjects; the page holds up to {MAX_SUBJECTS}.")
    originals, mask_files = [], []
    placeholder = str(ASSETS / "dog.jpg")  # validate everything else even where a photo is missing here
    checked = []
    for subject in raw_subjects:
        if isinstance(subject, dict) and "image" in subject:
            images = subject["image"] if isinstance(subject["image"], list) else [subject["image"]]
            originals.append(images)
            subject = {**subject, "image": [placeholder] * max(1, len(images))}
        else:
            originals.append([])
        mask = subject.get("mask") if isinstance(subject, dict) else None
        mask_files.append(mask if isinstance(mask, str) else None)
        if isinstance(mask, str):
            subject = {name: value for name, value in subject.items() if name != "mask"}
        checked.append(subject)
    data["subjects"] = checked
    # The models (and how they run) are the server's, not the job's.
    for name in (
        "base",
        "adapter",
        "image_encoder",
        "adapter_weight_name",
        "controlnet",
        "output",
        "device",
        "dtype",
        "variant",
        "vae",
        "loras",
        "cpu_offload",
    ):
        data.pop(name, None)
    served = {k: v for k, v in models.job_fields().items() if v is not None}
    job = job_from_dict({**served, **data}, "imported job")
    picture = _picture_settings(picture_fields, find_photo, job.steps, notes)
    subjects = []
    for i, subject in enumerate(job.subjects):
        images = []
        for image in originals[i]:
            name = Path(str(image)).name if isinstance(image, str) else ""
            found = find_photo(name) if name else None
            if found is not None:
                images.append(found)
            else:
                notes.append(
                    f"subject {i + 1}: upload {quote(name or image)} (the job names it; it is not among yours)."
                )
        region = ""
        if mask_files[i] is not None:
            name = Path(mask_files[i]).name
            region = (find_region(name) if name else None) or ""
            if not region:
                notes.append(f"subject {i + 1}: paint its region again (its mask {quote(name)} is not among yours).")
        elif subject.mask is not None:  # a polygon
            region = region_of_polygon(subject.mask, job.size)
        subjects.append(
            {
                "images": images,
                "phrase": subject.phrase,
                "box": ",".join(f"{v:g}" for v in subject.box) if any(subject.box) else "",
                "scale": "" if subject.scale is None else f"{subject.scale:g}",
                "region": region,
            }
        )
    subjects += [{"images": [], "phrase": "", "box": "", "scale": "", "region": ""}] * (MAX_SUBJECTS - len(subjects))
    settings = {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt or "",
        "width": job.size[0],
        "height": job.size[1],
        "seed": job.seed,
        "steps": job.steps,
        "guidance": job.guidance,
        "scale": job.scale,
        "images": job.images,
        "auto_layout": job.mask_threshold is not None,
        "mask_threshold": job.mask_threshold if job.mask_threshold is not None else 0.5,
        "start_step": job.start_step,
        "drop_grounding": job.drop_grounding,
        "scheduler": job.scheduler or MODEL_DEFAULT_SCHEDULER,
        **picture,
    }
    return settings, subjects, notes


def fit_to_limits(settings: dict, limits: PageLimits) -> list[str]:
    """An imported job's settings brought within the server's limits (in place); a note for each change."""
    notes = []
    for name, most in (
        ("width", limits.max_size),
        ("height", limits.max_size),
        ("steps", limits.max_steps),
        ("start_step", limits.max_steps),
        ("images", limits.max_images),
        ("guidance", MAX_GUIDANCE),
        ("scale", MAX_SCALE),
        ("repaint_margin", MAX_MARGIN),
    ):
        if settings[name] > most:
            notes.append(f"{name} {settings[name]:g} is over this server's limit: set to {most:g}.")
            settings[name] = most
    return notes


def read_import(path: str, limits: PageLimits | None = None) -> dict:
    """The raw job of an uploaded YAML/JSON job file or a PNG written by msdiff; messages name the file, not its folder."""
    from msdiffusion.app.jobs import MAX_JOB_BYTES, JobError, parse_job_text, read_job_from_png

    file = Path(path)
    if file.suffix.lower() == ".png":
        try:
            return read_job_from_png(file, max_pixels=None if limits is None else limits.max_pixels)
        except JobError as error:
            raise JobError(str(error).replace(f"--from {file}", file.name)) from None
    if file.stat().st_size > MAX_JOB_BYTES:
        raise JobError(f"{file.name}: {file.stat().st_size} bytes; a job file is at most {MAX_JOB_BYTES // 1024} KiB.")
    try:
        text = file.read_text()
    except UnicodeDecodeError:
        raise JobError(f"{file.name}: not a text file (a job file is YAML or JSON text).") from None
    return parse_job_text(text, file.name)


def export_yaml(job) -> str:
    """The job as a portable YAML job file (`msdiff generate job.yaml` runs it beside its photos):
    photos by file name, only the fields that differ from the defaults."""
    import yaml

    from msdiffusion.app.jobs import portable_job

    return yaml.safe_dump(portable_job(job), sort_keys=False)


# ---- generation --------------------------------------------------------------------------------
_PIPE_LOCK = threading.Lock()  # one generation at a time (the pipeline's attention state is shared)


class Stopped(Exception):
    """A generation stopped between two steps (Stop pressed, its requester gone, or over its time)."""


def generate_files(job, pipe, on_step: Callable[[], None] | None = None) -> list[Path]:
    """Run the job with the server's pipeline; `run_job` writes the PNGs (with their portable job),
    overlays and masks. `on_step` may raise `Stopped` between steps."""
    from msdiffusion.app.jobs import run_job

    with _PIPE_LOCK:
        return run_job(job, pipe, progress=True, log=lambda *_: None, on_step=on_step, portable=True)


def _queued_event(blocks, event_id: str | None):
    """The queue's record of a running event (None outside a queue, or once it has ended)."""
    queue = getattr(blocks, "_queue", None)
    for events in list(getattr(queue, "active_jobs", None) or []):
        for event in events or ():
            if event._id == event_id:
                return event
    return None


def watch(blocks, visitor: str, limits: PageLimits, stops: dict[str, float]) -> Callable[[], None]:
    """`on_step` for the request being answered: raises `Stopped` when its visitor pressed Stop after
    asking, its requester is gone (the page closed or the client disconnected: the queue marks the
    event; a cancelled event leaves the queue), or it has run `limits.job_seconds` (counted from
    when it got the pipeline). Outside a queue (`blocks` None) only the time counts."""
    from gradio.context import LocalContext

    event_id = LocalContext.event_id.get(None) if blocks is not None else None
    event = _queued_event(blocks, event_id) if event_id is not None else None
    asked = event.enqueue_time if event is not None else time.monotonic()  # Stop counts from the click on Generate
    started: list[float] = []

    def on_step() -> None:
        now = time.monotonic()
        if not started:
            started.append(now)
        if stops.get(visitor, -math.inf) >= asked:
            raise Stopped("stopped: you pressed Stop.")
        if event_id is not None and event is not None:
            running = _queued_event(blocks, event_id)
            if running is None or not running.alive or running.closed:
                raise Stopped("stopped: its page was closed.")
        if now - started[0] > limits.job_seconds:
            raise Stopped(
                f"stopped after {limits.job_seconds:g} s: this server's time limit per request (msdiff ui --job-seconds)."
            )

    return on_step


def gallery_items(written: list[Path], picture: str | None = None) -> list[tuple[str, str]]:
    """Gallery entries: the picture worked on first (the results beside it), then each image with the part
    repainted (when the picture was pasted back outside it), its layout overlay and auto-layout masks."""
    items = [(picture, f"input: {Path(picture).name}")] if picture else []
    for path in written:
        name = path.stem
        if re.fullmatch(r"msdiff-\d+", name):
            seed = json.loads(_png_text(path)).get("seed")
            items.append((str(path), f"{path.name} (seed {seed})"))
            repainted = path.with_name(f"{name}-repainted.png")
            if repainted in written:
                items.append((str(repainted), "repainted part (white)"))
        elif name.endswith("-layout"):
            items.append((str(path), "layout"))
        elif "-mask" in name:
            items.append((str(path), "mask: " + name.split("-mask", 1)[1].split("-", 1)[-1]))
    return items


def _png_text(path: Path) -> str:
    import PIL.Image

    from msdiffusion.app.jobs import PNG_METADATA_KEY

    with PIL.Image.open(path) as image:
        return image.info.get(PNG_METADATA_KEY, "{}")


def _requesting(gr, fn: Callable) -> Callable:
    """`fn` with its `request` parameter annotated by the class itself: Gradio finds the parameter it
    fills with the request by its annotation, and this module's annotations are text naming `gr`,
    which is imported only inside `build_page` (where Gradio cannot resolve it)."""
    fn.__annotations__ = {**fn.__annotations__, "request": gr.Request}
    return fn


def _visitor(request) -> str:
    """Who asks: Gradio's session (one per open page, one per API client)."""
    return getattr(request, "session_hash", None) or "local"


# ---- the page ----------------------------------------------------------------------------------
CSS = """
#box-canvas { width: 100%; max-width: 512px; display: block; cursor: crosshair; border: 1px solid #a1a1aa; outline: none; }
#box-tools button { margin: 4px 4px 0 0; padding: 2px 8px; border: 1px solid #a1a1aa; border-radius: 4px; }
#box-tools button.active { font-weight: bold; border-width: 2px; }
#box-tools label { margin-right: 8px; }
.field-error p { color: #b91c1c; font-weight: 600; }
#status p { font-weight: 600; }
"""


def _canvas_html() -> str:
    from msdiffusion.preview import PALETTE

    buttons = "".join(
        f'<button type="button" data-subject="{i}" style="border-color: rgb{PALETTE[i]}; color: rgb{PALETTE[i]}">{i + 1}</button>'
        for i in range(MAX_SUBJECTS)
    )
    tools = "".join(
        f'<button type="button" data-tool="{tool}">{label}</button>'
        for tool, label in (("box", "Box"), ("brush", "Brush"), ("eraser", "Eraser"))
    )
    return (
        '<div id="box-editor"><canvas id="box-canvas" tabindex="0"></canvas>'
        f'<div id="box-tools">Drawing for: {buttons}<button type="button" data-action="delete">Delete box</button><br>'
        f'Tool: {tools}<label>Brush size <input type="range" id="brush-size" min="2" max="80" value="24"></label>'
        '<button type="button" data-action="clear-region">Clear region</button></div>'
        "<p><small>Box: drag on empty space to draw the selected subject's box; drag a box to move it, its corners "
        "to resize it; Delete removes the selected box. The numbers below follow. Brush and Eraser paint the "
        "selected subject's region (any shape; its box may then stay empty). A picture to start from shows "
        "behind.</small></p></div>"
    )


def _canvas_js() -> str:
    from msdiffusion.preview import PALETTE

    source = (Path(__file__).resolve().parent / "page_canvas.js").read_text()
    return (
        source.replace("__SUBJECTS__", str(MAX_SUBJECTS))
        .replace("__PALETTE__", json.dumps([list(c) for c in PALETTE]))
        .replace("__REGION_SIDE__", str(REGION_SIDE))
    )


def build_page(models: PageModels, pipe=None, limits: PageLimits | None = None):
    """The Gradio Blocks of the page, generating with `pipe` (loaded from `models` on first use if None),
    every request held to `limits`. `page.visitor_files` keeps the visitors' files (`.close()` removes them)."""
    import gradio as gr

    limits = limits or PageLimits()
    defaults = {
        "negative_prompt": "",
        "width": 1024,
        "height": 1024,
        "seed": 0,
        "steps": 30,
        "guidance": 7.5,
        "scale": 0.6,
        "images": 1,
        "mask_threshold": 0.5,
        "start_step": 5,
    }
    model_defaults = dict(models.defaults)
    if "size" in model_defaults:
        size = model_defaults.pop("size")
        model_defaults["width"], model_defaults["height"] = (size, size) if isinstance(size, int) else size
    defaults.update(model_defaults)
    defaults["negative_prompt"] = defaults.get("negative_prompt") or ""  # a named set's None: an empty box
    defaults["steps"] = min(defaults["steps"], limits.max_steps)
    defaults["images"] = min(defaults["images"], limits.max_images)
    defaults["width"], defaults["height"] = (
        min(v, limits.max_size // 8 * 8) for v in (defaults["width"], defaults["height"])
    )
    example = first_visit(models)
    example_subjects = list(example["subjects"]) + [None] * (MAX_SUBJECTS - len(example["subjects"]))
    pipes: dict = {"pipe": pipe}
    pipe_lock = threading.Lock()

    def get_pipe():
        from msdiffusion.loading import load_pipeline

        with pipe_lock:
            if pipes["pipe"] is None:
                pipes["pipe"] = load_pipeline(models.model_settings())
            return pipes["pipe"]

    files = VisitorFiles(limits.keep_minutes * 60)
    stops: dict[str, float] = {}  # visitor -> when they last pressed Stop
    keep = max(1, int(limits.keep_minutes * 60))

    # Gradio's own copies (uploads, results it serves) are deleted after the same age.
    with gr.Blocks(
        title="msdiff ui: MS-Diffusion", analytics_enabled=False, delete_cache=(min(keep, 600), keep)
    ) as page:
        gr.Markdown(
            f"## MS-Diffusion: your subjects, where you want them\nModels: `{models.base}` + `{models.adapter}` + "
            f"`{models.image_encoder}`. {model_note(models)} The example is ready: press Generate. To draw your own "
            "subjects, clear a subject's photos (×) and drop yours."
        )
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", value=example["prompt"], elem_id="prompt", max_length=MAX_TEXT)
                negative = gr.Textbox(
                    label="Negative prompt", value=defaults["negative_prompt"], elem_id="negative-prompt"
                )
                with gr.Row():
                    presets = size_presets(models, limits)
                    own = f"{defaults['width']}x{defaults['height']}"
                    preset = gr.Dropdown(
                        [*presets, "custom"],
                        value=own if own in presets else "custom",
                        label="Size preset",
                        elem_id="size-preset",
                    )
                    width = gr.Number(label="Width", value=defaults["width"], precision=0, step=8, elem_id="width")
                    height = gr.Number(label="Height", value=defaults["height"], precision=0, step=8, elem_id="height")
                size_error = gr.Markdown("", elem_id="size-error", elem_classes="field-error")
                gr.HTML(_canvas_html(), js_on_load=None)
                with gr.Accordion("Start from a picture (optional)", open=True, elem_id="picture-section"):
                    picture = gr.File(
                        label="Picture to work on: it shows behind the boxes, and the output takes its size",
                        file_types=["image"],
                        elem_id="picture",
                        height=120,
                    )
                    picture_error = gr.Markdown("", elem_id="picture-error", elem_classes="field-error")
                    with gr.Column(visible=False) as picture_controls:
                        mode = gr.Radio(
                            list(PICTURE_MODES), value=REPAINT, label="What to do with it", elem_id="picture-mode"
                        )
                        picture_strength = gr.Slider(
                            0.05,
                            1,
                            value=MODE_STRENGTH[REPAINT],
                            step=0.01,
                            label="Strength (how far it is redrawn; a subject needs about 0.5 or more)",
                            elem_id="strength",
                        )
                        margin = gr.Slider(
                            0,
                            MAX_MARGIN,
                            value=DEFAULT_MARGIN,
                            step=0.01,
                            label="Margin repainted around the regions (a fraction of the shorter side)",
                            elem_id="repaint-margin",
                        )
            with gr.Column(scale=2):
                with gr.Row():
                    seed = gr.Number(label="Seed (empty: random)", value=defaults["seed"], precision=0, elem_id="seed")
                    randomise = gr.Button("Randomise", elem_id="randomise", size="sm")
                steps = gr.Slider(1, limits.max_steps, value=defaults["steps"], step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(
                    0, MAX_GUIDANCE, value=defaults["guidance"], step=0.5, label="Guidance", elem_id="guidance"
                )
                scale = gr.Slider(
                    0, MAX_SCALE, value=defaults["scale"], step=0.05, label="Subject scale", elem_id="scale"
                )
                images = gr.Slider(
                    1, limits.max_images, value=defaults["images"], step=1, label="Number of images", elem_id="images"
                )
                with gr.Accordion("More", open=False):
                    auto_layout = gr.Checkbox(label="Auto layout", value=False, elem_id="auto-layout")
                    threshold = gr.Slider(
                        0,
                        0.99,
                        value=defaults["mask_threshold"],
                        step=0.01,
                        label="Auto-layout threshold",
                        elem_id="mask-threshold",
                    )
                    start_step = gr.Slider(
                        1,
                        limits.max_steps,
                        value=min(defaults["start_step"], limits.max_steps),
                        step=1,
                        label="Auto layout from step",
                        elem_id="start-step",
                    )
                    drop_grounding = gr.Checkbox(label="Drop grounding tokens", value=False, elem_id="drop-grounding")
                    scheduler = gr.Dropdown(
                        [MODEL_DEFAULT_SCHEDULER, *SCHEDULERS],
                        value=MODEL_DEFAULT_SCHEDULER,
                        label="Scheduler",
                        elem_id="scheduler",
                    )
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    export = gr.Button("Export job (YAML)", elem_id="export")
                status = gr.Markdown("", elem_id="status", elem_classes="field-error")
                gallery = gr.Gallery(
                    label="Results: the picture worked on, each image, the part repainted, layout overlay, masks",
                    columns=3,
                    elem_id="results",
                    height="auto",
                )
                downloads = gr.File(
                    label="Download (PNGs carry their job: msdiff generate --from, beside the photos, the picture "
                    "and the painted regions' masks listed here)",
                    file_count="multiple",
                    elem_id="downloads",
                )
        subject_fields: list[dict] = []
        with gr.Row():
            for i, shown in enumerate(example_subjects):
                with gr.Column(min_width=200):
                    gr.Markdown(f"**Subject {i + 1}**")
                    files_input = gr.File(
                        value=shown["images"] if shown else None,
                        label=f"Photos (up to {limits.max_photos})",
                        file_count="multiple",
                        file_types=["image"],
                        elem_id=f"subject{i}-images",
                        height=120,
                    )
                    phrase = gr.Textbox(
                        label="Phrase (words of the prompt)",
                        value=shown["phrase"] if shown else "",
                        elem_id=f"subject{i}-phrase",
                        max_lines=1,
                    )
                    box = gr.Textbox(
                        label="Box x0,y0,x1,y1 (0-1; empty: auto layout)",
                        value=",".join(f"{v:g}" for v in shown["box"]) if shown and any(shown["box"]) else "",
                        elem_id=f"subject{i}-box",
                        max_lines=1,
                    )
                    subject_scale = gr.Textbox(
                        label="Scale (empty: the page's)", elem_id=f"subject{i}-scale", max_lines=1
                    )
                    # Written by the canvas's brush (a PNG data URL), read by `decode_region`; not for typing.
                    region = gr.Textbox(visible="hidden", elem_id=f"subject{i}-region")
                    error = gr.Markdown("", elem_id=f"subject{i}-error", elem_classes="field-error")
                    subject_fields.append(
                        {
                            "images": files_input,
                            "phrase": phrase,
                            "box": box,
                            "scale": subject_scale,
                            "region": region,
                            "error": error,
                        }
                    )
        with gr.Row():
            exported = gr.File(
                label="Job file (and the painted regions' masks it names)", file_count="multiple", elem_id="exported"
            )
            imported = gr.File(
                label="Import a job (YAML/JSON) or a PNG made by msdiff",
                file_types=[".yaml", ".yml", ".json", ".png"],
                elem_id="import",
            )

        setting_components = [
            prompt,
            negative,
            width,
            height,
            seed,
            steps,
            guidance,
            scale,
            images,
            auto_layout,
            threshold,
            start_step,
            drop_grounding,
            scheduler,
            picture,
            mode,
            picture_strength,
            margin,
        ]
        subject_components = [s[name] for s in subject_fields for name in SUBJECT_FIELDS]
        photo_components = [s["images"] for s in subject_fields]
        # Every answer sets every message: none is left over from an earlier one.
        message_components = [s["error"] for s in subject_fields] + [size_error, picture_error, status]
        places = {"size": (MAX_SUBJECTS, "the size"), "picture": (MAX_SUBJECTS + 1, "the picture")}

        def split(values: tuple) -> tuple[dict, list[dict]]:
            settings = dict(zip(SETTING_FIELDS, values[: len(SETTING_FIELDS)]))
            rest = values[len(SETTING_FIELDS) :]
            n = len(SUBJECT_FIELDS)
            subjects = [dict(zip(SUBJECT_FIELDS, rest[i * n : (i + 1) * n])) for i in range(MAX_SUBJECTS)]
            return settings, subjects

        def messages(error: PageError | None = None, note: str = "") -> list[str]:
            shown = [""] * len(message_components)
            seen = []
            for problem in [error, *error.also] if error is not None else []:
                if problem.slot is not None:
                    index, place = problem.slot, f"subject {problem.slot + 1}"
                else:
                    index, place = places.get(problem.field, (len(shown) - 1, None))
                shown[index] = "\n\n".join(filter(None, [shown[index], f"⚠ {problem}"]))
                if place and place not in seen:
                    seen.append(place)
            if seen:  # the field may be out of sight: the status line says where to look
                shown[-1] = "\n\n".join(filter(None, [shown[-1], f"⚠ Nothing was made: see {' and '.join(seen)}."]))
            shown[-1] = "\n\n".join(filter(None, [shown[-1], note]))
            return shown

        def refused(error: PageError, outputs: int) -> list:
            return [*messages(error), *[gr.skip()] * outputs]

        def on_generate(request: gr.Request, progress=gr.Progress(track_tqdm=True), *values):
            visitor = _visitor(request)
            settings, subjects = split(values)
            try:
                job, slots = visitor_job(settings, subjects, models, visitor, files, limits)
                check_limits(job, slots, limits)
                receive_photos(job, slots, visitor, files, limits)
                active = get_pipe()
                check_before_work(job, slots, getattr(active, "tokenizer", None))
            except PageError as error:
                return refused(error, 3)
            except UserInputError as error:
                return refused(PageError(str(error)), 3)
            progress(0, desc="generating")
            try:
                written = generate_files(job, active, watch(page, visitor, limits, stops))
            except Stopped as stopped:
                return refused(PageError(str(stopped)), 3)
            except UserInputError as error:
                return refused(PageError(str(error)), 3)
            except Exception as error:  # noqa: BLE001  (the page must stay usable; the message says what failed)
                return refused(PageError(f"generation failed: {type(error).__name__}: {str(error)[:300]}"), 3)
            pngs = [str(p) for p in written if re.fullmatch(r"msdiff-\d+", p.stem)]
            first_seed = json.loads(_png_text(Path(pngs[0]))).get("seed")
            done = f"Made {len(pngs)} image{'s' if len(pngs) > 1 else ''} (seed {first_seed})."
            # The painted regions' masks, which the PNGs name and only the server has, come with them.
            regions = [s.mask for s in job.subjects if isinstance(s.mask, str)]
            return [*messages(note=done), gallery_items(written, job.init_image), pngs + regions, first_seed]

        generating = generate.click(
            _requesting(gr, on_generate),
            setting_components + subject_components,
            message_components + [gallery, downloads, seed],
            api_visibility="private",
            concurrency_limit=1,
            concurrency_id="generate",
        )

        def on_stop(request: gr.Request) -> str:
            stops[_visitor(request)] = time.monotonic()
            return "Stopped."

        # Stop marks this visitor's running generation (it ends at its next step) and drops a waiting one.
        # It skips the queue: a full queue must not keep anyone from stopping their own request.
        stop.click(_requesting(gr, on_stop), None, status, cancels=[generating], queue=False, api_visibility="private")

        def on_export(request: gr.Request, *values):
            visitor = _visitor(request)
            settings, subjects = split(values)
            try:
                job, _ = visitor_job(settings, subjects, models, visitor, files, limits)
            except PageError as error:
                return refused(error, 1)
            for subject in job.subjects:
                for path in subject.images:
                    files.remember(visitor, path)
            path = files.folder(visitor) / "export" / "msdiff-job.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(export_yaml(job))
            regions = [s.mask for s in job.subjects if isinstance(s.mask, str)]
            note = "Exported: the job names its photos" + (", picture" if job.init_image else "")
            note += " and painted regions' masks (listed here)" if regions else ""
            note += " by file name; keep them beside it."
            return [*messages(note=note), [str(path), *regions]]

        export.click(
            _requesting(gr, on_export),
            setting_components + subject_components,
            message_components + [exported],
            api_visibility="private",
        )

        page_values = setting_components + subject_components

        def on_import(request: gr.Request, path, shown_picture, *photos):
            visitor = _visitor(request)
            if not path:
                return [gr.skip()] * (len(page_values) + len(message_components))
            shown = [photo for listed in photos for photo in listed or []] + ([shown_picture] if shown_picture else [])
            for file in shown:  # the photos and picture on the page now: a job may name them
                files.remember(visitor, file)

            def find_region(name: str) -> str | None:
                found = files.find_region(visitor, name)
                return region_of_mask_file(found) if found else None

            try:
                data = read_import(path, limits)
                settings, subjects, notes = job_to_page(
                    data, lambda name: files.find(visitor, name), models, find_region
                )
            except UserInputError as error:
                return [gr.skip()] * len(page_values) + messages(PageError(f"not imported: {error}"))
            notes += fit_to_limits(settings, limits)
            values = [settings[name] for name in SETTING_FIELDS]
            for subject in subjects:
                values += [subject["images"] or None, *(subject[name] for name in SUBJECT_FIELDS[1:])]
            return values + messages(note=" ".join(["Imported.", *notes]))

        imported.upload(
            _requesting(gr, on_import),
            [imported, picture, *photo_components],
            page_values + message_components,
            api_visibility="private",
        )

        def on_picture(request: gr.Request, path):
            """A picture given (uploaded, imported) or removed: the size follows it, locked while it is there."""
            from msdiffusion.settings import picture_size

            unlocked = [gr.update(interactive=True)] * 3
            if not path:
                return [*unlocked, gr.update(visible=False), ""]
            try:
                received = files.receive_picture(_visitor(request), path, limits)
            except PageError as error:
                return [*unlocked, gr.update(visible=False), f"⚠ {error}"]
            width_, height_ = picture_size(received, "picture")
            return [
                gr.update(value=width_, interactive=False),
                gr.update(value=height_, interactive=False),
                gr.update(value="custom", interactive=False),
                gr.update(visible=True),
                "",
            ]

        picture.change(
            _requesting(gr, on_picture),
            picture,
            [width, height, preset, picture_controls, picture_error],
            api_visibility="private",
        )

        def on_mode_chosen(chosen: str):
            return MODE_STRENGTH.get(chosen, gr.skip())

        def on_mode(chosen: str):
            return gr.update(visible=chosen == REPAINT)

        # Choosing a mode sets its strength (`input`: the visitor's choice; an import sets the strength itself);
        # the margin shows with the mode it is for, however the mode was set (`change`).
        mode.input(on_mode_chosen, mode, picture_strength, api_visibility="private")
        mode.change(on_mode, mode, margin, api_visibility="private")

        def on_preset(choice):
            if choice == "custom":
                return gr.skip(), gr.skip()
            w, h = (int(v) for v in choice.split("x"))
            return w, h

        preset.change(on_preset, preset, [width, height], api_visibility="private")
        randomise.click(lambda: random.randrange(2**31), None, seed, api_visibility="private")

        def on_leave(request: gr.Request) -> None:
            visitor = _visitor(request)
            stops.pop(visitor, None)
            files.forget(visitor)

        page.unload(_requesting(gr, on_leave))

        # The API for other programs (gradio_client): a job (YAML/JSON text) and its subjects' photos.
        api_job = gr.Textbox(visible=False)
        api_images = gr.File(file_count="multiple", visible=False)
        api_out = gr.File(file_count="multiple", visible=False)

        def generate_job(request: gr.Request, job: str, images: list[str] | None) -> list[str]:
            """Generate a job (YAML or JSON text, as a job file) on the server's models.

            Each subject's `image` names one of the uploaded `images` by file name, as do `init_image`, a mask
            `inpaint` and the subjects' mask images. Returns the PNGs.
            """
            from msdiffusion.app.jobs import JobError, job_from_dict, parse_job_text, quote

            visitor = _visitor(request)
            by_name = {Path(p).name: str(p) for p in images or []}
            try:
                data = parse_job_text(job or "", "job")
                named = picture_files_from_uploads(data, by_name)
                # Received as photos are (checked, shrunk) before `job_from_dict` reads the picture's size.
                received = {path: files.receive(visitor, path, limits) for path in named["masks"]}
                if named["init_image"]:
                    data["init_image"] = files.receive_picture(visitor, data["init_image"], limits)
                if data.get("inpaint") in received:
                    data["inpaint"] = received[data["inpaint"]]
                for subject in data["subjects"] if isinstance(data.get("subjects"), list) else []:
                    if isinstance(subject, dict) and isinstance(subject.get("mask"), str):
                        subject["mask"] = received[subject["mask"]]
            except PageError as error:
                raise gr.Error(f"job: {error}") from None
            except UserInputError as error:  # JobError included
                raise gr.Error(str(error)) from None
            subjects = data.get("subjects")
            if isinstance(subjects, list) and len(subjects) > MAX_SUBJECTS:
                raise gr.Error(f"job: subjects: {len(subjects)}; the page takes up to {MAX_SUBJECTS}.")
            for i, subject in enumerate(subjects if isinstance(subjects, list) else []):
                if not isinstance(subject, dict) or "image" not in subject:
                    continue
                names = subject["image"] if isinstance(subject["image"], list) else [subject["image"]]
                missing = [n for n in names if not isinstance(n, str) or n not in by_name]
                if missing:
                    raise gr.Error(
                        f"subjects[{i}].image: {quote(missing)} not among the uploaded images {quote(sorted(by_name))}."
                    )
                subject["image"] = [by_name[n] for n in names]
            for name in ("controlnet", "output", "device", "dtype", "variant", "vae", "loras", "cpu_offload"):
                data.pop(name, None)  # the server's models and how they run
            try:
                spec = job_from_dict(
                    {
                        **data,
                        **{k: v for k, v in models.job_fields().items() if v is not None},
                        "output": str(files.results(visitor)),
                    },
                    "job",
                )
                if spec.scheduler is not None:
                    from msdiffusion.loading import check_scheduler_name

                    check_scheduler_name(spec.scheduler)
                slots = list(range(len(spec.subjects)))
                check_limits(spec, slots, limits)
                receive_photos(spec, slots, visitor, files, limits)
                active = get_pipe()
                check_before_work(spec, slots, getattr(active, "tokenizer", None))
            except PageError as error:
                where = f"subjects[{error.slot}]: " if error.slot is not None else ""
                raise gr.Error(f"job: {where}{error}") from None
            except JobError as error:
                raise gr.Error(str(error)) from None
            try:
                written = generate_files(spec, active, watch(page, visitor, limits, stops))
            except Stopped as stopped:
                raise gr.Error(f"job: {stopped}") from None
            return [str(p) for p in written if re.fullmatch(r"msdiff-\d+", p.stem)]

        gr.Button(visible=False).click(
            _requesting(gr, generate_job),
            [api_job, api_images],
            api_out,
            api_name="generate_job",
            concurrency_id="generate",
            concurrency_limit=1,
        )
    # The page's own starting files (Gradio's copies of the example photos) are never a visitor's to remove.
    files.protected = {
        str(Path(p).resolve()) for block in page.blocks.values() for p in getattr(block, "keep_in_cache", ())
    }
    page.visitor_files = files
    page.page_limits = limits
    return page


def launch(page, host: str = "127.0.0.1", port: int | None = None, auth: list[tuple[str, str]] | None = None, **kwargs):
    """Queue (one generation at a time, `queue_size` waiting), sweep old files, and serve the page.

    Every event goes through the queue (`api_open=False`), so that its limits hold for HTTP callers too.
    """
    limits = page.page_limits
    page.queue(default_concurrency_limit=1, max_size=limits.queue_size, api_open=False)
    page.visitor_files.start_sweeping()
    return page.launch(
        server_name=host,
        server_port=port,
        css=CSS,
        js=_canvas_js(),
        auth=auth,
        auth_message="msdiff ui: log in with the user name and password the server was started with (--auth).",
        max_file_size=limits.max_upload_bytes,
        allowed_paths=[str(ASSETS)],  # the example photos an imported job may name
        **kwargs,
    )


# ---- command -----------------------------------------------------------------------------------
def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a positive {'whole ' if kind is int else ''}number, got {text!r}"
            )
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def register(subparsers) -> None:
    ui = subparsers.add_parser(
        "ui",
        help="a web page: upload subjects, draw their boxes, generate (needs the ui extra)",
        description="Serve a Gradio page to draw subjects' boxes and generate. With no model options it serves "
        'the world\'s trained models (what msdiff demo uses). Install with: pip install -e ".[ui]". Before '
        "sharing it (--host 0.0.0.0), read README's 'Sharing the page'.",
    )
    ui.add_argument("job", nargs="?", help="job file whose models (and prompt, subjects, settings) start the page")
    ui.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; give --auth with it)"
    )
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    models = ui.add_argument_group("models (as msdiff generate; default: the world's trained models)")
    models.add_argument("--base", help="SDXL: hub id, diffusers folder, single .safetensors file, or tiny-random")
    models.add_argument("--adapter", help="MS-Diffusion adapter: hub id, ms_adapter.bin, or project folder")
    models.add_argument("--adapter-weight-name", help="file name of the adapter inside a repo or folder")
    models.add_argument("--image-encoder", help="CLIP vision encoder: hub id or folder")
    models.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    models.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    access = ui.add_argument_group("who may use it")
    access.add_argument(
        "--auth",
        action="append",
        metavar="USER:PASS",
        help="ask for this login (repeat for more users); without it anyone who reaches the port uses the page",
    )
    access.add_argument(
        "--auth-file", metavar="FILE", help="logins, one USER:PASS a line (keeps passwords out of the process list)"
    )
    limits = ui.add_argument_group("limits (what one visitor or API caller may ask of the server)")
    default = PageLimits()
    limits.add_argument(
        "--max-size", type=_positive(int), default=default.max_size, metavar="PIXELS", help="largest width or height"
    )
    limits.add_argument("--max-steps", type=_positive(int), default=default.max_steps, metavar="N", help="most steps")
    limits.add_argument(
        "--max-images", type=_positive(int), default=default.max_images, metavar="N", help="most images per request"
    )
    limits.add_argument(
        "--max-photos", type=_positive(int), default=default.max_photos, metavar="N", help="most photos of one subject"
    )
    limits.add_argument(
        "--max-upload-mb",
        type=_positive(float),
        default=default.max_upload_mb,
        metavar="MB",
        help="largest file a visitor may upload",
    )
    limits.add_argument(
        "--max-megapixels",
        type=_positive(float),
        default=default.max_megapixels,
        metavar="MP",
        help=f"largest photo, read from its header before decoding; photos are shrunk on receipt to {PHOTO_SIDE} "
        "pixels a side",
    )
    limits.add_argument(
        "--queue-size",
        type=_positive(int),
        default=default.queue_size,
        metavar="N",
        help="requests that may wait for the model; more are refused until one starts",
    )
    limits.add_argument(
        "--job-seconds",
        type=_positive(float),
        default=default.job_seconds,
        metavar="S",
        help="a generation running longer is stopped (a generation also stops when its page is closed or Stop is "
        "pressed)",
    )
    limits.add_argument(
        "--keep-minutes",
        type=_positive(float),
        default=default.keep_minutes,
        metavar="M",
        help="a visitor's photos and results are removed when they leave, or this long after their last use",
    )
    ui.set_defaults(func=run_ui)


def limits_from_args(args) -> PageLimits:
    return PageLimits(
        **{name: getattr(args, name) for name in PageLimits.__dataclass_fields__ if getattr(args, name, None)}
    )


def read_auth(logins: list[str] | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """The logins of `--auth USER:PASS` and `--auth-file` (one a line; blank and # lines skipped); None without any."""
    entries = [("--auth", text) for text in logins or []]
    if auth_file:
        path = Path(auth_file)
        if not path.is_file():
            raise UserInputError(f"--auth-file: {auth_file!r} not found.")
        lines = [line.strip() for line in path.read_text().splitlines()]
        entries += [
            (f"--auth-file line {n}", line) for n, line in enumerate(lines, 1) if line and not line.startswith("#")
        ]
        if not entries:
            raise UserInputError(f"--auth-file: {auth_file!r} holds no USER:PASS line.")
    pairs = []
    for where, text in entries:
        user, colon, password = text.partition(":")
        if not colon or not user.strip() or not password:
            # The message never repeats the text: it may be a password.
            raise UserInputError(f"{where}: expected USER:PASS (a user name, a colon, a password).")
        pairs.append((user.strip(), password))
    return pairs or None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may be this machine's address on the network


def sharing_warning(host: str, auth) -> str | None:
    """The warning for a page bound beyond loopback without a login (None when there is none to give)."""
    if is_loopback(host) or auth:
        return None
    return (
        f"msdiff ui: warning: listening on {host} without --auth: anyone who can reach this machine's port can "
        "use the page and its models. Give --auth USER:PASS (or --auth-file FILE); README: 'Sharing the page'."
    )


def models_from_args(args) -> PageModels:
    """The served models: a job file's, overridden by flags; the world's models when none are given."""
    from msdiffusion.app.jobs import job_from_dict, read_job_file
    from msdiffusion.loading import NAMED_MODELS
    from msdiffusion.settings import DEFAULT_IMAGE_ENCODER

    given = {"base": args.base, "adapter": args.adapter, "image_encoder": args.image_encoder}
    if args.job:
        job = job_from_dict(read_job_file(args.job), args.job, Path(args.job).resolve().parent)
        data = job.to_dict()
        data.update({k: v for k, v in given.items() if v})
        defaults = {
            k: data[k]
            for k in ("negative_prompt", "size", "seed", "steps", "guidance", "scale", "images", "start_step")
        }
        defaults["negative_prompt"] = defaults["negative_prompt"] or ""
        # The job's subjects are the first visit's example: the server's operator chose to show these photos.
        example = {
            "prompt": job.prompt,
            "subjects": [{"images": s.images, "phrase": s.phrase, "box": s.box} for s in job.subjects[:MAX_SUBJECTS]],
        }
        return PageModels(
            data["base"],
            data["adapter"],
            data["image_encoder"],
            args.adapter_weight_name or data["adapter_weight_name"],
            args.device or data["device"],
            args.dtype or data["dtype"],
            defaults,
            example,
        )
    if not any(given.values()):
        models = default_models()
    else:
        if not (args.base and args.adapter):
            raise UserInputError(
                "give --base and --adapter (and --image-encoder, or its default) together, or none for the world's models."
            )
        models = PageModels(args.base, args.adapter, args.image_encoder or DEFAULT_IMAGE_ENCODER)
        if args.base in NAMED_MODELS:
            models.defaults = dict(NAMED_MODELS[args.base].defaults)
    models.adapter_weight_name, models.device, models.dtype = args.adapter_weight_name, args.device, args.dtype
    return models


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on (Gradio would say so only after the models load, naming an
    environment variable instead of --port)."""
    import socket

    if not 0 < port < 65536:
        raise UserInputError(f"--port must be from 1 to 65535, got {port}.")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserInputError(
                f"--port {port}: cannot listen on {host}:{port} ({error.strerror or error}); another program may be "
                "using it: give another --port."
            ) from None


def run_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserInputError('msdiff ui needs Gradio: pip install -e ".[ui]" (or pip install gradio).') from None
    from msdiffusion.loading import check_models, device_and_dtype, load_pipeline

    auth = read_auth(args.auth, args.auth_file)
    limits = limits_from_args(args)
    warning = sharing_warning(args.host, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    check_port_free(args.host, args.port)  # before a minute of loading, not after
    models = models_from_args(args)
    settings = models.model_settings()
    adapter = check_models(settings)
    device, dtype = device_and_dtype(models.device, models.dtype)
    print(f"msdiff ui: loading {models.base} + {models.adapter} + {models.image_encoder} on {device} ...", flush=True)
    pipe = load_pipeline(settings, device, dtype, adapter)
    page = build_page(models, pipe, limits)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        # A service manager stops the server with SIGTERM: leave as on Ctrl-C, removing the visitors' files.
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        launch(page, host=args.host, port=args.port, auth=auth)
    finally:
        page.visitor_files.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0
