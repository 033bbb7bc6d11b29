import json

import numpy as np
import PIL.Image
import pytest
from test_bench_tiny_models import noise_image, scoring_models  # noqa: F401  (session fixture)

from msdiffusion.bench.scoring import (
    ClipEmbedder,
    DinoEmbedder,
    Scorers,
    ScoringConfig,
    crop,
    match_subjects,
    non_max_suppression,
    score_records,
)
from msdiffusion.boxes import box_iou
from msdiffusion.data.detection import Detection, OpenVocabularyDetector


def test_box_geometry():
    assert box_iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]) == 1
    assert box_iou([0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]) == 0
    assert box_iou([0, 0, 0.5, 1], [0.25, 0, 0.75, 1]) == pytest.approx(1 / 3)
    kept = non_max_suppression(
        [
            Detection("cat", (0, 0, 0.5, 0.5), 0.5),
            Detection("cat", (0, 0, 0.52, 0.5), 0.9),
            Detection("cat", (0.6, 0, 1, 1), 0.2),
            Detection("dog", (0, 0, 0.5, 0.5), 0.3),  # another phrase: never suppressed by a cat
        ]
    )
    assert [(d.phrase, d.score) for d in kept] == [("cat", 0.9), ("dog", 0.3), ("cat", 0.2)]


def test_crop_takes_the_box_pixels():
    image = PIL.Image.fromarray(np.arange(100 * 60 * 3, dtype=np.uint32).reshape(60, 100, 3).astype(np.uint8))
    part = crop(image, (0.25, 0.5, 0.75, 1.0))
    assert part.size == (50, 30)
    np.testing.assert_array_equal(np.asarray(part), np.asarray(image)[30:60, 25:75])
    assert crop(image, (1.0, 1.0, 1.0, 1.0)).size == (1, 1)  # degenerate boxes still give a pixel


def test_matching_needs_one_detection_per_subject():
    left, right = [0, 0.25, 0.5, 0.75], [0.5, 0.25, 1, 0.75]
    merged = [Detection("cat", (0.1, 0.2, 0.9, 0.8), 0.9)]  # the two cats came out as one
    matched = match_subjects(["cat", "cat"], [left, right], merged)
    assert sum(m is not None for m in matched) == 1
    both = [Detection("cat", (0.55, 0.25, 1, 0.75), 0.3), Detection("cat", (0, 0.25, 0.45, 0.75), 0.8)]
    matched = match_subjects(["cat", "cat"], [left, right], both)
    assert matched[0].box == (0, 0.25, 0.45, 0.75) and matched[1].box == (0.55, 0.25, 1, 0.75)
    # classes never mix: a dog detection cannot stand in for a cat
    assert match_subjects(["cat"], [left], [Detection("dog", tuple(left), 0.9)]) == [None]


class FixedDetector:
    """Stands in for the detector where a test needs to know exactly what is found."""

    threshold = 0.5

    def __init__(self, found: list[Detection]):
        self.found = found

    def __call__(self, images, queries, threshold=None):
        return [[d for d in self.found if d.phrase in image_queries] for image_queries in queries]


def _run_dir(tmp_path, generated: PIL.Image.Image, references: dict[str, PIL.Image.Image], subjects: list[dict]):
    photos = tmp_path / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name, image in references.items():
        image.save(photos / f"{name}.png")
    (tmp_path / "run" / "images").mkdir(parents=True, exist_ok=True)
    generated.save(tmp_path / "run" / "images" / "x_0.png")
    record = {
        "benchmark": "msbench",
        "sample_id": "x",
        "group": "g",
        "index": 0,
        "image": "images/x_0.png",
        "prompt": "a cat in the snow",
        "images_dir": str(photos),
        "subjects": [dict(s, references=[f"{s['name']}.png"], reference=f"{s['name']}.png") for s in subjects],
    }
    return tmp_path / "run", record


@pytest.fixture(scope="module")
def embedders(scoring_models):  # noqa: F811
    return ClipEmbedder(str(scoring_models["clip"]), "cpu"), DinoEmbedder(str(scoring_models["dino"]), "cpu")


def test_known_case_same_image_scores_one_and_an_off_subject_crop_scores_less(tmp_path, embedders):
    clip, dino = embedders
    reference = noise_image(7, (64, 64))
    # the "generated" image: the reference pasted exactly into the middle box of a different background
    canvas = noise_image(8, (128, 128))
    canvas.paste(reference, (32, 32))
    box = [0.25, 0.25, 0.75, 0.75]
    subjects = [{"name": "cat", "phrase": "cat", "box": box}]

    # 1. the generated image IS the reference: CLIP-I = DINO = 1
    run_dir, record = _run_dir(tmp_path / "same", reference, {"cat": reference}, subjects)
    config = ScoringConfig("clip", "dino", "fixed", 0.5)
    scorers = Scorers(clip, dino, FixedDetector([Detection("cat", (0.0, 0.0, 1.0, 1.0), 0.9)]), config)
    (same,) = score_records([record], run_dir, scorers)
    assert same["clip_i"] == pytest.approx(1, abs=1e-5) and same["dino"] == pytest.approx(1, abs=1e-5)
    assert same["subjects"][0]["crop_clip_i"] == pytest.approx(1, abs=1e-5)

    # 2. subject in its box: the crop at the detection is the reference itself, scoring 1 ...
    run_dir, record = _run_dir(tmp_path / "pasted", canvas, {"cat": reference}, subjects)
    inside = Scorers(clip, dino, FixedDetector([Detection("cat", tuple(box), 0.9)]), config)
    (hit,) = score_records([record], run_dir, inside)
    subject = hit["subjects"][0]
    assert subject["detected"] and subject["iou"] == pytest.approx(1)
    assert subject["crop_clip_i"] == pytest.approx(1, abs=1e-5) and subject["crop_dino"] == pytest.approx(1, abs=1e-5)
    assert hit["clip_i"] < 1 - 1e-3  # the whole image is not the reference

    # ... and a detection outside the subject scores lower, with a lower layout IoU
    outside = Scorers(clip, dino, FixedDetector([Detection("cat", (0.0, 0.0, 0.25, 0.25), 0.9)]), config)
    (miss,) = score_records([record], run_dir, outside)
    off = miss["subjects"][0]
    assert off["crop_clip_i"] < subject["crop_clip_i"] - 1e-3 and off["crop_dino"] < subject["crop_dino"] - 1e-3
    assert off["iou"] == 0
    # whole-image scores do not depend on the detector
    assert miss["clip_i"] == pytest.approx(hit["clip_i"]) and miss["clip_t"] == pytest.approx(hit["clip_t"])

    # nothing found: not detected, layout IoU 0, no crop score
    nothing = Scorers(clip, dino, FixedDetector([]), config)
    (lost,) = score_records([record], run_dir, nothing)
    assert lost["subjects"][0]["detected"] is False and lost["subjects"][0]["crop_clip_i"] is None


def test_background_subjects_are_not_detected(tmp_path, embedders):
    clip, dino = embedders
    subjects = [
        {"name": "cat", "phrase": "cat", "box": [0.25, 0.25, 0.75, 0.75]},
        {"name": "forest", "phrase": "forest", "box": [0, 0, 1, 1]},
    ]
    run_dir, record = _run_dir(tmp_path, noise_image(1), {"cat": noise_image(2), "forest": noise_image(3)}, subjects)

    class AskedFor(FixedDetector):
        def __call__(self, images, queries, threshold=None):
            self.queries = queries
            return super().__call__(images, queries, threshold)

    detector = AskedFor([Detection("cat", (0.2, 0.2, 0.8, 0.8), 0.9), Detection("forest", (0, 0, 1, 1), 0.9)])
    (score,) = score_records([record], run_dir, Scorers(clip, dino, detector, ScoringConfig()))
    assert detector.queries == [["cat"]]
    cat, forest = score["subjects"]
    assert cat["background"] is False and cat["detected"] is True
    assert forest["background"] is True and forest["detected"] is None and forest["iou"] is None
    assert forest["crop_clip_i"] == forest["clip_i"]  # scored on the whole image


@pytest.mark.parametrize("family", ["owlv2", "grounding_dino"])
def test_scores_end_to_end_with_a_real_detector(tmp_path, scoring_models, family):  # noqa: F811
    config = ScoringConfig(str(scoring_models["clip"]), str(scoring_models["dino"]), str(scoring_models[family]), 0.0)
    scorers = Scorers.load(config, "cpu", batch_size=2)
    assert scorers.config.detection_threshold == 0.0
    subjects = [
        {"name": "cat", "phrase": "cat", "box": [0, 0.25, 0.5, 0.75]},
        {"name": "cat2", "phrase": "cat", "box": [0.5, 0.25, 1, 0.75]},
    ]
    run_dir, record = _run_dir(
        tmp_path, noise_image(4, (96, 64)), {"cat": noise_image(5), "cat2": noise_image(6)}, subjects
    )
    records = [dict(record, index=k) for k in range(3)]  # 3 records, batch size 2: two chunks
    scores = score_records(records, run_dir, scorers, batch_size=2)
    assert len(scores) == 3
    for score in scores:
        assert -1 <= score["clip_t"] <= 1 and -1 <= score["clip_i"] <= 1 and -1 <= score["dino"] <= 1
        for subject in score["subjects"]:
            assert 0 <= subject["iou"] <= 1
            if subject["detected"]:
                assert -1 <= subject["crop_dino"] <= 1 and len(subject["detection"]) == 4
        json.dumps(score)  # records are plain JSON
    # the same image scored in different batches gets the same scores
    for key in ("clip_t", "clip_i", "dino"):
        assert scores[0][key] == pytest.approx(scores[2][key], abs=1e-5)
    assert [s["detected"] for s in scores[0]["subjects"]] == [s["detected"] for s in scores[2]["subjects"]]


def test_unknown_detector_family_is_refused(scoring_models):  # noqa: F811
    with pytest.raises(ValueError, match="supported: OWL-ViT, OWLv2, Grounding DINO"):
        OpenVocabularyDetector(str(scoring_models["dino"]), "cpu")


def test_missing_reference_is_named(tmp_path, embedders):
    clip, dino = embedders
    run_dir, record = _run_dir(
        tmp_path, noise_image(1), {}, [{"name": "cat", "phrase": "cat", "box": [0.2, 0.2, 0.8, 0.8]}]
    )
    with pytest.raises(FileNotFoundError, match="cat.png"):
        score_records([record], run_dir, Scorers(clip, dino, FixedDetector([]), ScoringConfig()))
