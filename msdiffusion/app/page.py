"""`msdiff ui`: a Gradio page where people upload their subjects, draw their boxes and generate.

The page speaks the job format of `msdiffusion.app.jobs`: what it generates is a `Job` validated by
`job_from_dict` and run by `run_job`, so its PNGs carry their job exactly as `msdiff generate`
writes them, and its YAML export and import are job files. The models are the server's (given when
it starts); everything a visitor uploads or makes lives in a folder of its own request.

Gradio is an optional extra (`pip install -e ".[ui]"`); this module imports it only when building
the page, so that `msdiff --help` works without it.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msdiffusion.errors import UserInputError

MAX_SUBJECTS = 4
# SDXL's usual sizes (its training buckets), width x height, plus the small sizes of the CPU models.
SIZE_PRESETS = (
    "1024x1024",
    "1152x896",
    "896x1152",
    "1216x832",
    "832x1216",
    "1344x768",
    "768x1344",
    "1536x640",
    "640x1536",
    "512x512",
    "64x64",
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
)
SUBJECT_FIELDS = ("images", "phrase", "box", "scale")


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


# ---- page values <-> job ------------------------------------------------------------------------
class PageError(UserInputError):
    """Bad input on the page; `slot` is the subject it belongs to (None: the page's settings)."""

    def __init__(self, message: str, slot: int | None = None):
        super().__init__(message)
        self.slot = slot


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

    `subjects` holds one dict per subject slot ({images, phrase, box, scale}); empty slots are skipped.
    """
    from msdiffusion.app.jobs import JobError, job_from_dict

    slots, listed = [], []
    for slot, subject in enumerate(subjects):
        images = [str(p) for p in (subject.get("images") or [])]
        phrase = (subject.get("phrase") or "").strip()
        box = (subject.get("box") or "").strip()
        if not images and not phrase and not box:
            continue
        entry: dict = {"image": images, "phrase": phrase, "box": _box_value(box)}
        if str(subject.get("scale") or "").strip():
            entry["scale"] = _number_value(subject["scale"])
        slots.append(slot)
        listed.append(entry)
    if not listed:
        raise PageError("add at least one subject: its photos, its phrase, and (or auto layout) its box.", 0)
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
    }
    scheduler = settings.get("scheduler")
    if scheduler and scheduler != MODEL_DEFAULT_SCHEDULER:
        data["scheduler"] = scheduler
    try:
        return job_from_dict(data, "page"), slots
    except JobError as error:
        raise _located(str(error), slots) from None


def _located(message: str, slots: list[int]) -> PageError:
    """A job error, worded for the page and tied to the subject it names (if any)."""
    message = message.removeprefix("page: ")
    found = re.match(r"subjects\[(\d+)\]\.?(\w*):?\s*", message)
    if found:
        slot = slots[int(found.group(1))]
        what = found.group(2) or "subject"
        return PageError(f"{what}: {message[found.end() :]}", slot)
    return PageError(message)


def check_before_work(job, slots: list[int], tokenizer) -> None:
    """What fails only later in the pipeline, checked before any work: unreadable photos, phrases not in the prompt."""
    from msdiffusion.layout import phrase_token_positions
    from msdiffusion.subjects import load_image

    for j, subject in enumerate(job.subjects):
        for path in subject.images:
            try:
                load_image(path, "image")
            except ValueError as error:
                raise PageError(f"{Path(path).name}: {str(error).removeprefix('image: ')}", slots[j]) from None
    if tokenizer is None:
        return
    phrases = [s.phrase for s in job.subjects]
    for j, found in enumerate(phrase_token_positions(tokenizer, job.prompt, phrases, job.phrase_matching)):
        if not found:
            raise PageError(
                f"phrase: {phrases[j]!r} is not in the prompt {job.prompt!r} (or not as often as it is given). "
                "Use the exact words of the prompt as the phrase.",
                slots[j],
            )


def job_to_page(
    data: dict, base_dir: Path | None, allowed_image_dirs: list[Path], models: PageModels
) -> tuple[dict, list[dict], list[str]]:
    """A job file's (or PNG's) fields as page values, validated by `job_from_dict`; and notes for the user.

    The server's `models` stay (a job's base/adapter/encoder are ignored), and their defaults fill
    what the job leaves out. Subject photos are filled in
    only from folders a visitor may see (the package's examples and the page's uploads); others are
    named in the notes, to be uploaded again.
    """
    from msdiffusion.app.jobs import job_from_dict

    data = dict(data)
    notes = []
    raw_subjects = data.get("subjects") if isinstance(data.get("subjects"), list) else []
    originals = []
    placeholder = str(ASSETS / "dog.jpg")  # validate everything else even where a photo is missing here
    checked = []
    for subject in raw_subjects:
        if isinstance(subject, dict) and "image" in subject:
            images = subject["image"] if isinstance(subject["image"], list) else [subject["image"]]
            originals.append(images)
            subject = {**subject, "image": [placeholder] * max(1, len(images))}
        else:
            originals.append([])
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
    job = job_from_dict({**served, **data}, "imported job", base_dir)
    if len(job.subjects) > MAX_SUBJECTS:
        raise UserInputError(f"imported job: {len(job.subjects)} subjects; the page holds up to {MAX_SUBJECTS}.")
    subjects = []
    for i, subject in enumerate(job.subjects):
        images = []
        for image in originals[i]:
            path = Path(str(image)).expanduser()
            path = path if path.is_absolute() or base_dir is None else base_dir / path
            path = path.resolve()
            if path.is_file() and any(path.is_relative_to(d) for d in allowed_image_dirs):
                images.append(str(path))
            else:
                notes.append(
                    f"subject {i + 1}: upload its photo again ({Path(str(image)).name} is not on this server)."
                )
        subjects.append(
            {
                "images": images,
                "phrase": subject.phrase,
                "box": ",".join(f"{v:g}" for v in subject.box) if any(subject.box) else "",
                "scale": "" if subject.scale is None else f"{subject.scale:g}",
            }
        )
    subjects += [{"images": [], "phrase": "", "box": "", "scale": ""}] * (MAX_SUBJECTS - len(subjects))
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
    }
    return settings, subjects, notes


def read_import(path: str) -> tuple[dict, Path]:
    """The raw job of an uploaded YAML/JSON job file or a PNG written by msdiff (and its folder)."""
    from msdiffusion.app.jobs import read_job_file, read_job_from_png

    file = Path(path)
    data = read_job_from_png(file) if file.suffix.lower() == ".png" else read_job_file(file)
    return data, file.parent


def export_yaml(job) -> str:
    """The job as a YAML job file (`msdiff generate job.yaml` runs it), without the server's paths."""
    import yaml

    data = job.to_dict()
    for name in ("output", "device", "dtype"):
        data.pop(name, None)
    return yaml.safe_dump(data, sort_keys=False)


# ---- generation --------------------------------------------------------------------------------
_PIPE_LOCK = threading.Lock()  # one generation at a time (the pipeline's attention state is shared)


def generate_files(job, pipe) -> list[Path]:
    """Run the job with the server's pipeline; `run_job` writes the PNGs (with their job), overlays and masks."""
    from msdiffusion.app.jobs import run_job

    with _PIPE_LOCK:
        return run_job(job, pipe, progress=True, log=lambda *_: None)


def gallery_items(written: list[Path]) -> list[tuple[str, str]]:
    """Gallery entries: each image, then its layout overlay and auto-layout masks, with captions."""
    items = []
    for path in written:
        name = path.stem
        if re.fullmatch(r"msdiff-\d+", name):
            seed = json.loads(_png_text(path)).get("seed")
            items.append((str(path), f"{path.name} (seed {seed})"))
        elif name.endswith("-layout"):
            items.append((str(path), "layout"))
        elif "-mask" in name:
            items.append((str(path), "mask: " + name.split("-mask", 1)[1].split("-", 1)[-1]))
    return items


def _png_text(path: Path) -> str:
    import PIL.Image

    from msdiffusion.app.jobs import PNG_METADATA_KEY

    with PIL.Image.open(path) as image:
        return image.text.get(PNG_METADATA_KEY, "{}")


# ---- the page ----------------------------------------------------------------------------------
CSS = """
#box-canvas { width: 100%; max-width: 512px; display: block; cursor: crosshair; border: 1px solid #a1a1aa; outline: none; }
#box-tools button { margin: 4px 4px 0 0; padding: 2px 8px; border: 1px solid #a1a1aa; border-radius: 4px; }
#box-tools button.active { font-weight: bold; border-width: 2px; }
.field-error p { color: #b91c1c; font-weight: 600; }
"""


def _canvas_html() -> str:
    from msdiffusion.preview import PALETTE

    buttons = "".join(
        f'<button type="button" data-subject="{i}" style="border-color: rgb{PALETTE[i]}; color: rgb{PALETTE[i]}">{i + 1}</button>'
        for i in range(MAX_SUBJECTS)
    )
    return (
        '<div id="box-editor"><canvas id="box-canvas" tabindex="0"></canvas>'
        f'<div id="box-tools">Drawing for: {buttons}<button type="button" data-action="delete">Delete box</button></div>'
        "<p><small>Drag on empty space to draw the selected subject's box; drag a box to move it, "
        "its corners to resize it; Delete removes the selected box. The numbers below follow.</small></p></div>"
    )


def _canvas_js() -> str:
    from msdiffusion.preview import PALETTE

    source = (Path(__file__).resolve().parent / "page_canvas.js").read_text()
    return source.replace("__SUBJECTS__", str(MAX_SUBJECTS)).replace(
        "__PALETTE__", json.dumps([list(c) for c in PALETTE])
    )


def build_page(models: PageModels, pipe=None):
    """The Gradio Blocks of the page, generating with `pipe` (loaded from `models` on first use if None)."""
    import gradio as gr

    defaults = {
        "prompt": "",
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
    pipes: dict = {"pipe": pipe}
    pipe_lock = threading.Lock()

    def get_pipe():
        from msdiffusion.loading import load_pipeline

        with pipe_lock:
            if pipes["pipe"] is None:
                pipes["pipe"] = load_pipeline(models.model_settings())
            return pipes["pipe"]

    upload_dirs = [ASSETS, Path(tempfile.gettempdir()).resolve()]

    with gr.Blocks(title="msdiff ui: MS-Diffusion", analytics_enabled=False) as page:
        gr.Markdown(
            f"## MS-Diffusion: your subjects, where you want them\nModels: `{models.base}` + `{models.adapter}` + "
            f"`{models.image_encoder}`. Upload each subject's photos, name it in the prompt, draw its box."
        )
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(
                    label="Prompt",
                    value=defaults["prompt"],
                    elem_id="prompt",
                    placeholder="a dog and a cat on the beach",
                )
                negative = gr.Textbox(
                    label="Negative prompt", value=defaults["negative_prompt"] or "", elem_id="negative-prompt"
                )
                with gr.Row():
                    preset = gr.Dropdown(
                        ["custom", *SIZE_PRESETS], value="custom", label="Size preset", elem_id="size-preset"
                    )
                    width = gr.Number(label="Width", value=defaults["width"], precision=0, step=8, elem_id="width")
                    height = gr.Number(label="Height", value=defaults["height"], precision=0, step=8, elem_id="height")
                gr.HTML(_canvas_html(), js_on_load=None)
            with gr.Column(scale=2):
                with gr.Row():
                    seed = gr.Number(label="Seed (empty: random)", value=defaults["seed"], precision=0, elem_id="seed")
                    randomise = gr.Button("Randomise", elem_id="randomise", size="sm")
                steps = gr.Slider(1, 100, value=defaults["steps"], step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(1, 20, value=defaults["guidance"], step=0.5, label="Guidance", elem_id="guidance")
                scale = gr.Slider(0, 1.5, value=defaults["scale"], step=0.05, label="Subject scale", elem_id="scale")
                images = gr.Slider(1, 8, value=defaults["images"], step=1, label="Number of images", elem_id="images")
                with gr.Accordion("More", open=False):
                    auto_layout = gr.Checkbox(label="Auto layout", value=False, elem_id="auto-layout")
                    threshold = gr.Slider(
                        0, 0.99, value=defaults["mask_threshold"], step=0.01, label="Auto-layout threshold"
                    )
                    start_step = gr.Slider(1, 50, value=defaults["start_step"], step=1, label="Auto layout from step")
                    drop_grounding = gr.Checkbox(label="Drop grounding tokens", value=False)
                    scheduler = gr.Dropdown(
                        [MODEL_DEFAULT_SCHEDULER, *SCHEDULERS], value=MODEL_DEFAULT_SCHEDULER, label="Scheduler"
                    )
        subject_fields: list[dict] = []
        with gr.Row():
            for i in range(MAX_SUBJECTS):
                with gr.Column(min_width=200):
                    gr.Markdown(f"**Subject {i + 1}**")
                    files = gr.File(
                        label="Photos",
                        file_count="multiple",
                        file_types=["image"],
                        elem_id=f"subject{i}-images",
                        height=120,
                    )
                    phrase = gr.Textbox(label="Phrase (words of the prompt)", elem_id=f"subject{i}-phrase", max_lines=1)
                    box = gr.Textbox(
                        label="Box x0,y0,x1,y1 (0-1; empty: auto layout)", elem_id=f"subject{i}-box", max_lines=1
                    )
                    strength = gr.Textbox(label="Scale (empty: the page's)", elem_id=f"subject{i}-scale", max_lines=1)
                    error = gr.Markdown("", elem_id=f"subject{i}-error", elem_classes="field-error")
                    subject_fields.append(
                        {"images": files, "phrase": phrase, "box": box, "scale": strength, "error": error}
                    )
        with gr.Row():
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            export = gr.Button("Export job (YAML)", elem_id="export")
        page_error = gr.Markdown("", elem_id="page-error", elem_classes="field-error")
        gallery = gr.Gallery(label="Results: image, layout overlay, masks", columns=3, elem_id="results", height="auto")
        with gr.Row():
            downloads = gr.File(
                label="Download (PNGs carry their job: msdiff generate --from)",
                file_count="multiple",
                elem_id="downloads",
            )
            exported = gr.File(label="Job file", elem_id="exported")
            imported = gr.File(
                label="Import a job (YAML/JSON) or a PNG made by msdiff",
                file_types=[".yaml", ".yml", ".json", ".png"],
                elem_id="import",
            )
        import_notes = gr.Markdown("", elem_id="import-notes")

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
        ]
        subject_components = [s[name] for s in subject_fields for name in SUBJECT_FIELDS]
        error_components = [s["error"] for s in subject_fields] + [page_error]

        def split(values: tuple) -> tuple[dict, list[dict]]:
            settings = dict(zip(SETTING_FIELDS, values[: len(SETTING_FIELDS)]))
            rest = values[len(SETTING_FIELDS) :]
            n = len(SUBJECT_FIELDS)
            subjects = [dict(zip(SUBJECT_FIELDS, rest[i * n : (i + 1) * n])) for i in range(MAX_SUBJECTS)]
            return settings, subjects

        def errors(error: PageError | None) -> list:
            shown = [""] * (MAX_SUBJECTS + 1)
            if error is not None:
                shown[MAX_SUBJECTS if error.slot is None else error.slot] = f"⚠ {error}"
            return shown

        def on_generate(*values, progress=gr.Progress(track_tqdm=True)):
            settings, subjects = split(values)
            try:
                output = tempfile.mkdtemp(prefix="msdiff-ui-")  # this request's own folder
                job, slots = page_to_job(settings, subjects, models, output)
                active = get_pipe()
                check_before_work(job, slots, getattr(active, "tokenizer", None))
            except PageError as error:
                return [*errors(error), gr.skip(), gr.skip(), gr.skip()]
            except UserInputError as error:
                return [*errors(PageError(str(error))), gr.skip(), gr.skip(), gr.skip()]
            progress(0, desc="generating")
            try:
                written = generate_files(job, active)
            except Exception as error:  # noqa: BLE001  (the page must stay usable; the message says what failed)
                return [
                    *errors(PageError(f"generation failed: {type(error).__name__}: {error}")),
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                ]
            pngs = [str(p) for p in written if re.fullmatch(r"msdiff-\d+", p.stem)]
            first_seed = json.loads(_png_text(Path(pngs[0]))).get("seed")
            return [*errors(None), gallery_items(written), pngs, first_seed]

        generate.click(
            on_generate,
            setting_components + subject_components,
            error_components + [gallery, downloads, seed],
            api_visibility="private",
            concurrency_limit=1,
            concurrency_id="generate",
        )

        def on_export(*values):
            settings, subjects = split(values)
            try:
                job, _ = page_to_job(settings, subjects, models, tempfile.gettempdir())
            except PageError as error:
                return [*errors(error), gr.skip()]
            folder = Path(tempfile.mkdtemp(prefix="msdiff-ui-job-"))
            path = folder / "job.yaml"
            path.write_text(export_yaml(job))
            return [*errors(None), str(path)]

        export.click(
            on_export, setting_components + subject_components, error_components + [exported], api_visibility="private"
        )

        def on_import(path):
            if not path:
                return [gr.skip()] * (len(setting_components) + len(subject_components)) + [""]
            try:
                data, folder = read_import(path)
                settings, subjects, notes = job_to_page(data, folder, upload_dirs, models)
            except UserInputError as error:
                return [gr.skip()] * (len(setting_components) + len(subject_components)) + [f"⚠ {error}"]
            values = [settings[name] for name in SETTING_FIELDS]
            for subject in subjects:
                values += [subject["images"] or None, subject["phrase"], subject["box"], subject["scale"]]
            return values + ["Imported. " + " ".join(notes)]

        imported.upload(
            on_import, imported, setting_components + subject_components + [import_notes], api_visibility="private"
        )

        def on_preset(choice):
            if choice == "custom":
                return gr.skip(), gr.skip()
            w, h = (int(v) for v in choice.split("x"))
            return w, h

        preset.change(on_preset, preset, [width, height], api_visibility="private")
        randomise.click(lambda: random.randrange(2**31), None, seed, api_visibility="private")

        # The API for other programs (gradio_client): a job (YAML/JSON text) and its subjects' photos.
        api_job = gr.Textbox(visible=False)
        api_images = gr.File(file_count="multiple", visible=False)
        api_out = gr.File(file_count="multiple", visible=False)

        def generate_job(job: str, images: list[str] | None) -> list[str]:
            """Generate a job (YAML or JSON text, as a job file) on the server's models.

            Each subject's `image` names one of the uploaded `images` by file name. Returns the PNGs.
            """
            import yaml

            try:
                data = yaml.safe_load(job)
            except yaml.YAMLError as error:
                raise gr.Error(f"job: not valid YAML/JSON: {error}") from None
            if not isinstance(data, dict):
                raise gr.Error("job: a mapping of fields (prompt, subjects, ...), as a job file.")
            by_name = {Path(p).name: str(p) for p in images or []}
            for i, subject in enumerate(data.get("subjects") or []):
                if not isinstance(subject, dict):
                    continue
                names = subject.get("image") if isinstance(subject.get("image"), list) else [subject.get("image")]
                missing = [n for n in names if str(n) not in by_name]
                if missing:
                    raise gr.Error(f"subjects[{i}].image: {missing} not among the uploaded images {sorted(by_name)}.")
                subject["image"] = [by_name[str(n)] for n in names]
            for name in ("controlnet", "output", "device", "dtype", "variant", "vae", "loras", "cpu_offload"):
                data.pop(name, None)  # the server's models and how they run
            from msdiffusion.app.jobs import JobError, job_from_dict

            try:
                job_spec = job_from_dict(
                    {
                        **data,
                        **{k: v for k, v in models.job_fields().items() if v is not None},
                        "output": tempfile.mkdtemp(prefix="msdiff-api-"),
                    },
                    "job",
                )
                active = get_pipe()
                check_before_work(job_spec, list(range(len(job_spec.subjects))), getattr(active, "tokenizer", None))
            except PageError as error:
                raise gr.Error(f"subjects[{error.slot}]: {error}") from None
            except JobError as error:
                raise gr.Error(str(error)) from None
            written = generate_files(job_spec, active)
            return [str(p) for p in written if re.fullmatch(r"msdiff-\d+", p.stem)]

        gr.Button(visible=False).click(
            generate_job,
            [api_job, api_images],
            api_out,
            api_name="generate_job",
            concurrency_id="generate",
            concurrency_limit=1,
        )
    return page


def launch(page, host: str = "127.0.0.1", port: int | None = None, **kwargs):
    """Queue (one generation at a time) and serve the page."""
    page.queue(default_concurrency_limit=1)
    return page.launch(server_name=host, server_port=port, css=CSS, js=_canvas_js(), **kwargs)


# ---- command -----------------------------------------------------------------------------------
def register(subparsers) -> None:
    ui = subparsers.add_parser(
        "ui",
        help="a web page: upload subjects, draw their boxes, generate (needs the ui extra)",
        description="Serve a Gradio page to draw subjects' boxes and generate. With no model options it serves "
        'the world\'s trained models (what msdiff demo uses). Install with: pip install -e ".[ui]".',
    )
    ui.add_argument("job", nargs="?", help="job file whose models (and prompt, subjects, settings) start the page")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    models = ui.add_argument_group("models (as msdiff generate; default: the world's trained models)")
    models.add_argument("--base", help="SDXL: hub id, diffusers folder, single .safetensors file, or tiny-random")
    models.add_argument("--adapter", help="MS-Diffusion adapter: hub id, ms_adapter.bin, or project folder")
    models.add_argument("--adapter-weight-name", help="file name of the adapter inside a repo or folder")
    models.add_argument("--image-encoder", help="CLIP vision encoder: hub id or folder")
    models.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    models.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    ui.set_defaults(func=run_ui)


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
            for k in ("prompt", "negative_prompt", "size", "seed", "steps", "guidance", "scale", "images", "start_step")
        }
        defaults["negative_prompt"] = defaults["negative_prompt"] or ""
        return PageModels(
            data["base"],
            data["adapter"],
            data["image_encoder"],
            args.adapter_weight_name or data["adapter_weight_name"],
            args.device or data["device"],
            args.dtype or data["dtype"],
            defaults,
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


def run_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserInputError('msdiff ui needs Gradio: pip install -e ".[ui]" (or pip install gradio).') from None
    from msdiffusion.loading import check_models, device_and_dtype, load_pipeline

    models = models_from_args(args)
    settings = models.model_settings()
    adapter = check_models(settings)
    device, dtype = device_and_dtype(models.device, models.dtype)
    print(f"msdiff ui: loading {models.base} + {models.adapter} + {models.image_encoder} on {device} ...", flush=True)
    pipe = load_pipeline(settings, device, dtype, adapter)
    page = build_page(models, pipe)
    launch(page, host=args.host, port=args.port)
    return 0
