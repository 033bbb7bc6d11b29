"""Image-to-image, inpainting and subject masks in job files, `msdiff generate` flags and `run_job`."""

import inspect
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml

from msdiffusion import loading
from msdiffusion.app.cli import main
from msdiffusion.app.jobs import PNG_METADATA_KEY, JobError, job_from_dict, portable_job, run_job
from msdiffusion.settings import IMAGE_TO_IMAGE, INPAINTING, PIPELINE_STRENGTH, TEXT_TO_IMAGE

TINY = ["--base", "tiny-random", "--adapter", "tiny-random", "--image-encoder", "tiny-random"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "img2img-inpainting.md"


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A 130x100 picture (the output: 128x96), a subject photo, a repaint mask of half the picture's size,
    a subject mask and an empty one; the current folder is theirs."""
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 255, (100, 130, 3), dtype=np.uint8)).save(tmp_path / "room.jpg")
    PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "dog.jpg")
    hole = np.zeros((50, 65), np.uint8)
    hole[10:45, 20:60] = 255
    PIL.Image.fromarray(hole).save(tmp_path / "sofa-mask.png")
    region = np.zeros((96, 128), np.uint8)
    region[30:90, 45:115] = 255
    PIL.Image.fromarray(region).save(tmp_path / "dog-region.png")
    PIL.Image.fromarray(np.zeros((96, 128), np.uint8)).save(tmp_path / "empty.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def record(path) -> dict:
    return json.loads(PIL.Image.open(path).text[PNG_METADATA_KEY])


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


def test_the_strength_defaults_and_classes_are_the_pipelines():
    for (task, controlnet), strength in PIPELINE_STRENGTH.items():
        cls = loading.pipeline_class(task, controlnet)
        assert inspect.signature(cls.__call__).parameters["strength"].default == strength, cls
    assert loading.pipeline_class(TEXT_TO_IMAGE).__name__ == "MSDiffusionXLPipeline"


def test_img2img_from_flags_with_a_mask_only_subject_regenerates_from_its_png(files):
    flags = [*TINY, "--prompt", "a dog in the room", "--init-image", "room.jpg", "--strength", "0.7"]
    flags += ["--subject", "dog.jpg", "dog", "mask=dog-region.png", "--steps", "2", "--seed", "1", "--quiet"]
    assert main(["generate", *flags, "--output", "a"]) == 0
    made = files / "a" / "msdiff-00001.png"
    assert PIL.Image.open(made).size == (128, 96)  # the picture's 130x100, rounded down to multiples of 8
    job = record(made)
    assert (job["init_image"], job["strength"], job["inpaint"]) == (str(files / "room.jpg"), 0.7, None)
    assert job["subjects"][0]["mask"] == str(files / "dog-region.png") and job["size"] == [128, 96]
    assert main(["generate", "--from", str(made), "--output", "again", "--quiet"]) == 0
    np.testing.assert_array_equal(pixels(files / "again" / "msdiff-00001.png"), pixels(made))

    # A loaded text-to-image pipeline (the page's) serves the job through from_pipe: the same image, no load.
    from msdiffusion.tiny import tiny_pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("a pipeline was given: nothing is loaded")

    pipe = tiny_pipeline(seed=0)
    loaded = job_from_dict({**job, "output": str(files / "loaded")})
    original = loading.load_pipeline
    loading.load_pipeline = no_loading
    try:
        (written, *_) = run_job(loaded, pipe, progress=False, log=lambda *a: None)
    finally:
        loading.load_pipeline = original
    np.testing.assert_array_equal(pixels(written), pixels(made))
    assert type(pipe).__name__ == "MSDiffusionXLPipeline"  # the loaded pipeline itself is left as it was


def test_inpaint_from_a_job_file_with_a_polygon_and_a_smaller_mask(files):
    job = {
        "base": "tiny-random",
        "adapter": "tiny-random",
        "image_encoder": "tiny-random",
        "prompt": "a dog on the sofa",
        "init_image": "room.jpg",
        "inpaint": "sofa-mask.png",  # half the picture's size: stretched over it
        "subjects": [
            {"image": "dog.jpg", "phrase": "dog", "mask": [[0.3, 0.3], [0.9, 0.3], [0.9, 0.9], [0.4, 0.9]]},
        ],
        "steps": 2,
        "seed": 0,
        "output": "inpainted",
    }
    (files / "jobs").mkdir()
    relative = {"init_image": "../room.jpg", "inpaint": "../sofa-mask.png"}  # to the job file
    relative["subjects"] = [{**job["subjects"][0], "image": "../dog.jpg"}]
    (files / "jobs" / "job.yaml").write_text(yaml.safe_dump({**job, **relative}))
    assert main(["generate", "jobs/job.yaml", "--quiet"]) == 0
    made = files / "jobs" / "inpainted" / "msdiff-00001.png"
    assert PIL.Image.open(made).size == (128, 96)
    kept = record(made)
    assert kept["init_image"] == str(files / "room.jpg") and kept["inpaint"] == str(files / "sofa-mask.png")
    assert kept["strength"] is None and kept["subjects"][0]["mask"][0] == [0.3, 0.3]
    assert main(["generate", "--from", str(made), "--output", "again", "--quiet"]) == 0
    np.testing.assert_array_equal(pixels(files / "again" / "msdiff-00001.png"), pixels(made))
    # The portable record names the pictures by file name, as the page's PNGs do.
    portable = portable_job(job_from_dict(kept))
    assert (portable["init_image"], portable["inpaint"]) == ("room.jpg", "sofa-mask.png")


def test_inpaint_subjects_repaints_their_regions_keeps_the_rest_and_regenerates(files):
    flags = [*TINY, "--prompt", "a dog in the room", "--init-image", "room.jpg", "--inpaint", "subjects"]
    flags += ["--subject", "dog.jpg", "dog", "0.25,0.25,0.75,0.75", "--repaint-margin", "0.05"]
    assert main(["generate", *flags, "--steps", "2", "--seed", "3", "--output", "a", "--quiet"]) == 0
    made = files / "a" / "msdiff-00001.png"
    job = record(made)
    assert (job["inpaint"], job["repaint_margin"], job["keep_outside"]) == ("subjects", 0.05, None)
    picture = np.asarray(PIL.Image.open("room.jpg").resize((128, 96), PIL.Image.LANCZOS))
    # The box covers rows 24:72 and columns 32:96; 5% of 96 rows is a margin of 5 pixels.
    keep = np.ones((96, 128), bool)
    keep[19:77, 27:101] = False
    image = pixels(made)
    np.testing.assert_array_equal(image[keep], picture[keep])
    assert np.abs(image[30:66, 40:88].astype(int) - picture[30:66, 40:88]).mean() > 10
    repainted = pixels(files / "a" / "msdiff-00001-repainted.png")
    assert repainted.shape == (96, 128) and (repainted[keep] == 0).all() and repainted[48, 64] == 255
    assert main(["generate", "--from", str(made), "--output", "again", "--quiet"]) == 0
    np.testing.assert_array_equal(pixels(files / "again" / "msdiff-00001.png"), image)
    assert portable_job(job_from_dict(job))["inpaint"] == "subjects"


def test_a_sideways_phone_photo_is_worked_on_as_it_is_shown(files):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored 128x64, shown turned a quarter clockwise: 64x128
    picture = np.zeros((64, 128, 3), np.uint8)
    picture[:, :64] = 255
    PIL.Image.fromarray(picture).save(files / "phone.jpg", exif=exif)
    PIL.Image.fromarray(np.where(picture[..., 0] > 0, 255, 0).astype(np.uint8)).save(files / "half.png", exif=exif)
    base = {"base": "tiny-random", "adapter": "tiny-random", "image_encoder": "tiny-random", "prompt": "a dog"}
    base["subjects"] = [{"image": "phone.jpg", "phrase": "dog", "box": [0.2, 0.2, 0.8, 0.8]}]
    job = job_from_dict({**base, "init_image": "phone.jpg", "inpaint": "half.png"}, base_dir=files)
    arguments = job.pipeline_arguments()
    assert job.size == [64, 128] and arguments["image"].size == (64, 128)
    assert arguments["subject_images"][0][0].size == (64, 128)
    mask = np.asarray(arguments["mask_image"])
    assert mask[:60].min() > 200 and mask[-60:].max() < 50  # the white left half is now the top half


def test_the_size_is_the_pictures_unless_given_and_a_new_picture_brings_its_own(files):
    base = {"base": "tiny-random", "adapter": "tiny-random", "image_encoder": "tiny-random", "prompt": "a dog"}
    base["subjects"] = [{"image": "dog.jpg", "phrase": "dog", "box": [0.2, 0.2, 0.8, 0.8]}]
    assert job_from_dict(base, base_dir=files).size == [512, 384]  # the named set's default
    job = job_from_dict({**base, "init_image": "room.jpg"}, base_dir=files)
    assert (job.size, job.task) == ([128, 96], IMAGE_TO_IMAGE)
    assert "height" not in job.pipeline_arguments()  # the pipeline takes the picture's own size
    job = job_from_dict({**base, "init_image": "room.jpg", "inpaint": "sofa-mask.png", "size": 64}, base_dir=files)
    assert (job.size, job.task) == ([64, 64], INPAINTING) and job.pipeline_arguments()["height"] == 64
    # --init-image over a job file without size: the output takes the new picture's size
    PIL.Image.new("RGB", (80, 72)).save(files / "small.png")
    (files / "job.yaml").write_text(yaml.safe_dump({**base, "init_image": "room.jpg", "steps": 4}))

    captured = {}

    def capture(job, command, progress, log=print):
        captured["job"] = job
        return []

    from msdiffusion.app import commands

    original = commands._run_checked
    commands._run_checked = capture
    try:
        assert main(["generate", "job.yaml", "--init-image", "small.png", "--strength", "1"]) == 0
        assert captured["job"].size == [80, 72]
        assert main(["generate", "job.yaml", "--init-image", "small.png", "--strength", "1", "--size", "64"]) == 0
        assert captured["job"].size == [64, 64]
    finally:
        commands._run_checked = original


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--init-image", "room.jpg", "--strength", "0"], "strength: got 0.0; expected a number in (0, 1]"),
        (["--init-image", "room.jpg", "--strength", "1.5"], "strength: got 1.5; expected a number in (0, 1]"),
        (["--strength", "0.5"], "strength: needs init_image (the picture to start from)"),
        (["--inpaint", "sofa-mask.png"], "inpaint: needs init_image"),
        (["--init-image", "nope.jpg"], "init_image: 'nope.jpg' does not exist"),
        (["--init-image", "room.jpg", "--inpaint", "nope.png"], "inpaint: 'nope.png' does not exist"),
        (
            ["--init-image", "room.jpg", "--steps", "3"],
            "strength: the default strength 0.3 of steps 3 leaves no denoising",
        ),
        (["--subject", "dog.jpg", "dog", "mask=nope.png"], "subjects[0].mask: 'nope.png' does not exist"),
        (
            ["--subject", "dog.jpg", "dog", "mask=0.1,0.1,0.5,0.5"],
            "subjects[0].mask: a polygon needs at least 3 points",
        ),
        (["--subject", "dog.jpg", "dog", "mask=0.1,0.1,0.5"], "a polygon mask is X,Y pairs"),
        (["--subject", "dog.jpg", "dog", "mask=empty.png"], "subjects[0].mask (dog): the mask is empty"),
        (["--subject", "dog.jpg", "dog", "0,0,1,1", "mask=", "scale=1"], "mask= needs a mask image's path"),
        (["--init-image", "room.jpg", "--repaint-margin", "0.1"], "repaint_margin: is for inpainting; add inpaint"),
        (
            ["--init-image", "room.jpg", "--inpaint", "subjects", "--repaint-feather", "0.7"]
            + ["--subject", "dog.jpg", "dog", "0.2,0.2,0.8,0.8"],
            "repaint_feather: got 0.7; expected a number in [0, 0.5]",
        ),
        (
            ["--init-image", "room.jpg", "--inpaint", "subjects"],
            "inpaint: subjects repaints the subjects' regions, but no subject has a box",
        ),
    ],
)
def test_mistakes_are_one_line_before_any_model_loads(files, capsys, monkeypatch, extra, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(loading, "load_pipeline", no_loading)
    subject = [] if "--subject" in extra else ["--subject", "dog.jpg", "dog"]
    assert main(["generate", *TINY, "--prompt", "a dog", *subject, *extra, "--output", "x", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msdiff generate: error: ") and message in err, err
    assert len(err.splitlines()) == 1 and not (files / "x").exists()


def test_a_job_files_picture_problems_are_listed_together(files):
    job = {"base": "tiny-random", "adapter": "tiny-random", "image_encoder": "tiny-random", "prompt": "a dog"}
    job |= {"init_image": "room.jpg", "strength": 2, "inpaint": "gone.png"}
    job["subjects"] = [
        {"image": "dog.jpg", "phrase": "dog", "mask": [[0.1, 0.1], [0.5, 0.5]]},
        {"image": "dog.jpg", "phrase": "dog", "mask": 3},
        {"image": "dog.jpg", "phrase": "dog", "mask": [[0.1, 0.1], [2, 0.5], [0.5, 0.9]]},
    ]
    with pytest.raises(JobError) as error:
        job_from_dict(job, "job.yaml", files)
    problems = error.value.problems
    assert any(p.startswith("subjects[0].mask: a polygon needs at least 3 points, got 2") for p in problems)
    assert any(p.startswith("subjects[1].mask: got 3; expected an image path") for p in problems)
    assert any(p.startswith("subjects[2].mask: polygon points are (x, y) fractions") for p in problems)
    assert any(p.startswith("inpaint: 'gone.png' does not exist (relative to") for p in problems)
    assert any(p.startswith("strength: got 2; expected a number in (0, 1]") for p in problems)
    assert len(problems) == 5


def test_the_docs_commands_run_as_written(files, tmp_path, monkeypatch):
    """docs/img2img-inpainting.md's job file and commands, on tiny local models (hub ids replaced by their
    folders; steps lowered where the command gives none); its world example, on the shipped world models."""
    from msdiffusion.tiny import save_tiny_models

    models = save_tiny_models(tmp_path / "models")
    hub = {
        "stabilityai/stable-diffusion-xl-base-1.0": str(models["base"]),
        "doge1516/MS-Diffusion": str(models["released_adapter"]),
        "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": str(models["image_encoder"]),
    }
    text = DOCS.read_text()
    for name, path in hub.items():
        text = text.replace(name, path)
    PIL.Image.open("room.jpg").save("beach.jpg")
    (job,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    Path("inpaint.yaml").write_text(job)
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    commands = [
        shlex.split(line.split(" #")[0]) for line in lines if line.startswith(("msdiff generate", "python benchmarks/"))
    ]
    assert len(commands) >= 5
    for words in commands:
        if words[0] == "python":  # benchmarks/world_inpainting.py writes the world example's job
            script = DOCS.parents[1] / words[1]
            monkeypatch.setattr(sys, "argv", [str(script), *words[2:]])
            runpy.run_path(str(script), run_name="__main__")
            continue
        args = words[1:] + (["--steps", "2"] if "--from" not in words else [])
        assert main([*args, "--quiet"]) == 0, words
    world = [words for words in commands if "world-inpainting/job.yaml" in words]
    assert len(world) == 1 and Path("world-inpainting/msdiff-00001.png").is_file()
    assert len(list(Path("outputs").glob("msdiff-?????.png"))) == len(commands) - 2  # the world's: beside its job


def test_the_page_reads_no_picture_or_mask_file_a_visitor_names(files, monkeypatch):
    """The page reads a picture or a mask image only as the visitor's own file: an API job names them among
    its request's uploads (anything else is refused), an imported job has them found by file name among the
    visitor's files (or left out with a note); no path a visitor names is read or probed on the server."""
    from msdiffusion.app import jobs
    from msdiffusion.app.page_jobs import PageModels, job_to_page, picture_files_from_uploads
    from msdiffusion.errors import UserInputError

    server_file = str(files / "room.jpg")
    subject = {"image": "dog.jpg", "phrase": "dog", "box": [0.1, 0.1, 0.9, 0.9]}
    sent = {"dog.jpg": "/uploads/dog.jpg", "room.jpg": "/uploads/room.jpg"}  # the request's uploads
    for job in (
        {"prompt": "a dog", "init_image": server_file, "subjects": [subject]},
        {"prompt": "a dog", "init_image": "sofa.jpg", "subjects": [subject]},  # a file name, but not uploaded
        {"prompt": "a dog", "init_image": "room.jpg", "inpaint": "/etc/hostname", "subjects": [subject]},
        {"prompt": "a dog", "subjects": [{**subject, "mask": server_file}]},
    ):
        with pytest.raises(UserInputError, match="is not among the uploaded images"):
            picture_files_from_uploads(job, sent)
    polygon = [[0, 0], [1, 0], [1, 1]]
    job = {
        "prompt": "a dog",
        "init_image": "room.jpg",
        "inpaint": "subjects",
        "subjects": [{**subject, "mask": "dog-region.png"}, {**subject, "mask": polygon}],
    }
    uploads = {"room.jpg": "/uploads/room.jpg", "dog-region.png": "/uploads/dog-region.png"}
    named = picture_files_from_uploads(job, uploads)
    assert named == {"init_image": ["/uploads/room.jpg"], "masks": ["/uploads/dog-region.png"]}
    assert job["init_image"] == "/uploads/room.jpg" and job["inpaint"] == "subjects"
    assert job["subjects"][0]["mask"] == "/uploads/dog-region.png" and job["subjects"][1]["mask"] == polygon

    opened, probed = [], []
    monkeypatch.setattr(jobs, "picture_size", lambda path, what="init_image": opened.append(path))
    real_path = jobs._path
    monkeypatch.setattr(
        jobs, "_path", lambda value, *args, **kwargs: probed.append(value) or real_path(value, *args, **kwargs)
    )
    data = {
        "prompt": "a dog",
        "init_image": server_file,
        "strength": 0.5,
        "subjects": [{**subject, "mask": server_file}],
    }
    models = PageModels("tiny-random", "tiny-random", "tiny-random")
    settings, subjects, notes = job_to_page(data, lambda name: None, models)
    assert not opened and server_file not in probed
    assert data["subjects"][0]["mask"] == server_file  # the caller's job is left as it was
    assert settings["picture"] is None and settings["strength"] == 0.5 and subjects[0]["region"] == ""
    assert any(note.startswith("upload 'room.jpg' as the picture to work on") for note in notes)
    assert any(note.startswith("subject 1: paint its region again") for note in notes)
