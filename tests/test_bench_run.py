"""`msdiff bench run | score | report` on tiny random models, single- and multi-process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import pytest
import torch
from test_bench_tiny_models import noise_image, scoring_models  # noqa: F401  (session fixture)

from msdiffusion.app.cli import main
from msdiffusion.bench.definitions import load_benchmark, select_samples
from msdiffusion.bench.runner import BenchSettings, generate_items, sample_seed, shard, work_items

REPO = Path(__file__).resolve().parents[1]
# two buildable samples and one that needs living/cat1.jpg, which the photo folder below lacks
SELECTION = ["living_object.dog+backpack.p0", "object_scene.clock+mountain.p0", "living_living.cat+cat1.p0"]
PHOTOS = ["living/dog.jpg", "object/backpack.jpg", "object/clock.jpg", "scene/mountain.jpg", "living/cat.jpg"]


def test_seeds_depend_on_the_image_not_its_position():
    assert sample_seed(0, "a.p0", 0) == sample_seed(0, "a.p0", 0)
    assert (
        len(
            {sample_seed(0, "a.p0", 0), sample_seed(0, "a.p0", 1), sample_seed(0, "b.p0", 0), sample_seed(1, "a.p0", 0)}
        )
        == 4
    )


def test_shards_cover_every_item_once():
    items = work_items(select_samples(load_benchmark("msbench"), ["living_scene"]), 2)
    assert len(items) == 80
    for world in (1, 2, 3, 8):
        shards = [shard(items, rank, world) for rank in range(world)]
        assert sorted(i.image for s in shards for i in s) == sorted(i.image for i in items)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard(items, 2, 2)


class RecordingPipeline:
    """Records what the runner asks for and returns blank images."""

    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        import PIL.Image

        self.calls.append(kwargs)
        return SimpleNamespace(images=[PIL.Image.new("RGB", (8, 8)) for _ in kwargs["prompt"]])


def test_generate_items_batches_and_skips(tmp_path):
    photos = _photos(tmp_path / "photos")
    samples = [s for s in select_samples(load_benchmark("msbench"), SELECTION[:2])]
    items = work_items(samples, 2)
    settings = BenchSettings(
        base="base", adapter="adapter", image_encoder="encoder", seed=5, prompt_prefix="best quality, "
    )
    pipe, built = RecordingPipeline(), []
    result = generate_items(items, tmp_path / "out", photos, settings, lambda: built.append(1) or pipe, batch_size=3)
    assert (result.generated, result.skipped, len(built)) == (4, 0, 1)
    assert [len(call["prompt"]) for call in pipe.calls] == [3, 1]
    first = pipe.calls[0]
    assert first["prompt"][0] == "best quality, a dog and a backpack in a room"
    assert first["subject_phrases"][0] == ["dog", "backpack"]
    assert first["subject_boxes"][0] == [[0.0, 0.25, 0.5, 0.75], [0.5, 0.25, 1.0, 0.75]]
    assert [Path(p).name for p in first["subject_images"][0]] == ["dog.jpg", "backpack.jpg"]
    expected_seed = sample_seed(5, items[1].sample.sample_id, items[1].index)
    assert first["generator"][1].initial_seed() == expected_seed
    assert all((tmp_path / "out" / item.image).is_file() for item in items)

    # everything is on disk: nothing is generated and the pipeline is never built
    again = generate_items(items, tmp_path / "out", photos, settings, lambda: pytest.fail("pipeline loaded"))
    assert (again.generated, again.skipped) == (0, 4)


def _photos(directory: Path) -> Path:
    for k, name in enumerate(PHOTOS):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        noise_image(100 + k).save(directory / name, format="JPEG")
    return directory


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from msdiffusion.tiny import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def _run_args(models, photos, output, *extra):
    return [
        "bench",
        "run",
        "--photos",
        str(photos),
        "--output",
        str(output),
        "--only",
        *SELECTION,
        "--base",
        str(models["base"]),
        "--adapter",
        str(models["adapter"]),
        "--image-encoder",
        str(models["image_encoder"]),
        "--images-per-sample",
        "2",
        "--steps",
        "2",
        "--size",
        "64",
        "--seed",
        "3",
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_close(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-3)
    else:
        assert a == b


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_run_is_shardable_resumable_and_scored(tmp_path, tiny_models, scoring_models, capsys, monkeypatch):  # noqa: F811
    photos = _photos(tmp_path / "photos")

    # one process; one thread, like each process of the sharded run below (float sums depend on threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_run_args(tiny_models, photos, tmp_path / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "MS-Bench: 3 samples selected" in out
    assert "missing living/cat1.jpg (subject cat1: file not found): 1 samples cannot be built" in out
    assert "generated 4, 0 already on disk, of 4 images" in out
    images = sorted(p.name for p in (tmp_path / "one" / "images").rglob("*.png"))
    assert images == [
        "living_object.dog+backpack.p0_0.png",
        "living_object.dog+backpack.p0_1.png",
        "object_scene.clock+mountain.p0_0.png",
        "object_scene.clock+mountain.p0_1.png",
    ]

    # two processes under a real `accelerate launch`: the same files, byte for byte
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "msdiffusion",
        "bench",
        *_run_args(tiny_models, photos, tmp_path / "two")[1:],
    ]
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[process 0/2] generated 2" in done.stdout and "[process 1/2] generated 2" in done.stdout
    assert _files(tmp_path / "one") == _files(tmp_path / "two")

    # a second run finds everything on disk
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "one" / "images").rglob("*.png")}
    assert main(_run_args(tiny_models, photos, tmp_path / "one")) == 0
    assert "generated 0, 4 already on disk, of 4 images" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "one" / "images").rglob("*.png")}

    # resuming with other settings would mix images: refused
    assert main(_run_args(tiny_models, photos, tmp_path / "one", "--guidance", "3")) == 2
    assert "guidance: 7.5 -> 3.0" in capsys.readouterr().err
    assert main(_run_args(tiny_models, photos, tmp_path / "strict", "--require-all")) == 2
    assert "cannot be built" in capsys.readouterr().err

    manifest = [json.loads(line) for line in (tmp_path / "one" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 4
    record = manifest[0]
    assert record["seed"] == sample_seed(3, record["sample_id"], record["index"])
    assert record["settings"]["steps"] == 2 and record["settings"]["dtype"] == "fp32"
    assert record["settings"]["reference_combine"] == "concat"  # the pipelines' default, MS-Bench's
    assert record["subjects"][0]["reference"] == "living/dog.jpg"

    # score and report
    score_args = [
        "bench",
        "score",
        "--output",
        str(tmp_path / "one"),
        "--batch-size",
        "3",
        "--detection-threshold",
        "0",
        "--clip-model",
        str(scoring_models["clip"]),
        "--dino-model",
        str(scoring_models["dino"]),
        "--detector",
        str(scoring_models["owlv2"]),
    ]
    assert main(score_args) == 0
    assert "4 to score" in capsys.readouterr().out
    assert main(score_args) == 0  # scores are kept: nothing to redo
    assert "4 already scored, 0 to score" in capsys.readouterr().out
    assert main(score_args[:-1] + [str(scoring_models["grounding_dino"])]) == 2
    assert "--overwrite" in capsys.readouterr().err

    # a rescoring that dies after its first batch keeps that batch's scores (saved as it goes), then resumes
    import msdiffusion.app.bench_commands as bench_cli
    import msdiffusion.bench.scoring as scoring

    scores_file = tmp_path / "one" / "scores.jsonl"
    scored = scores_file.read_text()
    real_chunk, calls = scoring._score_chunk, []

    def dies_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_chunk(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(bench_cli, "SCORES_SAVE_INTERVAL_S", 0.0)
        patch.setattr(scoring, "_score_chunk", dies_on_the_second_batch)
        with pytest.raises(RuntimeError, match="killed"):
            main(score_args + ["--overwrite"])
    assert len(scores_file.read_text().splitlines()) == 3  # the first batch of 3
    assert not [p for p in (tmp_path / "one").iterdir() if p.name.startswith(".")]  # no temporaries
    capsys.readouterr()
    assert main(score_args) == 0
    assert "3 already scored, 1 to score" in capsys.readouterr().out
    lines, before = scores_file.read_text().splitlines(), scored.splitlines()
    assert lines[:3] == before[:3]  # kept as saved
    # the fourth was scored alone now, in a batch of 3 before: equal up to the batch's rounding
    _assert_close(json.loads(lines[3]), json.loads(before[3]))

    assert main(["bench", "report", "--output", str(tmp_path / "one"), "--grid-samples", "2"]) == 0
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    assert list(report["groups"]) == ["living_object", "object_scene"]
    assert report["overall"]["images"] == 4 and report["groups"]["object_scene"]["images"] == 2
    coverage = report["coverage"]
    assert coverage["benchmark_samples"] == 4488 and coverage["scored_samples"] == 2
    assert coverage["missing_references"]["living/cat1.jpg"] == 452  # and the 34 photos this test did not make
    assert "paper" not in report  # no verified MS-Bench figure: no paper row
    markdown = (tmp_path / "one" / "report.md").read_text()
    assert "| living_object | 2 |" in markdown and "| **overall** | 4 |" in markdown
    assert "missing reference `living/cat1.jpg`: 452 samples cannot be built" in markdown
    for group in ("living_object", "object_scene"):
        assert (tmp_path / "one" / "grids" / f"{group}.png").is_file()


def test_ablation_settings_reach_the_pipeline(tmp_path):
    """--boxes, --subject-scales, --references, --reference-combine and --drop-grounding as the pipeline gets them."""
    from msdiffusion.bench.definitions import BenchSample, BenchSubject
    from msdiffusion.bench.runner import BenchSettings, WorkItem, generate_items

    photos = tmp_path / "photos"
    for name in ("a", "b"):
        (photos / name).mkdir(parents=True)
        for k in range(3):
            PIL.Image.new("RGB", (8, 8), (k, 0, 0)).save(photos / name / f"{k}.png")
    subjects = (
        BenchSubject("dog", "dog", "a", (0.1, 0.1, 0.4, 0.4)),
        BenchSubject("cat", "cat", "b", (0.5, 0.5, 0.9, 0.9)),
    )
    sample = BenchSample("msbench", "g.000", "g", "a dog and a cat", subjects)
    calls = []

    class Recorder:
        def __call__(self, **kwargs):
            calls.append(kwargs)
            return type("Out", (), {"images": [PIL.Image.new("RGB", (8, 8))] * len(kwargs["prompt"])})()

    def run(output, **ablation):
        settings = BenchSettings(base="b", adapter="a", image_encoder="e", **ablation)
        generate_items([WorkItem(sample, 0)], tmp_path / output, photos, settings, Recorder)
        return calls[-1]

    default = run("default")
    assert default["subject_boxes"] == [[[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]]
    assert [p.name for p in default["subject_images"][0]] == ["0.png", "0.png"]  # one photo each
    assert default["subject_scales"] is None and default["drop_grounding_tokens"] is False
    assert default["reference_combine"] == "concat"
    assert run("whole", boxes="whole")["subject_boxes"] == [[[0.0, 0.0, 1.0, 1.0]] * 2]
    assert run("none", boxes="none")["subject_boxes"] == [[[0.0] * 4] * 2]
    assert run("scales", subject_scales=[1.0], scale=0.4)["subject_scales"] == [[1.0, 0.4]]
    several = run("refs", references=2, reference_combine="mean")
    assert [[p.name for p in images] for images in several["subject_images"][0]] == [["0.png", "1.png"]] * 2
    assert several["reference_combine"] == "mean"
    assert run("drop", drop_grounding=True)["drop_grounding_tokens"] is True
    with pytest.raises(ValueError, match="4 references per subject asked"):
        run("too-many", references=4)
