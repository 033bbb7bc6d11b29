"""`msdiff ui`: the page's job mapping, its gradio_client API, and the page itself in a real browser.

The browser test starts `python -m msdiffusion ui` with the tiny random models on a free port and
drives Debian's Chromium with Playwright (both installed by .ci/run); it skips, saying why, where
either is missing. `MSDIFF_UI_URL` points it at a page already running with the tiny models instead;
`MSDIFF_UI_SCREENSHOT=FILE` saves a screenshot of the page (the README's, with the world models, is
`benchmarks/ui_screenshot.py`'s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml

from msdiffusion.app.cli import main
from msdiffusion.app.jobs import PNG_METADATA_KEY
from msdiffusion.app.page import PageModels
from msdiffusion.loading import TINY

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
    from msdiffusion.app.page import PageModels

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
    }
    settings.update(changes)
    return settings


def _subjects(*entries: dict) -> list[dict]:
    empty = {"images": None, "phrase": "", "box": "", "scale": ""}
    return [{**empty, **e} for e in entries] + [empty] * (4 - len(entries))


DOG = {"images": [str(ASSETS / "dog.jpg")], "phrase": "dog", "box": "0.05,0.3,0.45,0.9"}
CAT = {"images": [str(ASSETS / "cat.jpg")], "phrase": "cat", "box": "0.55,0.3,0.95,0.9", "scale": "0.8"}


# ---- the page's values <-> jobs (no Gradio needed) ----------------------------------------------
def test_page_values_become_a_validated_job(tmp_path):
    from msdiffusion.app.page import page_to_job

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
        ({**CAT, "images": None}, 1, r"^image: an empty list"),
        ({**CAT, "phrase": ""}, 1, r"^phrase: expected the words naming the subject"),
        ({**CAT, "scale": "strong"}, 1, r"^scale: got 'strong'; expected a number"),
    ],
)
def test_bad_subject_input_names_the_field_and_its_subject(tmp_path, subject, slot, message):
    from msdiffusion.app.page import PageError, page_to_job

    with pytest.raises(PageError, match=message) as caught:
        page_to_job(_settings(), _subjects(DOG, subject), _tiny_models(), str(tmp_path))
    assert caught.value.slot == slot


def test_bad_settings_and_unreadable_photos_and_missing_phrases(tmp_path):
    from msdiffusion.app.page import PageError, check_before_work, page_to_job
    from msdiffusion.tiny import tiny_pipeline

    with pytest.raises(PageError, match=r"^size: got \[100, 64\]; expected .*multiples of 8") as caught:
        page_to_job(_settings(width=100.0), _subjects(DOG), _tiny_models(), str(tmp_path))
    assert caught.value.slot is None
    with pytest.raises(PageError, match="add at least one subject"):
        page_to_job(_settings(), _subjects(), _tiny_models(), str(tmp_path))

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    tokenizer = tiny_pipeline(seed=0).tokenizer
    job, slots = page_to_job(
        _settings(), _subjects(DOG, {**CAT, "images": [str(broken)]}), _tiny_models(), str(tmp_path)
    )
    with pytest.raises(PageError, match=r"^broken.jpg: cannot read .* as an image") as caught:
        check_before_work(job, slots, tokenizer)
    assert caught.value.slot == 1
    job, slots = page_to_job(_settings(prompt="a dog on the beach"), _subjects(DOG, CAT), _tiny_models(), str(tmp_path))
    with pytest.raises(PageError, match=r"^phrase: 'cat' is not in the prompt 'a dog on the beach'") as caught:
        check_before_work(job, slots, tokenizer)
    assert caught.value.slot == 1
    job, slots = page_to_job(_settings(), _subjects(DOG, CAT), _tiny_models(), str(tmp_path))
    check_before_work(job, slots, tokenizer)  # a good page passes


def test_export_then_import_is_the_same_page(tmp_path):
    from msdiffusion.app.page import ASSETS as PAGE_ASSETS
    from msdiffusion.app.page import export_yaml, job_to_page, page_to_job

    settings = _settings(auto_layout=True, mask_threshold=0.4, scheduler="DDIMScheduler")
    job, _ = page_to_job(settings, _subjects(DOG, CAT), _tiny_models(), str(tmp_path))
    text = export_yaml(job)
    data = yaml.safe_load(text)
    assert "output" not in data and data["subjects"][1]["box"] == [0.55, 0.3, 0.95, 0.9]
    job_file = tmp_path / "job.yaml"
    job_file.write_text(text)
    assert main(["generate", str(job_file), "--steps", "1", "--output", str(tmp_path / "out"), "--quiet"]) == 0

    page_settings, subjects, notes = job_to_page(data, tmp_path, [PAGE_ASSETS], TINY_MODELS)
    assert notes == []
    assert page_settings == {**settings, "seed": 3, "negative_prompt": ""}
    assert subjects[0] == {
        "images": [str(ASSETS / "dog.jpg")],
        "phrase": "dog",
        "box": "0.05,0.3,0.45,0.9",
        "scale": "",
    }
    assert subjects[1]["scale"] == "0.8" and subjects[2] == subjects[3] == {
        "images": [],
        "phrase": "",
        "box": "",
        "scale": "",
    }
    # Photos outside the folders a visitor may see are not served: the notes ask for them again.
    _, subjects, notes = job_to_page(data, tmp_path, [tmp_path / "uploads"], TINY_MODELS)
    assert subjects[0]["images"] == [] and notes[0].startswith("subject 1: upload its photo again (dog.jpg")


def test_import_refuses_a_bad_job_with_the_job_files_message(tmp_path):
    from msdiffusion.app.jobs import JobError
    from msdiffusion.app.page import job_to_page

    with pytest.raises(JobError, match=r"imported job: subjects\[0\]: unknown field 'bx' \(did you mean 'box'\?\)"):
        job_to_page(
            {"prompt": "a dog", "subjects": [{"image": "dog.jpg", "phrase": "dog", "bx": [0, 0, 1, 1]}]},
            tmp_path,
            [],
            TINY_MODELS,
        )


def test_ui_command_needs_gradio_or_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    assert main(["ui", *TINY_FLAGS]) == 2
    assert 'pip install -e ".[ui]"' in capsys.readouterr().err


# ---- the gradio_client API, as the README shows it ----------------------------------------------
def _readme_client_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(b for b in blocks if "gradio_client" in b)


@pytest.mark.slow
def test_gradio_client_api_as_documented(tmp_path, monkeypatch):
    pytest.importorskip("gradio", reason='the ui extra is not installed (pip install -e ".[ui]")')
    pytest.importorskip("gradio_client")
    from msdiffusion.app.page import build_page, launch
    from msdiffusion.tiny import tiny_pipeline

    page = build_page(_tiny_models(), tiny_pipeline(seed=0))
    _, url, _ = launch(page, port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
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
    finally:
        page.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    canvas = page.locator("#box-canvas").bounding_box()
    x0, y0 = canvas["x"] + start[0] * canvas["width"], canvas["y"] + start[1] * canvas["height"]
    x1, y1 = canvas["x"] + end[0] * canvas["width"], canvas["y"] + end[1] * canvas["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=8)
    page.mouse.up()


def _box(page, slot: int) -> list[float]:
    return [float(v) for v in _field(page, f"subject{slot}-box").input_value().split(",")]


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
    _set(page, "width", "64")
    _set(page, "height", "64")
    _set(page, "steps", "2")
    _set(page, "seed", "3")
    _set(page, "prompt", "a dog and a cat on the beach")
    for slot, name in enumerate(("dog", "cat")):
        page.set_input_files(f"#subject{slot}-images input[type=file]", str(ASSETS / f"{name}.jpg"))
        _set(page, f"subject{slot}-phrase", name)

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
    assert page.locator("#subject1-error").inner_text().strip() == ""
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
    assert main(["generate", "--from", str(png), "--quiet"]) == 0  # the page's PNG makes itself again
    again = tmp_path / "msdiff-00001.png"  # written beside the downloaded PNG
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
    page.wait_for_selector("#import-notes:has-text('Imported')")
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
