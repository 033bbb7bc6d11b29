import json

import numpy as np
import PIL.Image
import pytest
import yaml

from msdiffusion.app.cli import main
from msdiffusion.app.jobs import PNG_METADATA_KEY
from msdiffusion.tiny import save_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def subject_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("dog.jpg", "cat.png"):
        PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def write_job(tmp_path, models, **overrides):
    job = {
        "base": str(models["base"]),
        "adapter": str(models["released_adapter"]),
        "image_encoder": str(models["image_encoder"]),
        "prompt": "a dog and a cat on the beach",
        "subjects": [
            {"image": "dog.jpg", "phrase": "dog", "box": [0.0, 0.25, 0.4, 0.75]},
            {"image": "cat.png", "phrase": "cat", "box": [0.6, 0.25, 1.0, 0.75], "scale": 0.8},
        ],
        "size": [168, 96],  # 1344x768 at 1/8
        "seed": 3,
        "images": 2,
        "steps": 2,
        "output": "out",
        "device": "cpu",
    }
    job.update(overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("generate", "demo", "convert", "inspect", "data", "bench"):
        assert command in text


def test_demo_random_writes_images(tmp_path, capsys):
    assert main(["demo", "--random", "--output", str(tmp_path / "demo"), "--steps", "2", "--size", "128x96"]) == 0
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["msdiff-00001-layout.png", "msdiff-00001-sheet.png", "msdiff-00001.png"]
    out = capsys.readouterr().out
    assert "TINY RANDOM" in out and "not quality" in out
    assert PIL.Image.open(tmp_path / "demo/msdiff-00001.png").size == (128, 96)


def test_demo_random_refuses_real_models(tmp_path, capsys):
    assert main(["demo", "--random", "--base", "b", "--adapter", "a", "--image-encoder", "e"]) == 2
    assert "--random" in capsys.readouterr().err


def test_generate_job_file_non_square_and_regenerate_from_png(tmp_path, models, subject_files, monkeypatch):
    job = write_job(tmp_path, models)
    assert main(["generate", str(job), "--quiet"]) == 0
    out = tmp_path / "out"
    images = sorted(out.glob("msdiff-0000?.png"))
    assert [p.name for p in images] == ["msdiff-00001.png", "msdiff-00002.png"]
    assert (out / "msdiff-00001-layout.png").is_file()
    first = PIL.Image.open(images[0])
    assert first.size == (168, 96)
    record = json.loads(first.text[PNG_METADATA_KEY])
    assert record["seed"] == 3 and record["images"] == 1 and record["subjects"][1]["scale"] == 0.8
    assert json.loads(PIL.Image.open(images[1]).text[PNG_METADATA_KEY])["seed"] == 4
    monkeypatch.chdir(tmp_path / "elsewhere" if (tmp_path / "elsewhere").mkdir() is None else tmp_path)
    assert main(["generate", "--from", str(images[1]), "--quiet"]) == 0  # regenerate image 2 from itself
    again = tmp_path / "elsewhere" / "outputs" / "msdiff-00001.png"  # into outputs/ as any run, not beside the PNG
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(again)), np.asarray(PIL.Image.open(images[1])))


def test_generate_never_overwrites_an_image_another_run_saved_meanwhile(tmp_path, models, subject_files, monkeypatch):
    from msdiffusion.app import jobs

    # Another run into the same folder saved msdiff-00001.png after this run listed the folder.
    out = tmp_path / "out"
    out.mkdir()
    (out / "msdiff-00001.png").write_bytes(b"the other run's image")
    listed_before = iter(["msdiff-00001"])
    real_next_stem = jobs._next_stem
    monkeypatch.setattr(jobs, "_next_stem", lambda folder: next(listed_before, None) or real_next_stem(folder))
    assert main(["generate", str(write_job(tmp_path, models, images=1)), "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("msdiff-0000?.png")) == ["msdiff-00001.png", "msdiff-00002.png"]
    assert (out / "msdiff-00001.png").read_bytes() == b"the other run's image"
    assert json.loads(PIL.Image.open(out / "msdiff-00002.png").text[PNG_METADATA_KEY])["seed"] == 3
    assert (out / "msdiff-00002-layout.png").is_file()


def test_generate_from_flags_with_auto_layout_masks(tmp_path, subject_files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "generate",
            "--base",
            "tiny-random",
            "--adapter",
            "tiny-random",
            "--image-encoder",
            "tiny-random",
            "--prompt",
            "a dog and a cat",
            "--subject",
            "dog.jpg+cat.png",
            "dog",
            "0,0,0.5,1",
            "--subject",
            "cat.png",
            "cat",
            "scale=0.5",
            "--size",
            "64x64",
            "--steps",
            "3",
            "--mask-threshold",
            "0.5",
            "--start-step",
            "2",
            "--output",
            "flags",
            "--quiet",
            "--seed",
            "1",
        ]
    )
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "flags").iterdir())
    assert "msdiff-00001-mask0-dog.png" in names and "msdiff-00001-mask1-cat.png" in names
    record = json.loads(PIL.Image.open(tmp_path / "flags/msdiff-00001.png").text[PNG_METADATA_KEY])
    assert len(record["subjects"][0]["image"]) == 2 and record["subjects"][1]["box"] == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"sise": [64, 64]}, "unknown field 'sise' (did you mean 'size'?)"),
        ({"prompt": None}, "prompt: required field is missing"),
        (
            {"size": [100, 64]},
            "size: got [100, 64]; expected [width, height] or WIDTHxHEIGHT in pixels, multiples of 8",
        ),
        ({"steps": "many"}, "steps: got 'many'; expected a positive integer"),
        ({"images": 0}, "images: got 0; expected a positive integer"),
        ({"mask_threshold": 2}, "mask_threshold: got 2; expected a number in [0, 1)"),
        ({"dtype": "fp8"}, "dtype: got 'fp8'; expected one of fp32, fp16, bf16"),
        ({"guidance": True}, "guidance: got True; expected a number"),
        ({"subjects": "dog.jpg"}, "subjects: got 'dog.jpg'; expected a list of {image, phrase, box, scale}"),
        (
            {"subjects": [{"image": "dog.jpg", "phrase": "dog", "bx": [0, 0, 1, 1]}]},
            "subjects[0]: unknown field 'bx' (did you mean 'box'?)",
        ),
        (
            {"subjects": [{"image": "dog.jpg", "phrase": "dog", "box": [0, 0, 1.5, 1]}]},
            "subjects[0].box: [0.0, 0.0, 1.5, 1.0] is outside [0, 1]",
        ),
        ({"subjects": [{"image": "missing.jpg", "phrase": "dog"}]}, "subjects[0].image: 'missing.jpg' does not exist"),
        ({"subjects": [{"image": "dog.jpg"}]}, "subjects[0]: needs `image`"),
        ({"subjects": [{"image": "dog.jpg", "phrase": "dog", "scale": "big"}]}, "subjects[0].scale: got 'big'"),
        ({"controlnet": {"model": "x"}}, "controlnet: needs `model`"),
    ],
)
def test_bad_job_files_get_one_clear_message(tmp_path, models, subject_files, capsys, overrides, message):
    job = write_job(tmp_path, models, **overrides)
    assert main(["generate", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msdiff generate: error: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("base: [unclosed\n")
    assert main(["generate", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML/JSON" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", "--subject", "a.jpg"]) == 2
    assert "--subject IMAGE PHRASE" in capsys.readouterr().err


def test_convert_and_inspect(tmp_path, models, capsys):
    assert main(["convert", str(models["released_adapter"]), str(tmp_path / "project")]) == 0
    assert (tmp_path / "project/ms_adapter.safetensors").is_file()
    assert main(["convert", str(tmp_path / "project"), str(tmp_path / "back.bin")]) == 0
    assert main(["convert", str(tmp_path / "project"), str(tmp_path / "back.bin")]) == 2  # no silent overwrite
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "back.bin")]) == 0
    text = capsys.readouterr().out
    assert "released" in text and "16 tokens per subject" in text
    assert main(["inspect", str(tmp_path / "project"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"].startswith("project") and info["resampler"]["dim"] == 128
    assert main(["inspect", str(tmp_path / "missing.bin")]) == 2


def _png_with_job(path, text: str):
    import PIL.PngImagePlugin

    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(PNG_METADATA_KEY, text)
    PIL.Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_hostile_pngs_on_from_are_one_line_each_naming_the_png(tmp_path, models, subject_files, capsys, monkeypatch):
    """Whatever a PNG's job holds, `--from` answers with one line (exit 2) that names the PNG, and a
    photo named relative to the PNG is looked for beside the PNG, not in the current folder."""
    job = {"base": str(models["base"]), "adapter": str(models["released_adapter"])}
    job |= {"image_encoder": str(models["image_encoder"]), "prompt": "a dog", "steps": 1, "size": [64, 64]}
    subject = {"image": "dog.jpg", "phrase": "dog", "box": [0, 0, 1, 1]}
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    cases = {
        "deep": ("[" * 30000 + "]" * 30000, "not valid JSON"),
        "subjects": (json.dumps({**job, "subjects": 5}), "subjects: got 5"),
        "image": (
            json.dumps({**job, "subjects": [{**subject, "image": 3}]}),
            "subjects[0].image: expected a file path",
        ),
        "seed": (json.dumps({**job, "seed": 2**70, "subjects": [subject]}), "seed: got 1180591620717411303424"),
        "missing": (json.dumps({**job, "subjects": [subject]}), "pngs/dog.jpg' does not exist"),  # beside the PNG
    }
    monkeypatch.chdir(tmp_path)  # dog.jpg is here, not beside the PNGs
    for name, (text, expected) in cases.items():
        png = _png_with_job(pngs / f"{name}.png", text)
        assert main(["generate", "--from", str(png), "--output", str(tmp_path / "out"), "--quiet"]) == 2, name
        err = capsys.readouterr().err
        assert f"--from {png}" in err and expected in err and "Traceback" not in err, (name, err)
    (pngs / "dog.jpg").write_bytes((tmp_path / "dog.jpg").read_bytes())  # beside the PNG: it is found
    assert main(["generate", "--from", str(pngs / "missing.png"), "--output", str(tmp_path / "out"), "--quiet"]) == 0


def test_a_seed_torch_cannot_hold_is_refused_before_loading(tmp_path, subject_files, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["generate", "--base", "tiny-random", "--adapter", "tiny-random", "--image-encoder", "tiny-random"]
    base += ["--prompt", "a dog", "--subject", "dog.jpg", "dog", "--steps", "1", "--quiet"]
    assert main([*base, "--seed", str(2**63), "--output", "a"]) == 2
    assert "seed: got 9223372036854775808; expected an integer from 0 to 9223372036854775807" in capsys.readouterr().err
    assert main([*base, "--seed", str(2**63 - 1), "--images", "2", "--output", "b"]) == 2  # image 2 takes seed + 1
    assert main([*base, "--seed", str(2**63 - 2), "--images", "2", "--size", "64x64", "--output", "c"]) == 0


def test_a_phrase_not_in_the_prompt_and_an_output_that_is_a_file_are_refused(
    tmp_path, subject_files, capsys, monkeypatch
):
    """As `--help` says: the prompt must contain each phrase (exit 2, not a warning and an image);
    an --output that is a file is refused before any work, not after generating."""
    monkeypatch.chdir(tmp_path)
    base = ["generate", "--base", "tiny-random", "--adapter", "tiny-random", "--image-encoder", "tiny-random"]
    base += ["--steps", "1", "--size", "64x64", "--quiet"]
    assert main([*base, "--prompt", "a ring and a heart", "--subject", "dog.jpg", "star", "--output", "a"]) == 2
    err = capsys.readouterr().err
    assert "the phrase(s) 'star' are not in the prompt 'a ring and a heart'" in err, err
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").glob("*.png"))
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*base, "--prompt", "a dog", "--subject", "dog.jpg", "dog", "--output", "notes.txt"]) == 2
    assert "output: " in (err := capsys.readouterr().err) and "is a file; give a folder" in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine"
