"""`msdiff bench run | score | report --bench world` on untrained world models, on the CPU.

The models here are random (`save_untrained_models`), so nothing is asserted about quality: these
tests check the definition, the rendered references, generation through the benchmark runner
(world settings, resume, sharding), scoring with the world's evaluator and image encoder, and the
report. `test_scores_follow_the_pixels` checks the scorer on images drawn from the world itself.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from msdiffusion.app.cli import main
from msdiffusion.bench.definitions import load_benchmark, load_definition, select_samples
from msdiffusion.world.bench import expand_world, layout_checks, render_references
from msdiffusion.world.scenes import CLASSES, is_held_out

# a handful of generations: 1, 2 (touching), 2 (overlapping) and 4 subjects
SELECTION = ["one.000", "two_touching.000", "two_overlapping.001", "four.000"]


@pytest.fixture(scope="module")
def world_models(tmp_path_factory):
    from msdiffusion.world.bench import save_untrained_models

    return save_untrained_models(tmp_path_factory.mktemp("world_models"))


def test_definition():
    bench = load_benchmark("world")
    assert bench.summary() == "World bench: 144 combinations, 144 samples (2 images per sample by default)"
    assert bench.groups == ["one", "two", "two_same_class", "two_touching", "two_overlapping", "three", "four"]
    counts = {"one": 1, "two": 2, "two_same_class": 2, "two_touching": 2, "two_overlapping": 2, "three": 3, "four": 4}
    for sample in bench.samples:
        subjects = sample.subjects
        assert len(subjects) == counts[sample.group], sample
        assert all(is_held_out(s.identity) and s.phrase in CLASSES for s in subjects)
        assert len({s.identity for s in subjects}) == len(subjects)  # distinct identities
        assert all(0 <= s.box[0] < s.box[2] <= 1 and 0 <= s.box[1] < s.box[3] <= 1 for s in subjects)
        assert sample.prompt.startswith("a " + subjects[0].phrase)
        same = len({s.phrase for s in subjects}) == 1
        assert same if sample.group == "two_same_class" else (same == (len(subjects) == 1))
    layouts = {group: layout_checks([s for s in bench.samples if s.group == group]) for group in bench.groups}
    assert layouts["two_touching"] == {"apart": 0, "touching": 16, "overlapping": 0}
    assert layouts["two_overlapping"] == {"apart": 0, "touching": 0, "overlapping": 16}
    for group in ("two", "two_same_class", "three", "four"):
        assert layouts[group] == {
            "apart": len([s for s in bench.samples if s.group == group]),
            "touching": 0,
            "overlapping": 0,
        }
    # expanding again gives the same samples; a group's samples do not depend on the other groups
    definition = load_definition("world")
    assert expand_world(definition) == bench.samples
    alone = expand_world({**definition, "groups": {"four": definition["groups"]["four"]}})
    assert alone == [s for s in bench.samples if s.group == "four"]


def test_bad_groups_are_refused():
    definition = load_definition("world")
    with pytest.raises(ValueError, match="touching and overlapping take 2 subjects"):
        expand_world({**definition, "groups": {"x": {"subjects": 3, "layout": "touching", "samples": 1}}})
    with pytest.raises(ValueError, match="subjects must be 1 to 4"):
        expand_world({**definition, "groups": {"x": {"subjects": 5, "layout": "apart", "samples": 1}}})


def test_references_are_rendered_once_and_deterministically(tmp_path):
    samples = select_samples(load_benchmark("world"), ["two.00[0-2]"])
    assert render_references(samples, tmp_path / "a", 2, seed=1) == 12
    assert render_references(samples, tmp_path / "a", 2, seed=1) == 0  # all there: nothing rendered
    render_references(samples, tmp_path / "b", 2, seed=1)
    files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.png"))
    subject = samples[0].subjects[0]
    assert f"{subject.phrase}-{subject.identity}/0.png" in files and len(files) == 12
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    first = np.asarray(PIL.Image.open(tmp_path / "a" / files[0]))
    assert first.shape == (64, 64, 3)
    assert not np.array_equal(first, np.asarray(PIL.Image.open(tmp_path / "a" / files[1])))  # another rendering


def _run_args(models: Path, output: Path, *extra) -> list[str]:
    return [
        "bench",
        "run",
        "--bench",
        "world",
        "--models",
        str(models),
        "--output",
        str(output),
        "--only",
        *SELECTION,
        "--images-per-sample",
        "1",
        "--steps",
        "2",
        *extra,
    ]


def _images(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*.png"))}


class FakeProcess:
    """accelerate's PartialState as one process of a sharded run sees it (processes run one after another)."""

    def __init__(self, index: int, count: int):
        self.process_index, self.num_processes, self.is_main_process = index, count, index == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


@pytest.mark.slow
def test_run_score_report(tmp_path, world_models, capsys, monkeypatch):
    import msdiffusion.app.bench_commands as bench_cli

    one = tmp_path / "one"
    assert main(_run_args(world_models, one)) == 0
    out = capsys.readouterr().out
    assert "references: 27 rendered into" in out and "World bench: 4 samples selected" in out
    assert "generated 4, 0 already on disk, of 4 images" in out
    images = _images(one / "images")
    assert sorted(images) == [
        "four/four.000_0.png",
        "one/one.000_0.png",
        "two_overlapping/two_overlapping.001_0.png",
        "two_touching/two_touching.000_0.png",
    ]
    assert PIL.Image.open(one / "images" / "four" / "four.000_0.png").size == (64, 64)
    manifest = [json.loads(line) for line in (one / "manifest.jsonl").read_text().splitlines()]
    settings = manifest[0]["settings"]
    assert (settings["steps"], settings["guidance"], settings["scale"]) == (2, 5.0, 1.0)
    assert (settings["size"], settings["negative_prompt"]) == ([64, 64], None)
    assert settings["reference_combine"] == "concat"  # several references resampled together, as MS-Bench
    assert settings["base"] == str((world_models / "base").resolve())
    four = next(r for r in manifest if r["sample_id"] == "four.000")
    expected = next(s for s in load_benchmark("world").samples if s.sample_id == "four.000")
    assert [(s["phrase"], s["identity"], tuple(s["box"])) for s in four["subjects"]] == [
        (s.phrase, s.identity, s.box) for s in expected.subjects
    ]
    assert four["subjects"][0]["references"] == [f"{expected.subjects[0].name}/{k}.png" for k in range(3)]

    # resumed: nothing generated, nothing rendered, nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in one.rglob("*.png")}
    assert main(_run_args(world_models, one)) == 0
    out = capsys.readouterr().out
    assert "references: all in" in out and "generated 0, 4 already on disk, of 4 images" in out
    assert before == {p: p.stat().st_mtime_ns for p in one.rglob("*.png")}
    assert main(_run_args(world_models, one, "--guidance", "3")) == 2
    assert "guidance: 5.0 -> 3.0" in capsys.readouterr().err

    # sharded over two processes (the second first: the first writes the manifest): the same files
    two = tmp_path / "two"
    for rank in (1, 0):
        monkeypatch.setattr(bench_cli, "process_state", lambda rank=rank: FakeProcess(rank, 2))
        assert main(_run_args(world_models, two)) == 0
        assert f"[process {rank}/2] generated 2, 0 already on disk, of 2 images" in capsys.readouterr().out
    assert _images(two) == _images(one)
    manifest_two = [json.loads(line) for line in (two / "manifest.jsonl").read_text().splitlines()]
    assert [{**r, "images_dir": None} for r in manifest_two] == [{**r, "images_dir": None} for r in manifest]

    # score with the world's evaluator and image encoder (those the run used)
    assert main(["bench", "score", "--output", str(one), "--batch-size", "3"]) == 0
    assert "4 to score" in capsys.readouterr().out
    assert main(["bench", "score", "--output", str(one)]) == 0
    assert "4 already scored, 0 to score" in capsys.readouterr().out
    scores = [json.loads(line) for line in (one / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 4 and sum(len(s["subjects"]) for s in scores) == 9
    for score in scores:
        assert score["clip_t"] is None and -1 <= score["clip_i"] <= 1 and -1 <= score["dino"] <= 1
        for subject in score["subjects"]:
            assert {"found", "placed", "iou", "identity_correct", "mixing", "identity"} <= set(subject)
            assert (subject["detection"] is None) == (subject["crop_clip_i"] is None) == (not subject["detected"])
    config = json.loads((one / "scores_config.json").read_text())
    assert config["scorer"] == "world" and config["evaluator"] == str(
        (world_models / "evaluator.safetensors").resolve()
    )

    assert main(["bench", "score", "--output", str(one), "--clip-model", "openai/clip-vit-base-patch32"]) == 2
    assert "scored by the world's evaluator" in capsys.readouterr().err
    # other models (another evaluator): the old scores are not mixed with new ones
    other = tmp_path / "other_models"
    shutil.copytree(world_models, other)
    from msdiffusion.world.evaluate import Segmenter, save_segmenter

    torch.manual_seed(1)
    save_segmenter(Segmenter(), other / "evaluator.safetensors")
    assert main(["bench", "score", "--output", str(one), "--models", str(other)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    assert main(["bench", "report", "--output", str(one), "--grid-samples", "1"]) == 0
    report = json.loads((one / "report.json").read_text())
    assert list(report["groups"]) == ["one", "two_touching", "two_overlapping", "four"]
    assert list(report["subject_counts"]) == ["1 subject", "2 subjects", "4 subjects"]
    assert (
        report["subject_counts"]["2 subjects"]["images"] == 2
        and report["subject_counts"]["2 subjects"]["subjects"] == 4
    )
    overall = report["overall"]
    assert (overall["images"], overall["subjects"]) == (4, 9)
    subjects = [s for score in scores for s in score["subjects"]]
    assert overall["found"] == sum(s["found"] for s in subjects) / 9
    assert overall["mean_iou"] == pytest.approx(np.mean([s["iou"] for s in subjects]))
    assert overall["identity_correct"] == sum(s["identity_correct"] for s in subjects) / 9
    assert overall["mixing"] == pytest.approx(np.mean([s["mixing"] for s in subjects]))
    assert overall["clip_i"] == pytest.approx(np.mean([s["clip_i"] for s in scores]))
    assert report["coverage"]["benchmark_samples"] == 144 and report["coverage"]["missing_references"] == {}
    markdown = (one / "report.md").read_text()
    assert "| two_touching | 1 | 2 |" in markdown and "| 4 subjects | 1 | 4 |" in markdown
    assert "| **overall** | 4 | 9 |" in markdown
    assert all((one / "grids" / f"{group}.png").is_file() for group in report["groups"])


def test_run_arguments_are_checked(tmp_path, capsys, monkeypatch):
    import msdiffusion.loading as loading

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(loading, "WORLD_WEIGHTS", empty)  # a package without its world weights
    assert main(["bench", "run", "--bench", "world", "--output", str(tmp_path / "out")]) == 2
    assert "The world's weights are not in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was rendered or written
    assert main(_run_args(empty, tmp_path / "out")) == 2
    assert "missing base, adapter, image_encoder, evaluator.safetensors" in capsys.readouterr().err
    assert (
        main(["bench", "run", "--output", str(tmp_path / "out"), "--models", str(empty), "--photos", str(tmp_path)])
        == 2
    )
    assert "applies to --bench world only" in capsys.readouterr().err
    assert main(["bench", "run", "--bench", "world", "--output", str(tmp_path / "out"), "--base", "x"]) == 2
    assert "--adapter, --image-encoder are required" in capsys.readouterr().err
    assert (
        main(
            ["bench", "run", "--output", str(tmp_path / "out"), "--base", "b", "--adapter", "a", "--image-encoder", "e"]
        )
        == 2
    )
    assert "--photos: required" in capsys.readouterr().err


def _perfect_image(sample, identities=None) -> tuple[np.ndarray, np.ndarray]:
    """Each subject drawn from the world into its box (upright; size fitted to the box), and the label map."""
    from msdiffusion.world.bench import _shape_extent
    from msdiffusion.world.scenes import SIZE, draw_background, draw_subject

    canvas = draw_background("plain", np.random.default_rng(0))
    labels = np.zeros((SIZE, SIZE), np.int64)
    for subject, identity in zip(sample.subjects, identities or [s.identity for s in sample.subjects]):
        x0, y0, x1, y1 = subject.box
        width = _shape_extent(subject.phrase, 20.0, 0.0)[0]
        mask = draw_subject(
            canvas,
            subject.phrase,
            identity,
            ((x0 + x1) / 2 * SIZE, (y0 + y1) / 2 * SIZE),
            20.0 * (x1 - x0) / width,
            0.0,
        )
        labels[mask] = 1 + CLASSES.index(subject.phrase)
    return canvas.round().astype(np.uint8), labels


def test_scores_follow_the_pixels(tmp_path, world_models, monkeypatch):
    """On subjects drawn by the world itself (with a segmenter that sees the true classes), every subject
    is found with its identity; with the references' identities swapped, none has its identity."""
    from msdiffusion.bench.runner import BenchSettings, WorkItem, manifest_record
    from msdiffusion.world.bench import WorldScorer, score_world_records

    # Samples without a triangle (drawn upright and fitted to its box's width, a triangle misses its
    # box's height: IoU about 0.6) and whose drawings the evaluator reads right: it reads about 94%
    # of rendered identities right (benchmarks/world_vae_ceiling.py), and 6 of the first 16 "two"
    # samples pass every check here.
    samples = select_samples(load_benchmark("world"), ["two.005", "three.001"])
    render_references(samples, tmp_path / "refs", 1, seed=0)
    settings = BenchSettings(base="b", adapter="a", image_encoder="e")
    records, truth = [], {}
    for sample, swap in [(samples[0], False), (samples[1], False), (samples[0], True)]:
        identities = [s.identity for s in sample.subjects]
        image, labels = _perfect_image(sample, identities[::-1] if swap else identities)
        record = manifest_record(WorkItem(sample, int(swap)), settings, tmp_path / "refs")
        (tmp_path / "run" / record["image"]).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image).save(tmp_path / "run" / record["image"])
        truth[record["image"]] = labels
        records.append(record)

    scorer = WorldScorer(world_models / "evaluator.safetensors", world_models / "image_encoder")
    order = [r["image"] for r in records]
    monkeypatch.setattr(
        scorer.evaluator, "class_maps", lambda images: np.stack([truth[k] for k in order[: len(images)]])
    )
    scores = score_world_records(records, tmp_path / "run", scorer, batch_size=8)
    straight, swapped = scores[:2], scores[2]
    for score in straight:
        assert all(
            s["found"] and s["placed"] and s["iou"] > 0.7 and s["identity_correct"] for s in score["subjects"]
        ), score
        assert all(s["mixing"] < 0.2 for s in score["subjects"])
    assert all(s["found"] and not s["identity_correct"] for s in swapped["subjects"]), swapped
    assert all(s["mixing"] > 0.3 for s in swapped["subjects"])
    # an image drawn with a subject's own identity is nearer its reference than one with another identity
    assert straight[0]["subjects"][0]["crop_clip_i"] > swapped["subjects"][0]["crop_clip_i"]
