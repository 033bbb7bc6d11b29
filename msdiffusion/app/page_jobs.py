"""The `msdiff ui` page's values and jobs: what the server serves (`PageModels`) and the page's first
visit, the page's values as a validated `Job` (`page_to_job`, `visitor_job`) checked against the
server's limits (`check_limits`, `check_before_work`), a job file or PNG as page values (`read_import`,
`job_to_page`, `fit_to_limits`), an API job's files by name (`picture_files_from_uploads`), and the
YAML export (`export_yaml`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msdiffusion.app.page_limits import MAX_GUIDANCE, MAX_SCALE, MAX_SEED, MAX_SUBJECTS, MAX_TEXT, PageError, PageLimits
from msdiffusion.app.regions import region_of_polygon, regions_to_masks
from msdiffusion.app.visitors import ASSETS, VisitorFiles, unreadable_message
from msdiffusion.errors import UserInputError

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

MODEL_DEFAULT_SCHEDULER = "(model default)"

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


# Job fields that say how the server's models run, or where results go: a job sent to the page or imported
# into it never sets them.
SERVER_FIELDS = (
    "controlnet",
    "output",
    "device",
    "dtype",
    "variant",
    "vae",
    "loras",
    "cpu_offload",
    "image_encoder_offload",
)


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
    cpu_offload: bool = False  # how the models run on a small GPU (`msdiff ui --cpu-offload`, ...)
    image_encoder_offload: bool = False

    def model_settings(self):
        from msdiffusion.settings import ModelSettings

        return ModelSettings(
            base=self.base,
            adapter=self.adapter,
            image_encoder=self.image_encoder,
            adapter_weight_name=self.adapter_weight_name,
            device=self.device,
            dtype=self.dtype,
            cpu_offload=self.cpu_offload,
            image_encoder_offload=self.image_encoder_offload,
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
                raise PageError(unreadable_message(Path(path).name), slots[j]) from None
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
    for name in ("base", "adapter", "image_encoder", "adapter_weight_name", *SERVER_FIELDS):
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
    from msdiffusion.app.jobs import JobError, read_job_file, read_job_from_png

    file = Path(path)
    if file.suffix.lower() == ".png":
        try:
            return read_job_from_png(file, max_pixels=None if limits is None else limits.max_pixels)
        except JobError as error:
            raise JobError(str(error).replace(f"--from {file}", file.name)) from None
    return read_job_file(file, label=file.name)


def export_yaml(job) -> str:
    """The job as a portable YAML job file (`msdiff generate job.yaml` runs it beside its photos):
    photos by file name, only the fields that differ from the defaults."""
    import yaml

    from msdiffusion.app.jobs import portable_job

    return yaml.safe_dump(portable_job(job), sort_keys=False)
