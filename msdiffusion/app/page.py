"""`msdiff ui`: a Gradio page where people upload their subjects, draw their boxes and generate.

The page speaks the job format of `msdiffusion.app.jobs`: what it generates is a `Job` validated by
`job_from_dict` and run by `run_job`, so its PNGs carry their job as `msdiff generate` writes them
(with photos by file name: a PNG or exported job never names the server's folders), and its YAML
export and import are job files. The models are the server's (given when it starts).

A picture to start from (`init_image`) makes the page repaint its subjects' regions (`inpaint: subjects`)
or redraw all of it; a subject's region may be painted on the canvas with a brush, which the page writes
as the subject's `mask` image.

This module holds the page (`build_page`, `launch`) and its generation (one at a time, stopped between
two steps when its requester leaves or presses Stop, or runs over `--job-seconds`). What it is built on:
`page_jobs` (page values <-> job), `visitors` (each visitor's files), `regions` (painted regions),
`page_limits` (what a request may ask); the command, with `--auth`, is `page_command`. The page is made
to be shared: README's "Sharing the page", and `visitors`.

Gradio is an optional extra (`pip install -e ".[ui]"`); this module imports it only when building
the page, so that `msdiff --help` works without it.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from msdiffusion.app.page_jobs import (
    DEFAULT_MARGIN,
    MAX_MARGIN,
    MODE_STRENGTH,
    MODEL_DEFAULT_SCHEDULER,
    PICTURE_MODES,
    REPAINT,
    SERVER_FIELDS,
    PageModels,
    check_before_work,
    check_limits,
    export_yaml,
    first_visit,
    fit_to_limits,
    job_to_page,
    model_note,
    picture_files_from_uploads,
    read_import,
    size_presets,
    visitor_job,
)
from msdiffusion.app.page_limits import MAX_GUIDANCE, MAX_SCALE, MAX_SUBJECTS, MAX_TEXT, PageError, PageLimits
from msdiffusion.app.regions import REGION_SIDE, region_of_mask_file
from msdiffusion.app.visitors import ASSETS, VisitorFiles, receive_photos
from msdiffusion.errors import UserInputError

SCHEDULERS = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DDIMScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
)

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
            for name in SERVER_FIELDS:
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
