"""The report's arithmetic, paper row and grids, from hand-written scores (no models)."""

import json

import pytest
from test_bench_tiny_models import noise_image

from msdiffusion.bench.report import aggregate, image_metrics, write_report


def _subject(name, detected, iou=0.0, crop=None, background=False, box=(0.25, 0.25, 0.75, 0.75)):
    return {
        "name": name,
        "phrase": name,
        "box": list(box),
        "clip_i": 0.5,
        "dino": 0.4,
        "background": background,
        "detected": None if background else detected,
        "iou": None if background else iou,
        "detection": [0.2, 0.2, 0.7, 0.7] if detected else None,
        "crop_clip_i": crop,
        "crop_dino": crop,
    }


def _score(group, sample_id, subjects, clip_t=0.3, index=0):
    return {
        "image": f"images/{group}/{sample_id}_{index}.png",
        "sample_id": sample_id,
        "group": group,
        "index": index,
        "clip_t": clip_t,
        "clip_i": 0.5,
        "dino": 0.4,
        "subjects": subjects,
    }


def test_misses_count_zero_and_backgrounds_are_left_out():
    score = _score(
        "g",
        "s",
        [
            _subject("cat", True, 0.8, 0.9),
            _subject("dog", False),
            _subject("barn", None, background=True, box=(0, 0, 1, 1)),
        ],
    )
    metrics = image_metrics(score)
    assert metrics["detection_rate"] == 0.5
    assert metrics["layout_iou"] == pytest.approx(0.4)
    assert metrics["subject_clip_i"] == pytest.approx(0.45)
    only_background = image_metrics(_score("g", "t", [_subject("barn", None, background=True, box=(0, 0, 1, 1))]))
    assert only_background["detection_rate"] is None and only_background["clip_t"] == 0.3

    table = aggregate([score, _score("h", "u", [_subject("cat", True, 1.0, 1.0)], clip_t=0.1)])
    assert table["groups"]["g"]["images"] == 1 and table["groups"]["h"]["layout_iou"] == 1.0
    assert table["overall"]["clip_t"] == pytest.approx(0.2)
    assert table["overall"]["detection_rate"] == pytest.approx(0.75)


def _run_dir(tmp_path, benchmark, scores):
    photos = tmp_path / "photos"
    (photos / "dog").mkdir(parents=True)
    noise_image(1).save(photos / "dog" / "00.png")
    run = tmp_path / "run"
    manifest = []
    for k, score in enumerate(scores):
        (run / score["image"]).parent.mkdir(parents=True, exist_ok=True)
        noise_image(10 + k, (96, 64)).save(run / score["image"])
        subjects = [
            dict(name=s["name"], phrase=s["phrase"], box=s["box"], reference="dog/00.png", references=["dog/00.png"])
            for s in score["subjects"]
        ]
        manifest.append(
            {
                "benchmark": benchmark,
                "sample_id": score["sample_id"],
                "group": score["group"],
                "index": score["index"],
                "image": score["image"],
                "images_dir": str(photos),
                "subjects": subjects,
            }
        )
    (run / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    (run / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    (run / "run_config.json").write_text(
        json.dumps({"benchmark": benchmark, "images_dir": str(photos), "settings": {}})
    )
    return run


def test_dreambench_report_has_the_paper_row(tmp_path):
    scores = [
        _score("object", "dreambench.dog.p00", [_subject("dog", True, 0.5, 0.7)]),  # groups out of order on purpose
        _score("live", "dreambench.dog.p01", [_subject("dog", False)], index=1),
        _score("live", "dreambench.dog.p01", [_subject("dog", True, 1.0, 0.9)]),
    ]
    run = _run_dir(tmp_path, "dreambench", scores)
    paths = write_report(run, grid_samples=4)
    assert {p.name for p in paths} == {"report.json", "report.md", "object.png", "live.png"}
    report = json.loads((run / "report.json").read_text())
    assert list(report["groups"]) == ["object", "live"]  # the benchmark's own order
    assert report["paper"]["metrics"] == {"clip_t": 0.321, "clip_i": 0.792, "dino": 0.671}
    assert report["coverage"]["buildable_samples"] == 25 and len(report["coverage"]["missing_references"]) == 29
    markdown = (run / "report.md").read_text()
    assert "| paper: MS-Diffusion (SDXL) | | 0.321 | 0.792 | 0.671 |" in markdown
    assert "arXiv 2406.07209" in markdown
    assert "and 19 more missing references" in markdown
    assert "| live | 2 | 0.300 | 0.500 | 0.400 | 0.500 | 0.500 | 0.450 | 0.450 |" in markdown


def test_grid_shows_references_and_image(tmp_path):
    import PIL.Image

    from msdiffusion.bench.report import THUMBNAIL

    run = _run_dir(
        tmp_path,
        "msbench",
        [
            _score(
                "living_scene",
                "a",
                [_subject("dog", True, 0.5, 0.5), _subject("barn", None, background=True, box=(0, 0, 1, 1))],
            )
        ],
    )
    write_report(run, grid_samples=1)
    with PIL.Image.open(run / "grids" / "living_scene.png") as grid:
        assert grid.size == (3 * THUMBNAIL, THUMBNAIL)  # two references and the image
        pixels = grid.convert("RGB").load()
        # the requested box of the foreground subject is drawn in green on the image column
        x, y = 2 * THUMBNAIL + THUMBNAIL // 4, THUMBNAIL // 2
        assert pixels[x, y] == (0, 255, 0)
