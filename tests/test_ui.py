"""`msdiff ui`: the page's job mapping, its gradio_client API, the page shared with strangers (its
events called over HTTP as a browser calls them), and the page itself in a real browser.

The HTTP tests serve the page in this process with the tiny random models and small limits, and call
its events with `PageClient`: uploads to /gradio_api/upload, an event joining the queue, its answer on
the session's SSE stream (what the browser does; an event marked private is only hidden from the API
docs). The browser tests start `python -m msdiffusion ui` with the tiny random models on a free port and
drive Debian's Chromium with Playwright (both installed by .ci/run): drawing boxes, generating, downloading
and importing; painting a subject's region on an uploaded picture and repainting it. They skip, saying why,
where either is missing. `MSDIFF_UI_URL` points them at a page already running with the tiny models instead;
`MSDIFF_UI_SCREENSHOT=FILE` saves a screenshot of the page (the README's, with the world models, is
`benchmarks/ui_screenshot.py`'s).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml

from msdiffusion.app.cli import main
from msdiffusion.app.jobs import PNG_METADATA_KEY
from msdiffusion.app.page_jobs import PageModels
from msdiffusion.app.page_limits import PageLimits
from msdiffusion.errors import UserInputError
from msdiffusion.loading import TINY, WORLD

ROOT = Path(__file__).resolve().parents[1]
TINY_MODELS = PageModels(TINY, TINY, TINY)
ASSETS = ROOT / "msdiffusion" / "assets"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TINY_FLAGS = ["--base", TINY, "--adapter", TINY, "--image-encoder", TINY]
# The CPU may be shared with heavy work: every wait is generous (a pass takes well under these).
SLOW_MS = 300_000


def _tiny_models():
    from msdiffusion.app.page_jobs import PageModels

    return PageModels(TINY, TINY, TINY)


def _settings(**changes) -> dict:
    settings = {
        "prompt": "a dog and a cat on the beach",
        "negative_prompt": "",
        "width": 64.0,
        "height": 64.0,
        "seed": 3.0,
        "steps": 2,
        "guidance": 5.0,
        "scale": 0.6,
        "images": 1,
        "auto_layout": False,
        "mask_threshold": 0.5,
        "start_step": 5,
        "drop_grounding": False,
        "scheduler": "(model default)",
        "picture": None,
        "picture_mode": "Repaint the subjects' regions",
        "strength": 1.0,
        "repaint_margin": 0.02,
    }
    settings.update(changes)
    return settings


def _subjects(*entries: dict) -> list[dict]:
    empty = {"images": None, "phrase": "", "box": "", "scale": "", "region": ""}
    return [{**empty, **e} for e in entries] + [empty] * (4 - len(entries))


DOG = {"images": [str(ASSETS / "dog.jpg")], "phrase": "dog", "box": "0.05,0.3,0.45,0.9"}
CAT = {"images": [str(ASSETS / "cat.jpg")], "phrase": "cat", "box": "0.55,0.3,0.95,0.9", "scale": "0.8"}


# ---- the page's values <-> jobs (no Gradio needed) ----------------------------------------------
def test_page_values_become_a_validated_job(tmp_path):
    from msdiffusion.app.page_jobs import page_to_job

    job, slots = page_to_job(_settings(), _subjects(DOG, {}, CAT), _tiny_models(), str(tmp_path))
    assert slots == [0, 2]  # the empty slot is skipped, the others keep their place on the page
    assert [s.phrase for s in job.subjects] == ["dog", "cat"]
    assert job.subjects[1].box == [0.55, 0.3, 0.95, 0.9] and job.subjects[1].scale == 0.8
    assert job.size == [64, 64] and job.seed == 3 and isinstance(job.seed, int) and job.negative_prompt is None
    assert job.base == job.adapter == job.image_encoder == TINY and job.mask_threshold is None


@pytest.mark.parametrize(
    "subject, slot, message",
    [
        ({**CAT, "box": "0.5,0.2,1.4,0.9"}, 1, r"^box: .*outside \[0, 1\]"),
        ({**CAT, "box": "0.5,left,1,0.9"}, 1, r"^box: expected four numbers"),
        ({**CAT, "images": None}, 1, r"^photos: upload at least one photo of this subject"),
        ({**CAT, "phrase": ""}, 1, r"^phrase: expected the words naming the subject"),
        ({**CAT, "scale": "strong"}, 1, r"^scale: got 'strong'; expected a number"),
    ],
)
def test_bad_subject_input_names_the_field_and_its_subject(tmp_path, subject, slot, message):
    from msdiffusion.app.page_jobs import page_to_job
    from msdiffusion.app.page_limits import PageError

    with pytest.raises(PageError, match=message) as caught:
        page_to_job(_settings(), _subjects(DOG, subject), _tiny_models(), str(tmp_path))
    assert caught.value.slot == slot


def test_bad_settings_and_unreadable_photos_and_missing_phrases(tmp_path):
    from msdiffusion.app.page_jobs import check_before_work, page_to_job
    from msdiffusion.app.page_limits import PageError
    from msdiffusion.tiny import tiny_pipeline

    with pytest.raises(PageError, match=r"^size: got \[100, 64\]; expected .*multiples of 8") as caught:
        page_to_job(_settings(width=100.0), _subjects(DOG), _tiny_models(), str(tmp_path))
    assert caught.value.slot is None and caught.value.field == "size"  # shown next to the Width field
    with pytest.raises(PageError, match="add at least one subject"):
        page_to_job(_settings(), _subjects(), _tiny_models(), str(tmp_path))

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    tokenizer = tiny_pipeline(seed=0).tokenizer
    job, slots = page_to_job(
        _settings(), _subjects(DOG, {**CAT, "images": [str(broken)]}), _tiny_models(), str(tmp_path)
    )
    with pytest.raises(PageError, match=r"^broken.jpg: cannot read it as an image; upload a JPEG") as caught:
        check_before_work(job, slots, tokenizer)
    assert caught.value.slot == 1 and str(tmp_path) not in str(caught.value)  # the name, not the server's folder
    job, slots = page_to_job(_settings(prompt="a dog on the beach"), _subjects(DOG, CAT), _tiny_models(), str(tmp_path))
    with pytest.raises(PageError, match=r"^phrase: 'cat' is not in the prompt 'a dog on the beach'") as caught:
        check_before_work(job, slots, tokenizer)
    assert caught.value.slot == 1
    job, slots = page_to_job(_settings(), _subjects(DOG, CAT), _tiny_models(), str(tmp_path))
    check_before_work(job, slots, tokenizer)  # a good page passes


def test_export_then_import_is_the_same_page(tmp_path):
    from msdiffusion.app.page_jobs import export_yaml, job_to_page, page_to_job
    from msdiffusion.app.visitors import EXAMPLE_PHOTOS

    settings = _settings(auto_layout=True, mask_threshold=0.4, scheduler="DDIMScheduler")
    job, _ = page_to_job(settings, _subjects(DOG, CAT), _tiny_models(), str(tmp_path))
    text = export_yaml(job)
    data = yaml.safe_load(text)
    # A portable job: photos by file name, no server folder, only what differs from the defaults (no nulls).
    assert [s["image"] for s in data["subjects"]] == ["dog.jpg", "cat.jpg"] and str(ROOT) not in text
    assert "output" not in data and "null" not in text and "preview" not in data and "dtype" not in data
    assert data["subjects"][1] == {"image": "cat.jpg", "phrase": "cat", "box": [0.55, 0.3, 0.95, 0.9], "scale": 0.8}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(text)
    for name in ("dog.jpg", "cat.jpg"):  # the photos beside the job, as whoever runs it has them
        shutil.copy(ASSETS / name, tmp_path / name)
    assert main(["generate", str(job_file), "--steps", "1", "--output", str(tmp_path / "out"), "--quiet"]) == 0

    examples = {name: str(path) for name, path in EXAMPLE_PHOTOS.items()}
    page_settings, subjects, notes = job_to_page(data, examples.get, TINY_MODELS)
    assert notes == []
    assert page_settings == {**settings, "seed": 3, "negative_prompt": ""}
    assert subjects[0] == {
        "images": [str(ASSETS / "dog.jpg")],
        "phrase": "dog",
        "box": "0.05,0.3,0.45,0.9",
        "scale": "",
        "region": "",
    }
    assert subjects[1]["scale"] == "0.8" and subjects[2] == subjects[3] == {
        "images": [],
        "phrase": "",
        "box": "",
        "scale": "",
        "region": "",
    }
    # Photos the visitor does not have are not filled in: the notes ask for them.
    _, subjects, notes = job_to_page(data, lambda name: None, TINY_MODELS)
    assert subjects[0]["images"] == [] and notes[0].startswith("subject 1: upload 'dog.jpg'")


def test_import_refuses_a_bad_job_with_the_job_files_message(tmp_path):
    from msdiffusion.app.jobs import JobError
    from msdiffusion.app.page_jobs import job_to_page

    with pytest.raises(JobError, match=r"imported job: subjects\[0\]: unknown field 'bx' \(did you mean 'box'\?\)"):
        job_to_page(
            {"prompt": "a dog", "subjects": [{"image": "dog.jpg", "phrase": "dog", "bx": [0, 0, 1, 1]}]},
            lambda name: None,
            TINY_MODELS,
        )


# ---- a picture to work on and painted regions (no Gradio needed) ---------------------------------------
def _region_url(region: np.ndarray, mode: str = "RGBA") -> str:
    """A region as the canvas sends it: a PNG data URL, opaque where painted (or, `L`, white on black)."""
    if mode == "RGBA":
        pixels = np.zeros((*region.shape, 4), np.uint8)
        pixels[region] = 255
    else:
        pixels = region.astype(np.uint8) * 255
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _noise_picture(path: Path, size: tuple[int, int] = (130, 100)) -> Path:
    """A picture of random pixels (its output: its size rounded down to multiples of 8)."""
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_a_picture_is_checked_and_fitted_to_the_size_limit(tmp_path):
    from msdiffusion.app.page_limits import PageError
    from msdiffusion.app.visitors import VisitorFiles, fitted_picture_size

    assert fitted_picture_size(3000, 2000, 1536) == (1536, 1024)
    assert fitted_picture_size(1000, 750, 1536) == (1000, 744)  # within the limit: the pipelines' rounding only
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    files = VisitorFiles(3600, sources=[uploads, ASSETS])
    try:
        large = uploads / "large.jpg"
        PIL.Image.new("RGB", (3000, 2000), (200, 40, 40)).save(large, quality=90)
        assert PIL.Image.open(files.receive_picture("ann", large, PageLimits())).size == (1536, 1024)
        assert PIL.Image.open(files.receive_picture("bob", large, PageLimits(max_size=500))).size == (496, 328)
        room = _noise_picture(uploads / "room.png")
        assert Path(files.receive_picture("ann", room, PageLimits())).read_bytes() == room.read_bytes()  # as sent
        assert files.find("ann", "room.png") == str(room)  # an imported job may name it
        huge = uploads / "huge.png"
        PIL.Image.new("1", (10000, 10000)).save(huge)
        with pytest.raises(
            PageError, match=r"^huge.png: 10000x10000 pixels; this server takes pictures up to 40 "
        ) as caught:
            files.receive_picture("ann", huge, PageLimits())
        assert caught.value.field == "picture" and caught.value.slot is None
        narrow = uploads / "narrow.png"
        PIL.Image.new("RGB", (3000, 100)).save(narrow)
        with pytest.raises(
            PageError, match=r"^narrow.png: 3000x100 pixels would be 1536x48 here .* below 64 on a side"
        ):
            files.receive_picture("ann", narrow, PageLimits())
        small = uploads / "small.png"
        PIL.Image.new("RGB", (70, 60)).save(small)
        with pytest.raises(PageError, match=r"^small.png: 70x60 pixels, below 64 on a side .*: upload a larger one"):
            files.receive_picture("ann", small, PageLimits())
        # A phone photo stored sideways (EXIF orientation 6) is measured and shrunk as it is shown.
        turned = uploads / "turned.jpg"
        exif = PIL.Image.Exif()
        exif[0x0112] = 6
        PIL.Image.new("RGB", (3000, 2000), (200, 40, 40)).save(turned, exif=exif, quality=90)
        stored = PIL.Image.open(files.receive_picture("ann", turned, PageLimits()))
        assert stored.size == (1024, 1536) and stored.getexif().get(0x0112) is None
        outside = tmp_path / "secret.png"  # anywhere but the upload folder and the examples
        PIL.Image.new("RGB", (80, 80)).save(outside)
        with pytest.raises(PageError, match=r"^secret.png: not a picture uploaded to this page"):
            files.receive_picture("ann", outside, PageLimits())
    finally:
        files.close()


def test_a_painted_region_is_decoded_strictly_and_written_at_the_outputs_size(tmp_path):
    from msdiffusion.app.page_limits import PageError
    from msdiffusion.app.regions import MAX_REGION_BYTES, decode_region, region_data_url, write_region

    region = np.zeros((48, 64), bool)
    region[10:30, 5:25] = True
    np.testing.assert_array_equal(decode_region(_region_url(region), 0), region)
    np.testing.assert_array_equal(decode_region(_region_url(region, "L"), 0), region)  # white on black too
    np.testing.assert_array_equal(decode_region(region_data_url(region), 0), region)  # what an import fills in
    assert decode_region("", 0) is None and decode_region(None, 0) is None
    jpeg, wide, bomb = io.BytesIO(), io.BytesIO(), io.BytesIO()
    PIL.Image.new("RGB", (8, 8), "white").save(jpeg, format="JPEG")
    PIL.Image.new("1", (4096, 8), 1).save(wide, format="PNG")
    PIL.Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400 megapixels in a few kB
    as_url = lambda data: "data:image/png;base64," + base64.b64encode(data).decode()  # noqa: E731
    for text, message in (
        ("/etc/hostname", "not a painted region"),
        ("data:image/png;base64,@@@@", "not base64"),
        (as_url(jpeg.getvalue()), "not a PNG the page can read"),
        (as_url(b"\x89PNG\r\n\x1a\n" + b"x" * 20), "not a PNG the page can read"),
        (as_url(wide.getvalue()), r"4096x8 pixels; a painted region is at most 1024 a side"),
        (as_url(bomb.getvalue()), r"over 1024 pixels a side; a painted region is at most that"),
        ("data:image/png;base64," + "A" * (MAX_REGION_BYTES * 2), r"characters; a painted region is at most 2 MB"),
        (_region_url(np.zeros((8, 8), bool)), "nothing is painted"),
    ):
        with pytest.raises(PageError, match=message) as caught:
            decode_region(text, 2)
        # One short line, tied to the subject, that repeats nothing of what was sent.
        assert caught.value.slot == 2 and str(caught.value).startswith("region: ") and "\n" not in str(caught.value)
        assert len(str(caught.value)) < 120, str(caught.value)

    path = Path(write_region(region, (128, 96), tmp_path, "Dog's toy"))
    assert re.fullmatch(r"region-dog-s-toy-[0-9a-f]{12}\.png", path.name), path.name
    written = np.asarray(PIL.Image.open(path))
    assert written.shape == (96, 128) and set(np.unique(written)) == {0, 255}
    np.testing.assert_array_equal(written[::2, ::2] == 255, region)  # stretched over the output
    assert write_region(np.eye(64, dtype=bool)[:48], (8, 8), tmp_path, "dog") is None  # nothing left at that size


def test_a_picture_and_a_painted_region_make_an_inpainting_job_that_exports_and_imports(tmp_path):
    from msdiffusion.app.page_jobs import REDRAW, REPAINT, export_yaml, job_to_page, page_to_job
    from msdiffusion.app.page_limits import PageError
    from msdiffusion.app.regions import decode_region, region_of_mask_file, regions_to_masks

    room = _noise_picture(tmp_path / "room.png")  # the output: 128x96
    region = np.zeros((48, 64), bool)
    region[10:30, 5:25] = True
    subjects = regions_to_masks(
        _subjects({**DOG, "box": "", "region": _region_url(region)}, CAT), (128, 96), tmp_path / "regions"
    )
    assert Path(subjects[0]["mask"]).parent == tmp_path / "regions" and "mask" not in subjects[1]
    settings = _settings(picture=str(room), strength=0.8, repaint_margin=0.05)
    job, _ = page_to_job(settings, subjects, _tiny_models(), str(tmp_path / "out"))
    assert job.task == "inpainting" and job.init_image == str(room) and job.inpaint == "subjects"
    assert job.size == [128, 96]  # the picture's, not the page's 64x64
    assert job.strength == 0.8 and job.repaint_margin == 0.05
    assert job.subjects[0].mask == subjects[0]["mask"] and not any(job.subjects[0].box)
    redraw, _ = page_to_job({**settings, "picture_mode": REDRAW}, subjects, _tiny_models(), str(tmp_path))
    assert redraw.task == "image-to-image" and redraw.repaint_margin is None and redraw.strength == 0.8
    with pytest.raises(PageError, match=r"needs a subject's box or painted region") as caught:
        page_to_job(settings, _subjects({**DOG, "box": ""}), _tiny_models(), str(tmp_path))
    assert caught.value.field == "picture"
    with pytest.raises(PageError, match=r"^strength: strength 0.3 of steps 2 leaves no denoising step") as caught:
        page_to_job({**settings, "strength": 0.3}, subjects, _tiny_models(), str(tmp_path))
    assert caught.value.field == "picture"  # shown under the picture

    # Exported, the job names the picture and the region's mask by file name; imported by the same visitor,
    # both are found among theirs.
    text = export_yaml(job)
    data = yaml.safe_load(text)
    mask_name = Path(subjects[0]["mask"]).name
    assert data["init_image"] == "room.png" and data["inpaint"] == "subjects" and str(tmp_path) not in text
    assert data["subjects"][0] == {"image": "dog.jpg", "phrase": "dog", "mask": mask_name}
    mine = {"room.png": str(room), "dog.jpg": str(ASSETS / "dog.jpg"), "cat.jpg": str(ASSETS / "cat.jpg")}
    painted = {mask_name: region_of_mask_file(subjects[0]["mask"])}
    page_settings, page_subjects, notes = job_to_page(data, mine.get, TINY_MODELS, painted.get)
    assert notes == []
    assert {k: page_settings[k] for k in ("picture", "picture_mode", "strength", "repaint_margin")} == {
        "picture": str(room),
        "picture_mode": REPAINT,
        "strength": 0.8,
        "repaint_margin": 0.05,
    }
    np.testing.assert_array_equal(decode_region(page_subjects[0]["region"], 0)[::2, ::2], region)

    # Another visitor has neither: the notes say what to upload and paint; what the page cannot show is named,
    # and a polygon mask is painted in as the subject's region.
    data["subjects"][1]["mask"] = [[0.5, 0.25], [1, 0.25], [1, 1]]
    data.update(inpaint="sofa-mask.png", keep_outside=False)
    page_settings, page_subjects, notes = job_to_page(data, lambda name: None, TINY_MODELS)
    assert page_settings["picture"] is None and page_settings["picture_mode"] == REPAINT
    assert page_subjects[0]["region"] == ""
    for said in (
        "upload 'room.png' as the picture to work on",
        f"subject 1: paint its region again (its mask '{mask_name}' is not among yours)",
        "inpaint: 'sofa-mask.png' (a mask of the picture) is left out",
        "keep_outside: left out",
    ):
        assert any(note.startswith(said) for note in notes), (said, notes)
    polygon = decode_region(page_subjects[1]["region"], 1)
    assert polygon.shape == (96, 128) and polygon[30, 120] and not polygon[10, 10] and not polygon[90, 70]
    # An imported redraw without a strength gets the pipeline's default, which the job meant.
    del data["inpaint"], data["keep_outside"], data["repaint_margin"], data["strength"]
    data["steps"] = 10  # int(2 * 0.3) would leave no step: refused, as the job itself would be
    page_settings, _, _ = job_to_page(data, mine.get, TINY_MODELS)
    assert page_settings["picture_mode"] == REDRAW and page_settings["strength"] == 0.3
    page_settings, _, _ = job_to_page({**data, "inpaint": "subjects"}, mine.get, TINY_MODELS)
    assert page_settings["picture_mode"] == REPAINT and page_settings["strength"] == 0.9999


def test_ui_command_needs_gradio_or_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    assert main(["ui", *TINY_FLAGS]) == 2
    assert 'pip install -e ".[ui]"' in capsys.readouterr().err


# ---- jobs: every problem at once, short messages, syntax errors by file and line -------------------
def test_a_job_lists_all_its_problems_at_once(tmp_path):
    from msdiffusion.app.jobs import JobError, job_from_dict

    job = {
        "base": TINY,
        "adapter": TINY,
        "prompt": "a dog",
        "sed": 3,
        "steps": "many",
        "subjects": [{"image": str(ASSETS / "dog.jpg"), "phrase": "dog", "bx": [0, 0, 1, 1]}],
    }
    with pytest.raises(JobError) as caught:
        job_from_dict(job, "job.yaml")
    message = str(caught.value)
    assert message.startswith("job.yaml: 3 problems:\n"), message
    assert "unknown field 'sed' (did you mean 'seed'?)" in message and "steps: got 'many'" in message
    assert "subjects[0]: unknown field 'bx' (did you mean 'box'?)" in message
    assert caught.value.problems[0].startswith("unknown field 'sed'")  # each problem without the file's name


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    from msdiffusion.app.jobs import JobError, read_job_file

    job_file = tmp_path / "broken.yaml"
    job_file.write_text("prompt: a dog\nsubjects:\n  - {image: dog.jpg, phrase: dog\nsteps: 3\n")
    with pytest.raises(JobError) as caught:
        read_job_file(job_file)
    message = str(caught.value)
    assert (
        message.startswith(f"{job_file}: not valid YAML/JSON at line 4, column ") and "<unicode string>" not in message
    )


# A 9-fold YAML alias chain inside one field: about 330 bytes that expand to 9**7 (4.8 million) values.
ALIAS_BOMB = (
    "prompt:\n  - &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"  - &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdef", "bcdefg"))
    + "subjects: [{image: dog.jpg, phrase: dog}]\n"
)


def test_an_alias_bomb_is_refused_at_once_with_a_short_message():
    from msdiffusion.app.jobs import JobError, parse_job_text, quote

    assert len(ALIAS_BOMB) < 400, len(ALIAS_BOMB)
    started = time.monotonic()
    with pytest.raises(JobError, match="more than 10000 values") as caught:
        parse_job_text(ALIAS_BOMB, "job")
    assert time.monotonic() - started < 2 and len(str(caught.value)) < 300
    assert len(quote(list(range(10**6)))) <= 60 and len(quote("x" * 10**6)) <= 60  # messages quote a prefix
    with pytest.raises(JobError, match="at most 64 KiB"):
        parse_job_text("prompt: " + "x" * 70_000, "job")


# ---- the scheduler a page or job names is the one that runs ------------------------------------------
def test_a_jobs_scheduler_is_used_with_a_loaded_pipeline_and_put_back(tmp_path):
    from msdiffusion.app.jobs import job_from_dict, run_job
    from msdiffusion.tiny import tiny_pipeline

    job = {
        "base": TINY,
        "adapter": TINY,
        "image_encoder": TINY,
        "prompt": "a dog on the beach",
        "subjects": [{"image": str(ASSETS / "dog.jpg"), "phrase": "dog", "box": [0.1, 0.2, 0.6, 0.9]}],
        "size": 64,
        "steps": 3,
        "seed": 1,
        "scheduler": "DDIMScheduler",
        "preview": False,
    }
    pipe = tiny_pipeline(seed=0)
    own = pipe.scheduler
    served = run_job(job_from_dict({**job, "output": str(tmp_path / "served")}), pipe, progress=False, log=print)
    assert pipe.scheduler is own and type(own).__name__ != "DDIMScheduler"
    # What `msdiff generate --from` does with the PNG: load the models with the recorded scheduler.
    fresh = run_job(job_from_dict({**job, "output": str(tmp_path / "fresh")}), progress=False, log=print)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(served[0])), np.asarray(PIL.Image.open(fresh[0])))


# ---- the first visit ----------------------------------------------------------------------------------
def test_the_world_page_opens_with_a_working_example_and_its_sizes():
    pytest.importorskip("gradio", reason='the ui extra is not installed (pip install -e ".[ui]")')
    from msdiffusion.app.commands import WORLD_DEMO_PROMPT, WORLD_DEMO_SUBJECTS
    from msdiffusion.app.page import build_page
    from msdiffusion.app.page_jobs import model_note, size_presets
    from msdiffusion.loading import NAMED_MODELS
    from msdiffusion.world.scenes import CLASSES

    world = PageModels(WORLD, WORLD, WORLD, defaults=dict(NAMED_MODELS[WORLD].defaults))
    assert size_presets(world, PageLimits()) == ["64x64"]
    assert size_presets(TINY_MODELS, PageLimits())[0] == "1024x1024"  # SDXL's own first
    assert all(shape in model_note(world) for shape in CLASSES)
    page = build_page(world, pipe=object())
    try:
        values = {b.elem_id: getattr(b, "value", None) for b in page.blocks.values() if getattr(b, "elem_id", None)}
        assert values["prompt"] == WORLD_DEMO_PROMPT and values["size-preset"] == "64x64"
        assert (values["width"], values["height"]) == (64, 64)
        for slot, (image, phrase, box) in enumerate(WORLD_DEMO_SUBJECTS):
            assert values[f"subject{slot}-phrase"] == phrase
            assert values[f"subject{slot}-box"] == ",".join(f"{v:g}" for v in box)
            assert [Path(f["path"]).name for f in values[f"subject{slot}-images"]] == [Path(image).name]
    finally:
        page.visitor_files.close()


# ---- limits, files and stopping, without a server ------------------------------------------------------
def test_photos_are_checked_and_shrunk_on_receipt(tmp_path):
    from msdiffusion.app.page_limits import PageError
    from msdiffusion.app.visitors import VisitorFiles

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    files = VisitorFiles(3600, sources=[uploads, ASSETS])
    try:
        large = uploads / "large.jpg"
        PIL.Image.new("RGB", (3000, 2000), (200, 40, 40)).save(large, quality=90)
        small = PIL.Image.open(files.receive("ann", large, PageLimits()))
        assert max(small.size) == 1024 and small.size[0] / small.size[1] == pytest.approx(1.5, abs=0.01)
        cutout = uploads / "cutout.png"  # a large cut-out, white kept under its transparent pixels
        PIL.Image.new("RGBA", (2048, 1024), (255, 255, 255, 0)).save(cutout)
        shrunk = PIL.Image.open(files.receive("ann", cutout, PageLimits()))
        assert shrunk.size == (1024, 512) and shrunk.getpixel((5, 5))[:3] == (0, 0, 0)  # as load_image reads it
        same = files.receive("ann", ASSETS / "dog.jpg", PageLimits())  # within 1024: kept as it is
        assert Path(same).read_bytes() == (ASSETS / "dog.jpg").read_bytes()
        # A huge photo is refused from its header: nothing is decoded.
        huge = uploads / "huge.png"
        PIL.Image.new("1", (10000, 10000)).save(huge)
        with pytest.raises(PageError, match=r"^huge.png: 10000x10000 pixels; .* up to 40 megapixels") as caught:
            files.receive("ann", huge, PageLimits(), slot=2)
        assert caught.value.slot == 2
        outside = tmp_path / "secret.png"  # anywhere but the upload folder and the examples
        PIL.Image.new("RGB", (8, 8)).save(outside)
        with pytest.raises(PageError, match=r"^secret.png: not a photo uploaded to this page"):
            files.receive("ann", outside, PageLimits())
        assert files.find("ann", "large.jpg") == str(large) and files.find("bob", "large.jpg") is None
        assert files.find("bob", "dog.jpg") == str(ASSETS / "dog.jpg")  # the package's examples are everyone's
    finally:
        files.close()


def test_visitors_files_go_when_they_leave_or_grow_old(tmp_path):
    from msdiffusion.app.visitors import VisitorFiles

    uploads = tmp_path / "uploads"
    (uploads / "h1").mkdir(parents=True)
    photo = uploads / "h1" / "mine.jpg"
    shutil.copy(ASSETS / "dog.jpg", photo)
    files = VisitorFiles(3600, sources=[uploads])
    try:
        files.receive("ann", photo, PageLimits())
        (files.results("bob") / "msdiff-00001.png").parent.mkdir(parents=True)
        (files.results("bob") / "msdiff-00001.png").write_bytes(b"png")
        assert files.folder("ann").is_dir() and files.folder("bob").is_dir()
        files.forget("ann")  # ann closed her page
        assert not files.folder("ann").exists() and not photo.exists()  # her upload, sent by her alone, too
        assert files.sweep() == [] and files.folder("bob").is_dir()
        assert files.sweep(now=time.time() + 2 * 3600) == ["bob"] and not files.folder("bob").exists()
    finally:
        files.close()
    assert not files.root.exists()


def test_a_generation_stops_between_steps_when_over_its_time(tmp_path):
    from msdiffusion.app.jobs import job_from_dict
    from msdiffusion.app.page import Stopped, generate_files, watch
    from msdiffusion.tiny import tiny_pipeline

    job = job_from_dict(
        {
            "base": TINY,
            "adapter": TINY,
            "image_encoder": TINY,
            "prompt": "a dog",
            "subjects": [{"image": str(ASSETS / "dog.jpg"), "phrase": "dog", "box": [0.1, 0.1, 0.9, 0.9]}],
            "size": 64,
            "steps": 500,
            "output": str(tmp_path),
        }
    )
    started = time.monotonic()
    with pytest.raises(Stopped, match=r"stopped after 0.5 s: .*--job-seconds"):
        generate_files(job, tiny_pipeline(seed=0), watch(None, "ann", PageLimits(job_seconds=0.5), {}))
    assert time.monotonic() - started < 60 and not list(tmp_path.glob("msdiff-*.png"))


# ---- who may use it ---------------------------------------------------------------------------------
def test_ui_options_are_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["ui", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--auth USER:PASS",
        "--auth-file",
        "--max-size",
        "--max-steps",
        "--max-images",
        "--max-photos",
        "--max-upload-mb",
        "--max-megapixels",
        "--queue-size",
        "--job-seconds",
        "--keep-minutes",
    ):
        assert option in text, option


def test_auth_logins_and_the_warning_beyond_loopback(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gradio", reason='the ui extra is not installed (pip install -e ".[ui]")')
    from msdiffusion.app import page_command

    logins = tmp_path / "logins"
    logins.write_text("# who may use the page\nann:s3cret:with-colon\n\nbob:pw\n")
    assert page_command.read_auth(["eve:pass"], str(logins)) == [
        ("eve", "pass"),
        ("ann", "s3cret:with-colon"),
        ("bob", "pw"),
    ]
    assert page_command.read_auth(None, None) is None
    with pytest.raises(UserInputError, match=r"^--auth: expected USER:PASS") as caught:
        page_command.read_auth(["hunter2"], None)
    assert "hunter2" not in str(caught.value)  # never repeats what may be a password

    launched = {}
    monkeypatch.setattr(page_command, "launch", lambda page, **kwargs: launched.update(kwargs, page=page))
    assert main(["ui", *TINY_FLAGS, "--host", "0.0.0.0", "--max-steps", "12"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0 without --auth" in err
    assert launched["auth"] is None and launched["page"].page_limits.max_steps == 12
    assert main(["ui", *TINY_FLAGS, "--host", "0.0.0.0", "--auth", "ann:pw"]) == 0
    assert "warning" not in capsys.readouterr().err and launched["auth"] == [("ann", "pw")]
    assert main(["ui", *TINY_FLAGS]) == 0 and "warning" not in capsys.readouterr().err  # loopback


# ---- the page shared: its events called over HTTP as a browser calls them ----------------------------
class PageClient:
    """One visitor calling the page's events over HTTP the way its browser does: files are posted to
    /gradio_api/upload, an event joins the queue (/gradio_api/queue/join, found by name in /config)
    and its answer comes on the session's SSE stream (/gradio_api/queue/data)."""

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120)
        self.session = uuid.uuid4().hex
        config = self.http.get("config").json()
        self.components = {c["id"]: c.get("props", {}) for c in config["components"]}
        self.events = {d["api_name"]: d for d in config["dependencies"]}

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            answer = self.http.post("gradio_api/upload", files={"files": (Path(path).name, f)})
        answer.raise_for_status()
        return {"path": answer.json()[0], "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}

    def inputs(self, event: str, **values) -> list:
        """The event's inputs: each component's value on the page as it opens, or `values[elem_id]` (- as _)."""
        data = []
        for i in self.events[event]["inputs"]:
            props = self.components[i]
            key = (props.get("elem_id") or "").replace("-", "_")
            data.append(values.pop(key) if key in values else props.get("value"))
        assert not values, f"{event} has no inputs {list(values)}"
        return data

    def join(self, event: str, data: list):
        dependency = self.events[event]
        trigger = dependency["targets"][0][0] if dependency["targets"] else None
        return self.http.post(
            "gradio_api/queue/join",
            json={
                "data": data,
                "fn_index": dependency["id"],
                "session_hash": self.session,
                "event_data": None,
                "trigger_id": trigger,
            },
        )

    def run(self, event: str, data: list) -> dict:
        """An event that skips the queue, posted as the browser posts it; its output."""
        dependency = self.events[event]
        answer = self.http.post(
            "gradio_api/run/predict",
            json={"data": data, "fn_index": dependency["id"], "session_hash": self.session, "event_data": None},
        )
        answer.raise_for_status()
        return answer.json()

    def messages(self):
        """The session's stream, message by message (closing the generator closes the connection)."""
        with self.http.stream("GET", "gradio_api/queue/data", params={"session_hash": self.session}) as answer:
            for line in answer.iter_lines():
                if line.startswith("data:"):
                    yield json.loads(line[5:])

    def call(self, event: str, data: list) -> dict:
        """Join, then wait for the event's end: its `output` ({data} or {error})."""
        self.join(event, data).raise_for_status()
        for message in self.messages():
            if message["msg"] == "process_completed":
                return message["output"]
        raise AssertionError("the stream ended without an answer")

    def generate(self, **values) -> dict:
        """The page's Generate: what it shows, by place (subject0..3, size and picture: their messages; status,
        results, downloads)."""
        return self.shown("on_generate", self.call("on_generate", self.inputs("on_generate", **values))["data"])

    def shown(self, event: str, data: list) -> dict:
        """An event's outputs by place (elem_id, a message without its -error)."""
        outputs = self.events[event]["outputs"]
        return {(self.components[i].get("elem_id") or "").removesuffix("-error"): v for i, v in zip(outputs, data)}


SERVED_LIMITS = PageLimits(
    max_size=256, max_steps=5000, max_images=2, max_photos=2, max_upload_mb=1, max_megapixels=4, queue_size=1
)
SMALL = {"width": 64, "height": 64, "steps": 2}
LONG = {"width": 64, "height": 64, "steps": 5000}  # minutes: it ends only by being stopped


def _dog_and_cat(client: "PageClient", **changes) -> dict:
    """Every input of a dog-and-cat page, given (not left to the page's opening example)."""
    return {
        "prompt": "a dog and a cat on the beach",
        "subject0_images": [client.upload(ASSETS / "dog.jpg")],
        "subject0_phrase": "dog",
        "subject0_box": "0.05,0.3,0.45,0.9",
        "subject1_images": [client.upload(ASSETS / "cat.jpg")],
        "subject1_phrase": "cat",
        "subject1_box": "0.55,0.3,0.95,0.9",
        **changes,
    }


@pytest.fixture(scope="module")
def served():
    """The page with the tiny models on a free port of 127.0.0.1, in this process: (page, url)."""
    pytest.importorskip("gradio", reason='the ui extra is not installed (pip install -e ".[ui]")')
    pytest.importorskip("httpx")
    from msdiffusion.app.page import build_page, launch
    from msdiffusion.tiny import tiny_pipeline

    page = build_page(_tiny_models(), tiny_pipeline(seed=0), SERVED_LIMITS)
    _, url, _ = launch(page, port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield page, url
    finally:
        page.close()
        page.visitor_files.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_photo(folder: Path, name: str) -> Path:
    """A visitor's own photo (not one of the package's examples, which every visitor may use)."""
    path = folder / name
    PIL.Image.open(ASSETS / "dog.jpg").rotate(90).save(path)
    return path


def _png_record(client: PageClient, download: dict) -> tuple[dict, bytes]:
    answer = client.http.get(download["url"])
    answer.raise_for_status()
    import io

    return json.loads(PIL.Image.open(io.BytesIO(answer.content)).text[PNG_METADATA_KEY]), answer.content


def _import(client: PageClient, path: Path) -> dict:
    """The page's Import: the values it fills in, by elem_id (with - as _), and its status line."""
    event = client.events["on_import"]
    data = client.call("on_import", client.inputs("on_import", **{"import": client.upload(path)}))["data"]
    names = [(client.components[i].get("elem_id") or str(i)).replace("-", "_") for i in event["outputs"]]
    return dict(zip(names, data))


@pytest.mark.slow
def test_an_import_never_fills_in_a_file_of_the_server(served, tmp_path):
    from gradio.utils import get_upload_folder

    page, url = served
    secret = Path(tempfile.mkdtemp(prefix="secrets-", dir=tempfile.gettempdir())) / "app.env"
    secret.write_text("API_KEY=hunter2\n")
    try:
        # The upload lands in <upload folder>/<hash>/job.yaml: this climbs from there to the secret.
        relative = "../" + os.path.relpath(secret, get_upload_folder())
        for image in (str(secret), relative):
            job = tmp_path / "job.yaml"
            job.write_text(yaml.safe_dump({"prompt": "a dog", "subjects": [{"image": image, "phrase": "dog"}]}))
            filled = _import(PageClient(url), job)
            assert filled["subject0_images"] is None, filled["subject0_images"]
            assert "upload 'app.env'" in filled["status"] and filled["subject0_phrase"] == "dog"
    finally:
        shutil.rmtree(secret.parent)


@pytest.mark.slow
def test_a_pngs_job_names_no_server_path_and_opens_no_one_elses_photos(served, tmp_path):
    page, url = served
    ann, bob = PageClient(url), PageClient(url)
    photo = ann.upload(_private_photo(tmp_path, "ann-private.png"))
    made = ann.generate(
        **SMALL,
        prompt="a dog and a cat on the beach",
        subject0_images=[photo],
        subject0_phrase="dog",
        subject0_box="0.05,0.3,0.45,0.9",
        subject1_images=[ann.upload(ASSETS / "cat.jpg")],
        subject1_phrase="cat",
        subject1_box="0.55,0.3,0.95,0.9",
    )
    assert made["downloads"], made
    record, png = _png_record(ann, made["downloads"][0])
    text = json.dumps(record)
    assert record["subjects"][0]["image"] == "ann-private.png" and record["subjects"][1]["image"] == "cat.jpg"
    assert "output" not in record and tempfile.gettempdir() not in text and str(ROOT) not in text
    (tmp_path / "made.png").write_bytes(png)

    # Bob holds Ann's PNG: importing it fills in its settings, never Ann's photo.
    filled = _import(bob, tmp_path / "made.png")
    assert filled["subject0_images"] is None and "upload 'ann-private.png'" in filled["status"]
    assert filled["subject1_images"] is not None  # cat.jpg: the package's example, everyone's
    # Nor does a job naming Ann's files on the server by their paths.
    sheet = next(page.visitor_files.results(ann.session).glob("*-sheet.png"))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"prompt": "a dog", "subjects": [{"image": str(sheet), "phrase": "dog"}]}))
    assert _import(bob, job)["subject0_images"] is None
    # Ann herself gets her photo back: she sent it in this visit.
    assert [Path(f["path"]).name for f in _import(ann, tmp_path / "made.png")["subject0_images"]] == ["ann-private.png"]


@pytest.mark.slow
def test_requests_are_held_to_the_servers_limits(served, tmp_path):
    page, url = served
    client = PageClient(url)
    dog = client.upload(ASSETS / "dog.jpg")
    refused = client.generate(width=16384, height=64, steps=2)
    assert "--max-size" in refused["size"] and "see the size" in refused["status"]
    job = {"prompt": "a dog", "subjects": [{"image": "dog.jpg", "phrase": "dog"}], "size": 64, "steps": 2}
    for change, message in (
        ({"steps": 10**9}, "--max-steps"),
        ({"images": 100000}, "--max-images"),
        ({"size": 16384}, "--max-size"),
        ({"size": [1000000, 64]}, "--max-size"),
        ({"start_step": 10**6}, "--max-steps"),
        ({"guidance": 1e30}, "guidance: 1e+30 is more than the page allows"),
        ({"subjects": [{"image": ["dog.jpg"] * 3, "phrase": "dog"}]}, "--max-photos"),
    ):
        answer = client.call("generate_job", [yaml.safe_dump({**job, **change}), [dog]])
        assert message in (answer.get("error") or ""), (change, answer)
    # A photo of too many pixels is refused from its header, before it costs memory.
    huge = tmp_path / "huge.png"
    PIL.Image.new("1", (10000, 10000)).save(huge)
    before = _rss_mb()
    refused = client.generate(**SMALL, subject0_images=[client.upload(huge)] * 2)
    assert "huge.png: 10000x10000 pixels" in refused["subject0"] and "--max-megapixels" in refused["subject0"]
    assert _rss_mb() - before < 150
    refused = client.generate(**SMALL, subject0_images=[dog] * 3)
    assert "--max-photos" in refused["subject0"]


def _rss_mb() -> float:
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0.0
    return int(re.search(r"VmRSS:\s+(\d+)", status.read_text()).group(1)) / 1024


@pytest.mark.slow
def test_a_job_of_nested_aliases_gets_a_short_answer_at_once(served):
    page, url = served
    client = PageClient(url)
    started = time.monotonic()
    answer = client.call("generate_job", [ALIAS_BOMB, [client.upload(ASSETS / "dog.jpg")]])
    assert "more than 10000 values" in answer["error"] and len(answer["error"]) < 300
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_uploads_are_capped_and_a_refused_request_leaves_no_files(served, tmp_path):
    page, url = served
    client = PageClient(url)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * 1024 * 1024))
    answer = client.http.post("gradio_api/upload", files={"files": ("big.bin", big.read_bytes())})
    assert answer.status_code == 413
    before = sorted(Path(tempfile.gettempdir()).glob("msdiff-ui-*")), sorted(page.visitor_files.root.iterdir())
    refused = client.generate(width=100, height=64, steps=2)
    assert "multiples of 8" in refused["size"]
    assert (
        sorted(Path(tempfile.gettempdir()).glob("msdiff-ui-*")),
        sorted(page.visitor_files.root.iterdir()),
    ) == before


@pytest.mark.slow
def test_a_visitors_files_are_removed_when_their_page_closes(served, tmp_path):
    page, url = served
    client = PageClient(url)
    leave = threading.Event()

    def keep_page_open():  # the browser holds this stream while the page is open
        with client.http.stream("GET", f"gradio_api/heartbeat/{client.session}") as answer:
            lines = answer.iter_lines()  # held: a dropped iterator closes the stream
            next(lines)
            leave.wait(120)

    heartbeat = threading.Thread(target=keep_page_open)
    heartbeat.start()
    try:
        photo = client.upload(_private_photo(tmp_path, "mine.png"))
        assert client.generate(**SMALL, subject0_images=[photo])["status"].startswith("Made")
        folder = page.visitor_files.folder(client.session)
        assert any(folder.rglob("msdiff-00001.png")) and any(folder.rglob("mine.png"))
    finally:
        leave.set()
        heartbeat.join()
    deadline = time.monotonic() + 60
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not folder.exists()


@pytest.mark.slow
def test_leaving_stops_a_generation_and_frees_the_model(served):
    page, url = served
    ann, bob = PageClient(url), PageClient(url)
    # Ann asks the API for a long job (as the stranger did), then disconnects.
    job = {"prompt": "a dog", "subjects": [{"image": "dog.jpg", "phrase": "dog", "box": [0.1, 0.1, 0.9, 0.9]}]}
    job.update(size=64, steps=LONG["steps"])
    ann.join("generate_job", [yaml.safe_dump(job), [ann.upload(ASSETS / "dog.jpg")]]).raise_for_status()
    stream = ann.messages()
    while next(stream)["msg"] != "process_starts":
        pass
    time.sleep(1)  # it is running its steps
    stream.close()  # Ann closes her page
    started = time.monotonic()
    answer = {}
    waiter = threading.Thread(target=lambda: answer.update(bob.generate(**_dog_and_cat(bob, **SMALL))))
    waiter.start()
    waiter.join(60)
    assert answer.get("downloads"), f"Bob still waits after {time.monotonic() - started:.0f} s"
    assert not list(page.visitor_files.results(ann.session).glob("msdiff-*.png"))  # Ann's job never finished


@pytest.mark.slow
def test_stop_ends_a_generation_and_the_queue_has_a_length(served):
    page, url = served
    ann, bob, eve = PageClient(url), PageClient(url), PageClient(url)
    ann.join("on_generate", ann.inputs("on_generate", **_dog_and_cat(ann, **LONG))).raise_for_status()
    stream = ann.messages()
    while next(stream)["msg"] != "process_starts":
        pass
    bob.join("on_generate", bob.inputs("on_generate", **_dog_and_cat(bob, **SMALL))).raise_for_status()  # waits
    assert eve.join("on_generate", eve.inputs("on_generate", **SMALL)).status_code == 503  # the queue is full
    started = time.monotonic()
    assert ann.run("on_stop", [])["data"] == ["Stopped."]  # Ann presses Stop
    done = next(m for m in stream if m["msg"] == "process_completed")
    stream.close()
    assert "stopped: you pressed Stop." in ann.shown("on_generate", done["output"]["data"])["status"]
    assert time.monotonic() - started < 60
    bobs = next(m for m in bob.messages() if m["msg"] == "process_completed")
    assert bob.shown("on_generate", bobs["output"]["data"])["status"].startswith("Made 1 image")


@pytest.mark.slow
def test_a_login_is_asked_for_with_auth(tmp_path):
    pytest.importorskip("gradio", reason='the ui extra is not installed (pip install -e ".[ui]")')
    import httpx

    from msdiffusion.app.page import build_page, launch

    page = build_page(_tiny_models(), pipe=object(), limits=PageLimits())
    _, url, _ = launch(page, port=_free_port(), prevent_thread_lock=True, quiet=True, auth=[("ann", "pw")])
    try:
        stranger = httpx.Client(base_url=url, timeout=60)
        assert stranger.get("config").status_code == 401
        assert stranger.post("gradio_api/upload", files={"files": ("a.png", b"x")}).status_code == 401
        assert stranger.post("login", data={"username": "ann", "password": "guess"}).status_code >= 400
        assert stranger.post("login", data={"username": "ann", "password": "pw"}).status_code == 200
        assert stranger.get("config").status_code == 200
    finally:
        page.close()
        page.visitor_files.close()


def _fetch(client: PageClient, file: dict) -> np.ndarray:
    """The pixels of a file the page answered with (a result, a download)."""
    answer = client.http.get(file["url"])
    answer.raise_for_status()
    return np.asarray(PIL.Image.open(io.BytesIO(answer.content)))


@pytest.mark.slow
def test_a_picture_is_repainted_in_the_subjects_regions_and_kept_outside(served, tmp_path):
    page, url = served
    ann, bob = PageClient(url), PageClient(url)
    room = _noise_picture(tmp_path / "room.png", (128, 96))
    picture = ann.upload(room)
    # Given, a picture sets the output's size and locks it; one over --max-size (256 here) is shrunk to fit.
    width, height, preset, controls, message = ann.call("on_picture", [picture])["data"]
    assert (width["value"], height["value"], width["interactive"], preset["interactive"]) == (128, 96, False, False)
    assert controls["visible"] and message == ""
    wide = tmp_path / "wide.png"
    PIL.Image.new("RGB", (400, 200)).save(wide)
    width, height, *_ = ann.call("on_picture", [ann.upload(wide)])["data"]
    assert (width["value"], height["value"]) == (256, 128)
    huge = tmp_path / "huge.png"
    PIL.Image.new("1", (4000, 2000)).save(huge)
    width, _, _, controls, message = ann.call("on_picture", [ann.upload(huge)])["data"]
    assert message.startswith("⚠ huge.png: 4000x2000 pixels") and "--max-megapixels" in message
    assert width["interactive"] and not controls["visible"]
    width, _, _, controls, message = ann.call("on_picture", [None])["data"]  # removed: text-to-image again
    assert width["interactive"] and not controls["visible"] and message == ""

    # The dog's region painted (top left, no box), the cat's box (top right); the width and height sent (64)
    # are not the picture's: the picture's size wins.
    region = np.zeros((48, 64), bool)
    region[6:30, 4:28] = True
    values = {
        **SMALL,
        "prompt": "a dog and a cat on the beach",
        "picture": picture,
        "subject0_images": [ann.upload(ASSETS / "dog.jpg")],
        "subject0_phrase": "dog",
        "subject0_box": "",
        "subject0_region": _region_url(region),
        "subject1_images": [ann.upload(ASSETS / "cat.jpg")],
        "subject1_phrase": "cat",
        "subject1_box": "0.65,0.1,0.95,0.5",
    }
    made = ann.generate(**values)
    assert made["status"].startswith("Made 1 image"), made
    captions = [item["caption"] for item in made["results"]]
    assert captions[:3] == ["input: room.png", "msdiff-00001.png (seed 0)", "repainted part (white)"], captions
    result, repainted = (_fetch(ann, item["image"]) for item in made["results"][1:3])
    original = np.asarray(PIL.Image.open(room))
    assert result.shape == original.shape == (96, 128, 3)
    kept = repainted == 0
    np.testing.assert_array_equal(result[kept], original[kept])  # outside the repainted part: the picture, exactly
    assert (~kept).sum() > 500 and not np.array_equal(result[~kept], original[~kept])
    # Only the regions (the dog's rows 12-60, columns 8-56; the cat's box, rows 9-48, columns 83-122) are
    # repainted, grown by the margin and the feathered edge (2 pixels each here): 8 pixels is ample.
    near = np.zeros_like(kept)
    near[4:68, 0:64] = True
    near[1:56, 75:] = True
    assert kept[~near].all()

    # The job the server ran: the picture and the region's mask by file name; the mask comes with the PNG.
    record, png = _png_record(ann, made["downloads"][0])
    assert record["init_image"] == "room.png" and record["inpaint"] == "subjects" and record["size"] == [128, 96]
    assert record["strength"] == 1.0 and record["repaint_margin"] == 0.02
    mask_name = record["subjects"][0]["mask"]
    assert "box" not in record["subjects"][0] and made["downloads"][1]["orig_name"] == mask_name
    np.testing.assert_array_equal(_fetch(ann, made["downloads"][1])[::2, ::2] == 255, region)
    assert tempfile.gettempdir() not in json.dumps(record)

    # Exported: a job file naming both, with the mask beside it.
    exported = ann.call("on_export", ann.inputs("on_export", **values))["data"][-1]
    assert [f["orig_name"] for f in exported] == ["msdiff-job.yaml", mask_name]
    job = yaml.safe_load(ann.http.get(exported[0]["url"]).text)
    assert job["init_image"] == "room.png" and job["subjects"][0]["mask"] == mask_name
    # Imported again by Ann, the PNG brings back her picture and painted region; Bob is asked for them.
    (tmp_path / "made.png").write_bytes(png)
    filled = _import(ann, tmp_path / "made.png")
    assert (
        Path(filled["picture"]["path"]).name == "room.png" and filled["picture_mode"] == "Repaint the subjects' regions"
    )
    assert filled["subject0_region"].startswith("data:image/png;base64,") and filled["subject0_box"] == ""
    filled = _import(bob, tmp_path / "made.png")
    assert filled["picture"] is None and filled["subject0_region"] == ""
    assert "upload 'room.png' as the picture" in filled["status"] and "paint its region again" in filled["status"]


@pytest.mark.slow
def test_a_bad_painted_region_is_refused_in_one_line_naming_its_subject(served):
    page, url = served
    client = PageClient(url)
    values = _dog_and_cat(client, **SMALL)
    for text in ("data:image/png;base64,!!", "data:image/png;base64," + "A" * (3 * 2**20), "file:///etc/hostname"):
        refused = client.generate(**values, subject1_region=text)
        assert refused["subject1"].startswith("⚠ region: ") and "\n" not in refused["subject1"], refused["subject1"]
        assert refused["status"] == "⚠ Nothing was made: see subject 2."


@pytest.mark.slow
def test_the_api_reads_a_picture_or_mask_only_among_its_uploads(served, tmp_path):
    page, url = served
    client = PageClient(url)
    room = _noise_picture(tmp_path / "room.png", (128, 96))
    region = np.zeros((96, 128), np.uint8)
    region[20:80, 10:60] = 255
    PIL.Image.fromarray(region).save(tmp_path / "dog-region.png")
    uploads = [client.upload(path) for path in (ASSETS / "dog.jpg", room, tmp_path / "dog-region.png")]
    job = {
        "prompt": "a dog in the room",
        "subjects": [{"image": "dog.jpg", "phrase": "dog", "mask": "dog-region.png"}],
        "init_image": "room.png",
        "inpaint": "subjects",
        "steps": 2,
    }
    answer = client.call("generate_job", [yaml.safe_dump(job), uploads])
    record, _ = _png_record(client, answer["data"][0][0])
    assert record["init_image"] == "room.png" and record["size"] == [128, 96]
    assert record["subjects"][0]["mask"] == "dog-region.png"
    for change in (
        {"init_image": str(room)},  # a path, even to a file that is there: never read
        {"inpaint": "/etc/hostname"},
        {"subjects": [{"image": "dog.jpg", "phrase": "dog", "mask": str(tmp_path / "dog-region.png")}]},
    ):
        answer = client.call("generate_job", [yaml.safe_dump({**job, **change}), uploads])
        assert "is not among the uploaded images" in (answer.get("error") or ""), (change, answer)


# ---- the gradio_client API, as the README shows it ----------------------------------------------
def _readme_client_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(b for b in blocks if "gradio_client" in b)


@pytest.mark.slow
def test_gradio_client_api_as_documented(served, tmp_path, monkeypatch):
    pytest.importorskip("gradio_client")
    page, url = served
    for name in ("dog.jpg", "cat.jpg"):
        shutil.copy(ASSETS / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    code = _readme_client_snippet().replace("http://127.0.0.1:7860/", url).replace("steps: 30", "steps: 2")
    code = code.replace("size: [1024, 1024]", "size: [64, 64]")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    files = scope["files"]
    assert len(files) == 1
    record = json.loads(PIL.Image.open(files[0]).text[PNG_METADATA_KEY])
    assert record["prompt"] == "a dog and a cat on the beach" and record["base"] == TINY and record["seed"] == 0

    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    bad = "prompt: a dog\nsubjects: [{image: dog.jpg, phrase: cat, box: [0, 0, 0.5, 0.5]}]\nsize: 64\nsteps: 1\n"
    with pytest.raises(Exception, match="'cat' is not in the prompt"):
        client.predict(job=bad, images=[handle_file(str(tmp_path / "dog.jpg"))], api_name="/generate_job")


# ---- the page in a real browser -------------------------------------------------------------------
def _browser_or_skip():
    """Playwright's sync API, or a skip that says what is missing (Playwright, Debian's Chromium)."""
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    return playwright_api


@pytest.fixture(scope="module")
def ui_url():
    # Checked before a server is started: without them the browser test must skip, not error in setup.
    _browser_or_skip()
    if os.environ.get("MSDIFF_UI_URL"):
        yield os.environ["MSDIFF_UI_URL"]
        return
    pytest.importorskip("gradio", reason='the ui extra is not installed (pip install -e ".[ui]")')
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(
        [sys.executable, "-m", "msdiffusion", "ui", *TINY_FLAGS, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url, lines, deadline = None, [], time.monotonic() + SLOW_MS / 1000
    try:
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            lines.append(line)
            found = re.search(r"Running on local URL:\s+(\S+)", line)
            url = found.group(1) if found else None
        assert url, "msdiff ui did not start:\n" + "".join(lines)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def browser_page(ui_url):
    playwright_api = _browser_or_skip()
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1400}, accept_downloads=True)
        page.set_default_timeout(SLOW_MS)
        page.goto(ui_url, timeout=SLOW_MS)
        page.wait_for_selector("#box-canvas[data-ready]")
        yield page
        browser.close()


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def _set(page, elem_id: str, value: str) -> None:
    field = _field(page, elem_id)
    field.fill(value)
    field.press("Tab")  # blur: Gradio numbers commit their value on change


def _drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse drag between two points given as fractions of the canvas."""
    page.locator("#box-canvas").scroll_into_view_if_needed()
    canvas = page.locator("#box-canvas").bounding_box()
    x0, y0 = canvas["x"] + start[0] * canvas["width"], canvas["y"] + start[1] * canvas["height"]
    x1, y1 = canvas["x"] + end[0] * canvas["width"], canvas["y"] + end[1] * canvas["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=8)
    page.mouse.up()


def _box(page, slot: int) -> list[float]:
    return [float(v) for v in _field(page, f"subject{slot}-box").input_value().split(",")]


def _photos(page, slot: int) -> list[str]:
    """The file names listed in a subject's photo box."""
    text = page.locator(f"#subject{slot}-images").inner_text().replace("\n", "")
    return re.findall(r"[\w-]+\.(?:jpg|png)", text)


def _canvas_colour(page, x: float, y: float) -> list[int]:
    """The RGB of the canvas at a point given as fractions of it."""
    return page.evaluate(
        """([x, y]) => { const c = document.querySelector('#box-canvas');
            return Array.from(c.getContext('2d').getImageData(Math.round(x * c.width), Math.round(y * c.height), 1, 1).data).slice(0, 3); }""",
        [x, y],
    )


@pytest.mark.slow
def test_page_in_a_browser_draw_generate_download_import(browser_page, tmp_path):
    from msdiffusion.preview import PALETTE

    page = browser_page
    # The page opens with a working example of the served models: photos, phrases and boxes filled in.
    assert _field(page, "prompt").input_value() == "a dog and a cat on the beach"
    assert _field(page, "subject1-phrase").input_value() == "cat" and _box(page, 1) == [0.55, 0.3, 0.95, 0.9]
    assert _photos(page, 0) == ["dog.jpg"]
    for slot in (0, 1):  # cleared, to draw them again with the mouse
        _set(page, f"subject{slot}-box", "")
    _set(page, "width", "64")
    _set(page, "height", "64")
    _set(page, "steps", "2")
    _set(page, "seed", "3")
    _set(page, "prompt", "a dog and a cat on the beach")
    for slot, name in enumerate(("dog", "cat")):
        page.click(f"#subject{slot}-images button[aria-label='Clear']")  # the example's photo goes
        page.wait_for_selector(f"#subject{slot}-images input[type=file]", state="attached")
        page.set_input_files(f"#subject{slot}-images input[type=file]", str(ASSETS / f"{name}.jpg"))
        _set(page, f"subject{slot}-phrase", name)
    page.wait_for_timeout(500)
    assert _photos(page, 0) == ["dog.jpg"] and _photos(page, 1) == ["cat.jpg"], (_photos(page, 0), _photos(page, 1))

    # Two mouse drags draw subject 1's box, then subject 2's (the page moves on to the next subject).
    _drag(page, (0.05, 0.3), (0.45, 0.9))
    _drag(page, (0.55, 0.3), (0.95, 0.9))
    page.wait_for_timeout(300)
    dog_box, cat_box = _box(page, 0), _box(page, 1)
    np.testing.assert_allclose(dog_box, [0.05, 0.3, 0.45, 0.9], atol=0.02)
    np.testing.assert_allclose(cat_box, [0.55, 0.3, 0.95, 0.9], atol=0.02)
    # Dragging inside a box moves it; typed numbers redraw it.
    _drag(page, (0.25, 0.6), (0.25, 0.55))
    page.wait_for_timeout(300)
    np.testing.assert_allclose(_box(page, 0), [dog_box[0], dog_box[1] - 0.05, dog_box[2], dog_box[3] - 0.05], atol=0.02)
    _set(page, "subject0-box", "0.05,0.3,0.45,0.9")

    # A bad input shows its message next to its subject, before any work.
    _set(page, "subject1-phrase", "kitten")
    page.click("#generate")
    page.wait_for_selector("#subject1-error:has-text(\"'kitten' is not in the prompt\")")
    _set(page, "subject1-phrase", "cat")

    page.click("#generate")
    page.wait_for_selector("#downloads a", timeout=SLOW_MS)
    assert page.locator("#subject1-error").inner_text().strip() == ""  # the earlier message is gone
    assert page.locator("#status").inner_text().strip() == "Made 1 image (seed 3)."
    captions = page.locator("#results").inner_text()
    assert "seed 3" in captions and "layout" in captions  # the image and its layout overlay
    assert page.locator("#results img").count() >= 2
    with page.expect_download() as download_info:
        page.locator("#downloads a").first.click()
    png = tmp_path / "downloaded.png"
    download_info.value.save_as(png)
    record = json.loads(PIL.Image.open(png).text[PNG_METADATA_KEY])
    assert [s["phrase"] for s in record["subjects"]] == ["dog", "cat"] and record["size"] == [64, 64]
    np.testing.assert_allclose(record["subjects"][1]["box"], [0.55, 0.3, 0.95, 0.9], atol=0.02)
    assert record["subjects"][0]["image"] == "dog.jpg" and "output" not in record  # names, not the server's paths
    for name in ("dog.jpg", "cat.jpg"):  # the visitor's photos, beside the PNG
        shutil.copy(ASSETS / name, tmp_path / name)
    again = tmp_path / "again"
    assert main(["generate", "--from", str(png), "--output", str(again), "--quiet"]) == 0  # it makes itself again
    again = again / "msdiff-00001.png"
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(again)), np.asarray(PIL.Image.open(png)))

    # MSDIFF_UI_SCREENSHOT=FILE keeps this screenshot (the README's picture is benchmarks/ui_screenshot.py's).
    page.screenshot(path=os.environ.get("MSDIFF_UI_SCREENSHOT") or str(tmp_path / "ui.png"), full_page=True)

    # Importing a job file fills the page, and the canvas draws its boxes in the subjects' colours.
    job = {
        "base": TINY,
        "adapter": TINY,
        "image_encoder": TINY,
        "prompt": "a cat and a dog in the snow",
        "subjects": [
            {"image": str(ASSETS / "cat.jpg"), "phrase": "cat", "box": [0.1, 0.2, 0.5, 0.7]},
            {"image": str(ASSETS / "dog.jpg"), "phrase": "dog", "box": [0.6, 0.1, 0.9, 0.6]},
        ],
        "size": [96, 64],
        "steps": 3,
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    page.set_input_files("#import input[type=file]", str(job_file))
    page.wait_for_selector("#status:has-text('Imported')")
    page.wait_for_function(
        "() => document.querySelector('#subject0-box input, #subject0-box textarea').value === '0.1,0.2,0.5,0.7'"
    )
    assert _field(page, "prompt").input_value() == job["prompt"] and _field(page, "width").input_value() == "96"
    assert _box(page, 1) == [0.6, 0.1, 0.9, 0.6]
    page.wait_for_timeout(500)  # the canvas redraws from the fields
    for slot, subject in enumerate(job["subjects"]):
        x0, y0, x1, y1 = subject["box"]
        edge = _canvas_colour(page, x0, (y0 + y1) / 2)  # on the left edge of the box
        assert np.abs(np.array(edge) - PALETTE[slot]).max() < 40, (slot, edge)
        inside = _canvas_colour(page, (x0 + x1) / 2, (y0 + y1) / 2)
        assert np.abs(np.array(inside) - PALETTE[slot]).max() > 60  # only the outline is solid


def _two_colour_picture(path: Path, size: tuple[int, int] = (128, 96)) -> Path:
    """A picture whose left half is blue and right half yellow (easy to tell apart on the canvas)."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = BLUE
    pixels[:, size[0] // 2 :] = YELLOW
    PIL.Image.fromarray(pixels).save(path)
    return path


BLUE, YELLOW = (30, 60, 200), (230, 210, 40)


@pytest.mark.slow
def test_page_in_a_browser_paint_a_region_and_repaint_a_picture(browser_page, ui_url, tmp_path):
    from msdiffusion.preview import PALETTE

    page = browser_page
    page.goto(ui_url)  # a new visit: the example's dog and cat, with their boxes
    page.wait_for_selector("#box-canvas[data-ready]")
    _set(page, "steps", "2")
    _set(page, "seed", "3")
    _set(page, "subject0-box", "")  # the dog gets a painted region instead
    page.set_input_files("#picture input[type=file]", str(_two_colour_picture(tmp_path / "room.png")))
    # The output takes the picture's size (the fields are locked), and the canvas shows it behind the boxes.
    page.wait_for_function("() => document.querySelector('#width input').value === '128'")
    assert _field(page, "height").input_value() == "96" and _field(page, "width").is_disabled()
    page.wait_for_timeout(500)
    assert np.abs(np.array(_canvas_colour(page, 0.1, 0.1)) - BLUE).max() < 30
    assert np.abs(np.array(_canvas_colour(page, 0.9, 0.1)) - YELLOW).max() < 30
    assert page.locator("#picture-mode input:checked").get_attribute("value") == "Repaint the subjects' regions"

    # Subject 1's region painted with the brush, then its right end erased.
    page.click("#box-tools button[data-subject='0']")
    page.click("#box-tools button[data-tool='brush']")
    page.locator("#brush-size").evaluate("(e) => { e.value = '30'; }")
    _drag(page, (0.08, 0.45), (0.42, 0.45))
    page.wait_for_function("() => document.querySelector('#subject0-region textarea, #subject0-region input').value")
    page.click("#box-tools button[data-tool='eraser']")
    _drag(page, (0.33, 0.3), (0.33, 0.6))
    _drag(page, (0.4, 0.3), (0.4, 0.6))
    page.wait_for_timeout(500)
    tinted = np.array(_canvas_colour(page, 0.15, 0.45))  # the picture's blue, tinted in subject 1's colour
    assert (
        np.abs(tinted - BLUE).max() > 40
        and np.abs(tinted - PALETTE[0]).max() < np.abs(np.array(BLUE) - PALETTE[0]).max()
    )
    assert np.abs(np.array(_canvas_colour(page, 0.37, 0.45)) - BLUE).max() < 30  # erased: the picture again

    page.click("#generate")
    page.wait_for_selector("#downloads a", timeout=SLOW_MS)
    assert page.locator("#status").inner_text().strip() == "Made 1 image (seed 3)."
    captions = [c.strip() for c in page.locator("#results .caption-label").all_inner_texts()]
    # The result beside the picture it was made from, then the part repainted.
    assert captions[:3] == ["input: room.png", "msdiff-00001.png (seed 3)", "repainted part (white)"], captions

    # The job the server ran: the picture, its subjects' regions repainted, the dog's painted region as its mask.
    files = {}
    for link in page.locator("#downloads a").all():
        with page.expect_download() as download_info:
            link.click()
        files[download_info.value.suggested_filename] = tmp_path / download_info.value.suggested_filename
        download_info.value.save_as(files[download_info.value.suggested_filename])
    record = json.loads(PIL.Image.open(files["msdiff-00001.png"]).text[PNG_METADATA_KEY])
    assert record["init_image"] == "room.png" and record["inpaint"] == "subjects" and record["size"] == [128, 96]
    dog = record["subjects"][0]
    assert "box" not in dog and re.fullmatch(r"region-dog-[0-9a-f]{12}\.png", dog["mask"]), dog
    mask = np.asarray(PIL.Image.open(files[dog["mask"]])) > 127
    assert mask.shape == (96, 128) and mask[43, 19] and not mask[43, 48] and not mask[10:25].any()
    assert PIL.Image.open(files["msdiff-00001.png"]).size == (128, 96)

    # Removing the picture returns to text-to-image: the size is the visitor's again, the canvas blank.
    page.click("#picture button[aria-label='Clear']")
    page.wait_for_function("() => !document.querySelector('#width input').disabled")
    page.wait_for_timeout(300)
    assert np.abs(np.array(_canvas_colour(page, 0.9, 0.1)) - YELLOW).max() > 100


def test_a_taken_port_is_one_line_before_any_model_loads(capsys, monkeypatch):
    import socket

    import msdiffusion.loading as loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded models for a taken port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        models = ["--base", "tiny-random", "--adapter", "tiny-random", "--image-encoder", "tiny-random"]
        assert main(["ui", *models, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err and "give another --port" in err, err
    assert "GRADIO_SERVER_PORT" not in err and "Traceback" not in err
