"""Inputs are checked before any model loads: one line `msdiff COMMAND: error: ...`, exit 2, no traceback."""

import numpy as np
import PIL.Image
import pytest
import torch

from msdiffusion import loading, settings
from msdiffusion.app import jobs
from msdiffusion.app.cli import main
from msdiffusion.tiny import save_tiny_models
from msdiffusion.weight_files import safetensors_problem, torch_file_problem


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def files(tmp_path, monkeypatch, models):
    """Good and bad inputs in the working directory; loading a model fails the test."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save("dog.jpg")
    data = (tmp_path / "dog.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "garbage.bin").write_bytes(b"\x01garbage" * 100)
    weights = (models["adapter"] / "ms_adapter.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(weights[: len(weights) // 2])

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_pipeline", no_loading)
    return tmp_path


def run(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    return code, errors


def generate_args(models, *extra, subject=("dog.jpg", "dog", "0.1,0.2,0.5,0.8")):
    return [
        "generate",
        "--base",
        str(models["base"]),
        "--adapter",
        str(models["adapter"]),
        "--image-encoder",
        str(models["image_encoder"]),
        "--prompt",
        "a dog",
        "--steps",
        "2",
        "--size",
        "64x64",
        "--subject",
        *subject,
        *extra,
    ]


@pytest.mark.parametrize(
    "image,message",
    [
        ("truncated.jpg", "is a damaged image"),
        ("notes.jpg", "is not an image PIL can read"),
        (".", "is a folder, not an image file"),
    ],
)
def test_unreadable_subject_images(files, models, capsys, image, message):
    code, errors = run(capsys, *generate_args(models, subject=(image, "dog", "0.1,0.2,0.5,0.8")))
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("msdiff generate: error: subjects[0].image (dog)") and message in errors[0]


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--base", "./nobase", "base: './nobase' does not exist (expected a diffusers SDXL folder"),
        ("--image-encoder", "./noenc", "image_encoder: './noenc' does not exist"),
        ("--adapter", "nonexistent_dir", "adapter: 'nonexistent_dir' does not exist (expected an ms_adapter.bin file"),
        ("--adapter", "garbage.bin", "not a torch checkpoint (expected a file written by torch.save"),
        ("--adapter", "truncated.safetensors", "truncated: its header describes"),
        ("--base", "truncated.safetensors", "base: "),
        ("--base", "dog.jpg", "is not a model file"),
        ("--image-encoder", ".", "is a folder without config.json"),
    ],
)
def test_model_locations(files, models, capsys, flag, value, message):
    args = generate_args(models)
    args[args.index(flag) + 1] = value
    code, errors = run(capsys, *args)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("msdiff generate: error: ") and message in errors[0], errors[0]


def test_hub_id_not_cached_offline_fails_at_once(files, models, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for flag, repo in (("--base", "someone/not-cached-sdxl"), ("--adapter", "someone/not-cached-adapter")):
        args = generate_args(models)
        args[args.index(flag) + 1] = repo
        code, errors = run(capsys, *args)
        assert code == 2 and f"{repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in errors[0]
        assert f"hf download {repo}" in errors[0]


def test_unreachable_hub_fails_at_once(files, models, capsys, monkeypatch):
    from huggingface_hub import constants

    from msdiffusion import checks

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(checks, "hub_reachable", lambda: False)
    args = generate_args(models)
    args[args.index("--image-encoder") + 1] = "someone/not-cached-encoder"
    code, errors = run(capsys, *args)
    assert code == 2 and "cannot be reached (no network?)" in errors[0]


@pytest.mark.parametrize(
    "device,message",
    [
        ("foo", "device: 'foo' is not a device; use cpu, cuda, cuda:N or mps"),
        pytest.param("cuda", "cuda", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
        ("cuda:99", "cuda"),
        pytest.param(
            "mps",
            "'mps' (Apple GPU) is not available",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="has MPS"),
        ),
    ],
)
def test_devices(files, models, capsys, device, message):
    code, errors = run(capsys, *generate_args(models, "--device", device))
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--guidance", "-1"), "guidance: got -1.0; expected a number >= 0"),
        (("--scale", "-2"), "scale: got -2.0; expected a number >= 0"),
        (("--size", "8x8"), "--size: got '8x8'; expected"),
        (("--size", "100x100"), "multiples of 8"),
    ],
)
def test_generation_settings(files, models, capsys, extra, message):
    code, errors = run(capsys, *generate_args(models, *extra))
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


def test_subject_scale_and_negative_box_name_the_problem(files, models, capsys):
    code, errors = run(capsys, *generate_args(models, subject=("dog.jpg", "dog", "scale=-2")))
    assert code == 2 and "subjects[0].scale: got -2.0; expected a number >= 0" in errors[0]
    code, errors = run(capsys, *generate_args(models, subject=("dog.jpg", "dog", "-0.1,0.2,0.5,0.8")))
    assert code == 2 and len(errors) == 1
    assert "subjects[0].box: [-0.1, 0.2, 0.5, 0.8] is outside [0, 1]" in errors[0]


def test_start_step_past_steps_warns(files, models, capsys):
    with pytest.raises(AssertionError, match="a model was loaded"):  # valid: warned about, then loading starts
        main(generate_args(models, "--mask-threshold", "0.5", "--start-step", "5", "--steps", "3"))
    assert "warning: start_step 5 is not below steps 3: auto layout never takes over" in capsys.readouterr().err


def test_demo_size_is_validated(tmp_path, capsys):
    assert main(["demo", "--size", "100x100", "--output", str(tmp_path)]) == 2
    assert "size: got '100x100'" in capsys.readouterr().err


def test_size_accepts_one_number_and_jobs_accept_text():
    assert settings.parse_size("128") == [128, 128]
    assert settings.parse_size(128) == [128, 128]
    assert settings.parse_size("128x96") == [128, 96]
    assert settings.parse_size([1344, 768]) == [1344, 768]
    with pytest.raises(jobs.JobError, match="at least 64"):
        settings.parse_size("32x64")


def test_plus_in_an_existing_file_name_is_one_photo(tmp_path, monkeypatch):
    from msdiffusion.app.commands import _subject_from_flag

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dog+1.jpg").write_bytes(b"")
    assert _subject_from_flag(["dog+1.jpg", "dog"])["image"] == "dog+1.jpg"
    assert _subject_from_flag(["dog.jpg+cat.jpg", "dog"])["image"] == ["dog.jpg", "cat.jpg"]


def test_convert_refuses_a_file_name_for_the_folder_format(tmp_path, models, capsys):
    assert main(["convert", str(models["released_adapter"]), str(tmp_path / "out.safetensors")]) == 2
    assert "DEST is a .bin file (released format) or a folder" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_inspect_truncated_safetensors_is_one_line(files, capsys):
    code, errors = run(capsys, "inspect", "truncated.safetensors")
    assert code == 2 and errors == [errors[0]] and "truncated" in errors[0]


def test_file_checks(files, models):
    assert safetensors_problem(models["adapter"] / "ms_adapter.safetensors") is None
    assert "truncated" in safetensors_problem(files / "truncated.safetensors")
    assert torch_file_problem(models["released_adapter"]) is None
    assert "not a torch checkpoint" in torch_file_problem(files / "garbage.bin")
    data = models["released_adapter"].read_bytes()
    (files / "cut.bin").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in torch_file_problem(files / "cut.bin")


def test_train_and_bench_check_models_first(files, models, capsys):
    (files / "m.jsonl").write_text("")
    code, errors = run(
        capsys, "train", "--base", "./nobase", "--image-encoder", str(models["image_encoder"]), "--manifest", "m.jsonl"
    )
    assert code == 2 and "base: './nobase' does not exist" in errors[0], errors
    code, errors = run(
        capsys,
        "bench",
        "run",
        "--photos",
        str(files),
        "--output",
        "run",
        "--base",
        str(models["base"]),
        "--adapter",
        "garbage.bin",
        "--image-encoder",
        "./noenc",
    )
    assert code == 2 and "--image-encoder: './noenc' does not exist" in errors[0], errors


def test_job_options_of_the_python_api(tmp_path, monkeypatch, capsys):
    """loras, cpu_offload and variant/vae from flags and job files; `msdiff tiny-models` writes the models."""
    peft = pytest.importorskip("peft", reason="LoRA loading needs peft (in the test extra)")
    import json

    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    from msdiffusion.tiny import tiny_pipeline

    monkeypatch.chdir(tmp_path)
    donor = tiny_pipeline(seed=0).unet
    donor.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in donor.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    layers = convert_state_dict_to_diffusers(peft.get_peft_model_state_dict(donor))
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers={k: v for k, v in layers.items() if "processor" not in k}
    )
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save("dog.jpg")

    base = [
        "generate",
        "--base",
        "tiny-random",
        "--adapter",
        "tiny-random",
        "--image-encoder",
        "tiny-random",
        "--prompt",
        "a dog",
        "--subject",
        "dog.jpg",
        "dog",
        "0.1,0.1,0.9,0.9",
        "--size",
        "64",
        "--steps",
        "2",
        "--seed",
        "0",
        "--quiet",
        "--no-preview",
    ]
    assert main([*base, "--output", "plain"]) == 0
    assert (
        main([*base, "--output", "lora", "--lora", "lora/pytorch_lora_weights.safetensors", "0.8", "--cpu-offload"])
        == 0
    )
    plain = np.asarray(PIL.Image.open("plain/msdiff-00001.png"), dtype=float)
    with_lora = PIL.Image.open("lora/msdiff-00001.png")
    assert np.abs(plain - np.asarray(with_lora, dtype=float)).mean() > 0.5  # the LoRA changed the image
    record = json.loads(with_lora.text["msdiffusion-job"])
    assert record["loras"][0]["scale"] == 0.8 and record["cpu_offload"] is True
    # the recorded job makes the same image again
    assert main(["generate", "--from", "lora/msdiff-00001.png", "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(PIL.Image.open("outputs/msdiff-00001.png")), np.asarray(with_lora))

    assert main([*base, "--lora", "missing.safetensors"]) == 2
    assert "loras[0]: 'missing.safetensors' does not exist" in capsys.readouterr().err
    job = jobs.job_from_dict(
        {
            "base": "b/c",
            "adapter": "a/b",
            "prompt": "a dog",
            "variant": "fp16",
            "vae": "x/vae",
            "subjects": [{"image": "dog.jpg", "phrase": "dog"}],
            "size": "128x64",
        }
    )
    assert (job.variant, job.vae, job.size) == ("fp16", "x/vae", [128, 64])
    with pytest.raises(jobs.JobError, match=r"loras\[0\]: unknown field 'scal'"):
        jobs.job_from_dict(
            {
                "base": "b/c",
                "adapter": "a/b",
                "prompt": "a dog",
                "loras": [{"path": "x", "scal": 1}],
                "subjects": [{"image": "dog.jpg", "phrase": "dog"}],
            }
        )

    assert main(["tiny-models", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "base: tiny/base" in out and (tmp_path / "tiny/base/model_index.json").is_file()
    assert (tmp_path / "tiny/ms_adapter.bin").is_file() and (tmp_path / "tiny/image_encoder/config.json").is_file()
    assert main(["tiny-models", "tiny"]) == 2  # not over an existing folder
