"""docs/training.md: every command uses real flags, and the single-machine walkthrough runs as written.

The walkthrough runs each `msdiff` command of the page in order, in a folder holding captioned
photos, with only these changes: hub ids become tiny random models saved by the test, and flags
are appended that make the run CPU-sized (64 px, two steps, no workers, a small resampler) or, for
`data build`, let random detector weights keep boxes. Commands that need GPUs or several machines
(`accelerate launch --multi_gpu ...`) are checked by parsing them with accelerate's own parser;
tests/test_train_distributed.py launches two processes for real.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import tomllib
from tiny_detectors import save_tiny_detector_and_segmenter
from train_fixtures import reset_accelerate, write_photos

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training.md"
EXAMPLE = ROOT / "examples" / "train" / "sdxl.yaml"


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """Commands here may start an Accelerator; leave no process-wide accelerate state to other tests."""
    yield
    reset_accelerate()


def doc_commands() -> list[str]:
    """Command lines of the page's ```bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _tokens(command: str) -> list[str]:
    tokens = shlex.split(command)
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # leading environment variables
        tokens = tokens[1:]
    return tokens


def test_every_command_uses_real_flags():
    from accelerate.commands.launch import launch_command_parser

    from msdiffusion.app.cli import build_parser, main

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    commands = doc_commands()
    assert len(commands) >= 10
    kinds = set()
    for command in commands:
        tokens = _tokens(command)
        if tokens[0] == "msdiff":
            build_parser().parse_args(tokens[1:])  # exits (fails the test) on an unknown flag
            kinds.add(" ".join(tokens[:2]))
        elif tokens[:2] == ["accelerate", "launch"]:
            args = launch_command_parser().parse_args(tokens[2:])
            assert args.module and args.training_script == "msdiffusion", command
            assert args.training_script_args[0] == "train", command
            assert main([*args.training_script_args, "--print-config"]) == 0, command
            kinds.add("accelerate launch")
        elif tokens[:2] == ["pip", "install"]:
            wanted = re.search(r"\[(.*)\]", tokens[-1])[1].split(",")
            assert set(wanted) <= set(extras), command
        else:
            pytest.fail(f"docs/training.md runs a command this test does not check: {command}")
    assert {"msdiff data", "msdiff train", "msdiff generate", "accelerate launch"} <= kinds


def test_the_error_example_is_what_msdiff_prints(tmp_path, monkeypatch, capsys):
    from msdiffusion.app.cli import main

    shown = re.search(r"```\n(msdiff train: error: .*?)```", DOC.read_text(), re.S)[1]
    monkeypatch.chdir(tmp_path)
    Path("train.yaml").write_text("base: b\nimage_encoder: e\nmanifest: m.jsonl\nlearnig_rate: 1.0e-4\ncrop: centre\n")
    assert main(["train", "--config", "train.yaml"]) == 2
    assert capsys.readouterr().err == shown


def test_every_config_field_is_documented():
    from msdiffusion.train import TrainConfig

    reference = DOC.read_text().split("## Config reference", 1)[1]
    for field in dataclasses.fields(TrainConfig):
        assert f"`{field.name}`" in reference, field.name


@pytest.fixture
def walkthrough_folder(tmp_path, monkeypatch):
    from msdiffusion.tiny import save_tiny_models

    models = save_tiny_models(tmp_path / "models")
    models.update(save_tiny_detector_and_segmenter(tmp_path / "models"))
    write_photos(tmp_path / "photos", 4, size=(96, 80), name="{:04d}.jpg")
    monkeypatch.chdir(tmp_path)
    return models


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(walkthrough_folder, tmp_path):
    from msdiffusion.app.cli import main

    models = walkthrough_folder
    replace = {
        "stabilityai/stable-diffusion-xl-base-1.0": str(models["base"]),
        "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": str(models["image_encoder"]),
        "doge1516/MS-Diffusion": str(models["released_adapter"]),
        "examples/train/sdxl.yaml": str(EXAMPLE),
        # the example checkpoints every 2000 steps; this short run's last checkpoint is step 2
        "runs/ms-adapter/checkpoint-2000": "runs/ms-adapter/checkpoint-2",
    }
    small_run = [  # the example config names the hub models: the tiny ones replace them
        "--base",
        str(models["base"]),
        "--image-encoder",
        str(models["image_encoder"]),
        "--resolution",
        "64",
        "--train-batch-size",
        "1",
        "--max-train-steps",
        "2",
        "--dataloader-workers",
        "0",
        "--validation-steps",
        "2",
        "--validation-samples",
        "1",
        "--validation-settings",
        "{steps: 1}",
        "--log-every",
        "1",
    ]
    append = {
        "data build": [
            "--detector",
            str(models["detector"]),
            "--segmenter",
            str(models["segmenter"]),
            "--device",
            "cpu",
            "--score-threshold",
            "0.0",
            "--min-box-area",
            "0.001",
            "--max-overlap",
            "1.0",
        ],
        "data cache": ["--device", "cpu", "--dtype", "fp32", "--workers", "0"],
        "train": small_run,
        "generate": ["--size", "64x64", "--steps", "2", "--device", "cpu", "--dtype", "fp32"],
    }

    ran = []
    for command in doc_commands():
        tokens = _tokens(command)
        if tokens[0] != "msdiff":
            continue
        for old, new in replace.items():
            tokens = [new if t == old else t for t in tokens]
        kind = " ".join(tokens[1:3]) if tokens[1] == "data" else tokens[1]
        reset_accelerate()
        extra = append.get(kind, [])
        if kind == "train" and "--init-adapter" not in tokens:  # a new adapter: a small resampler
            extra = extra + ["--resampler", "{dim: 64, depth: 1, heads: 1, ff_mult: 1}"]
        assert main(tokens[1:] + extra) == 0, command
        ran.append(kind)

        if kind == "data build":
            assert Path("dataset/manifest.jsonl").is_file()
        if kind == "train" and "--init-adapter" not in tokens:
            out = (
                Path(tokens[tokens.index("--output-dir") + 1]) if "--output-dir" in tokens else Path("runs/ms-adapter")
            )
            assert (out / "ms_adapter.bin").is_file() and (out / "adapter" / "ms_adapter_config.json").is_file()
            assert (out / "validation" / "step-000002" / "0-layout.png").is_file()
    assert ran[:3] == ["data build", "data check", "data cache"]
    assert ran.count("train") >= 4 and ran[-1] == "generate"
    assert list(Path("outputs").glob("*.png"))
