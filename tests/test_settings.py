"""One settings vocabulary and one loader: the mapping to pipeline keywords, named model sets, checks."""

from __future__ import annotations

import inspect

import pytest

from msdiffusion.app.jobs import job_from_dict
from msdiffusion.loading import NAMED_MODELS, TINY, WORLD, check_scheduler_name, named_set, named_settings
from msdiffusion.settings import GenerationSettings, ModelSettings, SettingsError, parse_size


def test_pipeline_arguments_are_the_pipelines_keywords():
    from diffusers import StableDiffusionXLPipeline

    from msdiffusion.pipelines import MSDiffusionXLPipeline

    settings = GenerationSettings(size=[1344, 768], steps=12, guidance=3.0, scale=0.4, negative_prompt="")
    arguments = settings.pipeline_arguments()
    assert (arguments["width"], arguments["height"]) == (1344, 768)
    assert (arguments["num_inference_steps"], arguments["guidance_scale"], arguments["ms_scale"]) == (12, 3.0, 0.4)
    assert arguments["negative_prompt"] is None  # "" is no negative prompt, as in job files
    # the subject keywords are the project's; the rest go on to diffusers' SDXL pipeline
    accepted = {*inspect.signature(MSDiffusionXLPipeline.__call__).parameters}
    accepted |= {*inspect.signature(StableDiffusionXLPipeline.__call__).parameters}
    assert set(arguments) <= accepted, set(arguments) - accepted


def test_a_named_base_brings_its_defaults_and_the_job_overrides_them(tmp_path):
    import PIL.Image

    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    subject = {"image": str(tmp_path / "a.png"), "phrase": "ring"}
    world = {"base": WORLD, "adapter": WORLD, "image_encoder": WORLD, "prompt": "a ring", "subjects": [subject]}
    job = job_from_dict(world)
    assert (job.size, job.steps, job.guidance, job.scale) == ([64, 64], 25, 5.0, 1.0)
    assert job.negative_prompt is None
    assert job_from_dict({**world, "size": 128, "steps": 4}).generation_settings() == named_settings(
        WORLD, size=[128, 128], steps=4
    )
    plain = job_from_dict({**world, "base": "owner/sdxl", "adapter": "owner/adapter", "image_encoder": "owner/enc"})
    assert (plain.size, plain.steps) == ([1024, 1024], 30)  # SDXL's


def test_named_sets_combine_as_they_can():
    assert named_set(ModelSettings(base=WORLD, adapter=WORLD, image_encoder=WORLD)) is NAMED_MODELS[WORLD]
    # a world base with an adapter trained on it elsewhere
    assert named_set(ModelSettings(base=WORLD, adapter="runs/adapter", image_encoder=WORLD)) is NAMED_MODELS[WORLD]
    with pytest.raises(SettingsError, match="'tiny-random' is a whole model set"):
        named_set(ModelSettings(base=TINY, adapter="runs/adapter", image_encoder=TINY))
    for name, value in (
        ("vae", "madebyollin/sdxl-vae-fp16-fix"),
        ("variant", "fp16"),
        ("adapter_weight_name", "a.bin"),
    ):
        with pytest.raises(SettingsError, match=f"'tiny-random' is a whole model set .*: {name} would be ignored"):
            named_set(ModelSettings(base=TINY, adapter=TINY, image_encoder=TINY, **{name: value}))
    from msdiffusion.settings import ControlNetSpec

    with pytest.raises(SettingsError, match="has no ControlNet"):
        named_set(ModelSettings(base=WORLD, adapter=WORLD, image_encoder=WORLD, controlnet=ControlNetSpec("c", "i")))


def test_settings_are_checked_with_the_same_words_everywhere():
    with pytest.raises(SettingsError, match="size: got '8x8'"):
        parse_size("8x8")
    with pytest.raises(SettingsError, match="did you mean 'DPMSolverMultistepScheduler'"):
        check_scheduler_name("DPMSolverMultistepSchedular")
    check_scheduler_name("EulerDiscreteScheduler")
    from msdiffusion.train.config import ConfigError, TrainConfig

    config = TrainConfig(base="b", image_encoder="e", manifest="m", validation_settings={"guidance_scale": 3})
    with pytest.raises(ConfigError) as refused:
        config.validate()
    assert any("did you mean 'guidance'" in problem for problem in refused.value.problems)
