"""Every command and snippet of README.md runs, on tiny local models.

The only substitutions: hub ids become folders of tiny random models saved by the test, and steps
and sizes are made small (by appending `--steps`/`--size` flags, which override, or by replacing
the numbers in the Python snippet). `pip` lines and the test command are run by CI (.ci/run).
"""

import re
import runpy
import shlex
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from msdiffusion.app.cli import main
from msdiffusion.tiny import save_tiny_models

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_IDS = {
    "stabilityai/stable-diffusion-xl-base-1.0": "base",
    "doge1516/MS-Diffusion": "released_adapter",
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": "image_encoder",
}


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    models = save_tiny_models(tmp_path / "models")
    rng = np.random.default_rng(0)
    for name in ("dog.jpg", "cat.jpg"):
        PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return {hub: str(models[key]) for hub, key in HUB_IDS.items()}


def localize(text, paths):
    for hub, path in paths.items():
        text = text.replace(hub, path)
    return text


@pytest.mark.slow
def test_readme_shell_commands(workdir, capsys, monkeypatch):
    job = localize(blocks("yaml")[0], workdir)
    Path("job.yaml").write_text(job)
    commands = [line.split("#")[0].strip() for block in blocks("bash") for line in block.splitlines()]
    # `msdiff ui` serves until stopped: tests/test_ui.py runs the page (and the README's API snippet).
    commands = [
        c
        for c in commands
        if (c.startswith("msdiff ") and not c.startswith("msdiff ui")) or c.startswith("python benchmarks/")
    ]
    assert len(commands) >= 5
    for command in commands:
        words = shlex.split(localize(command, workdir))
        if words[0] == "python":  # a benchmark script that writes what the next commands use
            script = README.parent / words[1]
            monkeypatch.setattr(sys, "argv", [str(script), *words[2:]])
            runpy.run_path(str(script), run_name="__main__")
            continue
        args = words[1:]
        if args[0] in ("demo", "generate") and "--from" not in args:
            args += ["--steps", "2", "--size", "64x64"]
        assert main(args) == 0, command
    assert Path("msdiff-demo/msdiff-00001.png").is_file()
    assert len(list(Path("outputs").glob("msdiff-?????.png"))) == 4 + 1 + 1 + 1  # job, override, --from, flags


def test_readme_python_snippet(workdir):
    code = localize(blocks("python")[0], workdir)
    code = code.replace("num_inference_steps=30", "num_inference_steps=2").replace(
        "height=768, width=1344", "height=64, width=96"
    )
    exec(compile(code, "README.md", "exec"), {})
    assert PIL.Image.open("dog-and-cat.png").size == (96, 64)


def test_every_readme_job_file_is_a_valid_job(workdir):
    """The README's job files (the reference job, the few-step example) pass the job checks as written."""
    import textwrap

    import yaml

    from msdiffusion.app.jobs import job_from_dict

    jobs = blocks("yaml")
    assert len(jobs) >= 2
    for text in jobs:
        job = job_from_dict(yaml.safe_load(textwrap.dedent(text)), "README.md", Path.cwd())
        assert job.subjects and job.prompt
