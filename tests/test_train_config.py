"""Training config: defaults follow the recipe, files and flags combine, bad configs get clear errors."""

from __future__ import annotations

import json

import pytest
import yaml
from train_fixtures import reset_accelerate

from msdiffusion.app.cli import main
from msdiffusion.train import ConfigError, TrainConfig, load_config


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """Commands here may start an Accelerator; leave no process-wide accelerate state to other tests."""
    yield
    reset_accelerate()


REQUIRED = {"base": "models/base", "image_encoder": "models/encoder", "manifest": "data/manifest.jsonl"}


def test_defaults_are_the_released_recipe():
    config = TrainConfig(**REQUIRED).validate()
    assert (config.learning_rate, config.weight_decay) == (1e-4, 0.01)
    assert (config.drop_image, config.drop_text, config.drop_both, config.drop_grounding) == (0.05, 0.05, 0.05, 0.1)
    assert config.max_subjects == 4 and config.ms_scale == 1.0 and config.optimizer == "adamw"
    assert config.resampler == {} and config.num_dummy_tokens == 4


def test_file_then_flags(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({**REQUIRED, "learning_rate": 3e-5, "snr_gamma": 5.0, "resampler": {"depth": 2}}))
    assert (
        main(
            [
                "train",
                "--config",
                str(path),
                "--print-config",
                "--train-batch-size",
                "4",
                "--snr-gamma",
                "none",
                "--no-mask-references",
                "--mixed-precision",
                "bf16",
                "--resampler",
                "{depth: 3}",
            ]
        )
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["learning_rate"] == 3e-5  # from the file
    assert printed["train_batch_size"] == 4 and printed["snr_gamma"] is None and printed["mask_references"] is False
    assert printed["mixed_precision"] == "bf16" and printed["resampler"] == {"depth": 3}

    as_json = tmp_path / "train.json"
    as_json.write_text(json.dumps({**REQUIRED, "max_train_steps": 10}))
    assert load_config(as_json).max_train_steps == 10
    assert main(["train", "--config", str(as_json), "--print-config"]) == 0  # python -m msdiffusion train
    assert "max_train_steps: 10" in capsys.readouterr().out


def test_flags_alone_suffice(capsys):
    args = ["train", "--base", "b", "--image-encoder", "e", "--manifest", "m.jsonl", "--print-config"]
    assert main(args) == 0
    assert yaml.safe_load(capsys.readouterr().out)["manifest"] == "m.jsonl"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"learnig_rate": 1e-4}, "learnig_rate: unknown field (did you mean 'learning_rate'?)"),
        ({"learning_rate": "fast"}, "learning_rate: expected a number, got 'fast'"),
        ({"learning_rate": 0}, "learning_rate: must be positive, got 0"),
        ({"max_subjects": 0}, "max_subjects: must be at least 1, got 0"),
        ({"mixed_precision": "fp8"}, "mixed_precision: must be one of no, fp16, bf16, got 'fp8'"),
        ({"crop": "centre"}, "crop: must be one of random, center, got 'centre' (did you mean 'center'?)"),
        (
            {"drop_image": 0.5, "drop_text": 0.5, "drop_both": 0.5},
            "drop_image + drop_text + drop_both: must be at most 1",
        ),
        ({"drop_grounding": 1.5}, "drop_grounding: must be a probability in [0, 1], got 1.5"),
        ({"resolution": 1020}, "resolution: must be a positive multiple of 8"),
        ({"resolution": 1000, "buckets": True}, "resolution: must be a multiple of 64 with buckets"),
        ({"lr_scheduler": "exponential"}, "lr_scheduler: must be one of constant"),
        ({"resampler": {"depht": 2}}, "resampler.depht: unknown field (did you mean 'depth'?"),
        ({"resampler": {"output_dim": 2048}}, "resampler.output_dim: follows from the models"),
        ({"resampler": {"depth": 2}, "init_adapter": "ms_adapter.bin"}, "resampler: cannot be set with init_adapter"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing: expected true or false, got 'yes'"),
        ({"snr_gamma": -1.0}, "snr_gamma: must be positive"),
        ({"high_noise_share": 1.5}, "high_noise_share: must be a probability in [0, 1]"),
        ({"cache": "c", "buckets": True}, "reference_size: required with both cache and buckets"),
        (
            {
                "validation": [
                    {
                        "prompt": "a dog",
                        "subjects": [{"image": "nowhere.png", "phrase": "dog", "box": [0.5, 0, 0.2, 1]}],
                    }
                ]
            },
            "validation[0].subjects[0].image: must be an existing image file",
        ),
        ({"validation": [{"prompt": "a dog", "subjects": []}]}, "validation[0].subjects: required, a non-empty list"),
    ],
)
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, {**REQUIRED, **values})
    assert message in str(error.value)


def test_named_sets_train_from_their_files(capsys):
    """`msdiff-world` names the shipped folders, as in generation; `tiny-random` has no files to read."""
    from msdiffusion.loading import world_model_paths, world_weights_present

    assert main(["train", "--base", "tiny-random", "--image-encoder", "tiny-random", "--manifest", "m.jsonl"]) == 2
    err = capsys.readouterr().err
    for field, part in (("base", "base"), ("image_encoder", "image_encoder")):
        assert f"{field}: 'tiny-random' is built in memory" in err and f"give FOLDER/{part}" in err
    with pytest.raises(ConfigError, match=r"base: expected a string or null"):  # not a name: the type check speaks
        load_config(None, {**REQUIRED, "base": ["msdiff-world"]})
    if not world_weights_present():
        pytest.skip("the world's shipped weights are not in this checkout")
    config = load_config(
        None, {**REQUIRED, "base": "msdiff-world", "image_encoder": "msdiff-world", "init_adapter": "msdiff-world"}
    )
    paths = world_model_paths()
    assert (config.base, config.image_encoder, config.init_adapter) == (
        paths["base"],
        paths["image_encoder"],
        paths["adapter"],
    )


def test_every_problem_is_reported_at_once_and_required_fields(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": -1, "train_batch_size": 0}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"problem(s) in the training config in {path}" in err
    for expected in (
        "base: required",
        "image_encoder: required",
        "manifest: required",
        "learning_rate: must be positive",
        "train_batch_size: must be at least 1",
    ):
        assert expected in err
    assert "Traceback" not in err


def test_unreadable_files(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1e-4\n")
    assert main(["train", "--config", str(broken)]) == 2
    assert f"cannot parse {broken}" in capsys.readouterr().err
    listed = tmp_path / "list.yaml"
    listed.write_text("- base: x\n")
    assert main(["train", "--config", str(listed)]) == 2
    assert "expected a mapping of field: value at the top level" in capsys.readouterr().err


def test_bad_flag_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--learning-rate", "fast"])
    assert exit_info.value.code == 2
    assert "argument --learning-rate: expected a number, got 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resampler", "[depth"])
    assert "argument --resampler: expected YAML (a mapping), got '[depth'" in capsys.readouterr().err


def test_a_run_that_cannot_start_is_a_clear_error(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "missing.png", "caption": "a dog", "subjects": []}\n')
    args = [
        "train",
        "--base",
        str(tmp_path / "no-base"),
        "--image-encoder",
        "e",
        "--manifest",
        str(manifest),
        "--output-dir",
        str(tmp_path / "run"),
        "--report-to",
        "none",
    ]
    assert main(args) == 2
    assert "no-base" in capsys.readouterr().err


def test_sharded_distributed_training_is_refused_with_the_alternative():
    from accelerate.utils import DistributedType

    from msdiffusion.train.loop import check_distributed_type

    for supported in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        check_distributed_type(supported)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ConfigError, match=f"{sharded.value} is not supported.*accelerate launch --multi_gpu"):
            check_distributed_type(sharded)
