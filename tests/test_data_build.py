"""`msdiff data build`: phrases, filters, sources, manifest writing, and the real detector/SAM wrappers on
tiny random models saved by the tests."""

import json

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from tiny_detectors import save_tiny_detector_and_segmenter

from msdiffusion.app.cli import main
from msdiffusion.boxes import box_iou
from msdiffusion.data.build import SourceItem, build_manifest, collect_items, make_phrase_finder
from msdiffusion.data.dataset import MSDiffusionDataset
from msdiffusion.data.detection import (
    BoxSegmenter,
    Detection,
    OpenVocabularyDetector,
    SubjectFilter,
    select_subjects,
)
from msdiffusion.data.manifest import read_manifest, validate_manifest
from msdiffusion.data.phrases import extract_noun_phrases, find_vocabulary_phrases, load_vocabulary
from msdiffusion.subjects import default_image_processor

COLORS = {"red ball": (255, 0, 0), "blue box": (0, 0, 255), "green cup": (0, 255, 0)}


def _scene(path, objects, size=(96, 64)):
    """A grey image with a filled rectangle per (phrase, pixel box); saves and returns the path."""
    image = PIL.Image.new("RGB", size, (128, 128, 128))
    draw = PIL.ImageDraw.Draw(image)
    for phrase, box in objects:
        draw.rectangle(box, fill=COLORS[phrase])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


class ColorDetector:
    """A stand-in detector that finds each phrase's colour: exact boxes, so the writing logic can be checked."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, phrases, threshold):
        self.calls.append([list(p) for p in phrases])
        results = []
        for image, queries in zip(images, phrases):
            array = np.asarray(image)
            found = []
            for phrase in queries:
                ys, xs = np.nonzero((array == COLORS.get(phrase, (-1, -1, -1))).all(axis=-1))
                if len(xs):
                    w, h = image.size
                    found.append(
                        Detection(phrase, (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h), 0.9)
                    )
            results.append(found)
        return results


class ColorSegmenter:
    """A stand-in segmenter: the mask is the left half of each box."""

    def __call__(self, images, boxes):
        masks = []
        for image, image_boxes in zip(images, boxes):
            w, h = image.size
            per_box = []
            for x0, y0, x1, y1 in image_boxes:
                mask = np.zeros((h, w), dtype=bool)
                mask[round(y0 * h) : round(y1 * h), round(x0 * w) : round((x0 + x1) / 2 * w)] = True
                per_box.append(mask)
            masks.append(per_box)
        return masks


# --- phrases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, phrases",
    [
        ("a brown dog sitting on a red sofa next to a cat", ["brown dog", "red sofa", "cat"]),
        ("A photo of a dog and a cat on the beach.", ["dog", "cat", "beach"]),
        ("the dog is very happy", ["dog"]),
        ("a man holding umbrellas in the rain", ["man", "umbrellas", "rain"]),
        ("a sleeping cat under a wooden table", ["sleeping cat", "wooden table"]),
        ("close-up of a woman wearing a red hat and sunglasses", ["woman", "red hat", "sunglasses"]),
    ],
)
def test_noun_phrases(caption, phrases):
    assert extract_noun_phrases(caption) == phrases
    assert all(p in caption for p in phrases)


def test_noun_phrase_length_and_vocabulary(tmp_path):
    assert extract_noun_phrases("a small brown dog", max_words=1) == ["dog"]
    assert extract_noun_phrases("a small brown dog", max_words=3) == ["small brown dog"]
    assert find_vocabulary_phrases("Two Dogs near a teddy  bear and a cat", load_vocabulary("coco")) == [
        "Dogs",
        "teddy  bear",
        "cat",
    ]
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("# products\nsneaker\nhandbag\n")
    assert find_vocabulary_phrases("a white sneaker beside a handbag", load_vocabulary(vocabulary)) == [
        "sneaker",
        "handbag",
    ]
    with pytest.raises(FileNotFoundError, match="neither a built-in one"):
        load_vocabulary(tmp_path / "none.txt")


# --- filters ---------------------------------------------------------------------------------------


def test_select_subjects_filters():
    rules = SubjectFilter(score_threshold=0.3, min_box_area=0.02, max_box_area=0.8, max_overlap=0.5, max_subjects=2)
    detections = [
        Detection("dog", (0.0, 0.0, 0.4, 0.4), 0.6),
        Detection("dog", (0.5, 0.5, 0.9, 0.9), 0.8),  # the better dog
        Detection("cat", (0.55, 0.55, 0.95, 0.95), 0.7),  # IoU with the better dog 0.6 > 0.5: dropped
        Detection("cup", (0.0, 0.0, 0.1, 0.1), 0.9),  # area 0.01 < 0.02
        Detection("sofa", (0.0, 0.0, 1.0, 0.9), 0.9),  # area 0.9 > 0.8
        Detection("ball", (0.0, 0.0, 0.3, 0.3), 0.2),  # score below threshold
        Detection("hat", (0.0, 0.5, 0.3, 0.9), 0.4),
        Detection("lamp", (0.0, 0.0, 0.2, 0.3), 0.35),  # third: over max_subjects
    ]
    kept = select_subjects(detections, rules)
    assert [(d.phrase, d.score) for d in kept] == [("dog", 0.8), ("hat", 0.4)]
    assert box_iou((0.5, 0.5, 0.9, 0.9), (0.55, 0.55, 0.95, 0.95)) == pytest.approx(0.1225 / 0.1975)
    loose = select_subjects(detections, SubjectFilter(0.3, 0.0, 1.0, 1.0, 10))
    assert [d.phrase for d in loose] == ["cup", "sofa", "dog", "cat", "hat", "lamp"]
    with pytest.raises(ValueError, match="min_box_area <= max_box_area"):
        SubjectFilter(min_box_area=0.5, max_box_area=0.1)


# --- sources ---------------------------------------------------------------------------------------


def test_collect_items_from_folders_and_caption_files(tmp_path):
    _scene(tmp_path / "photos" / "a.png", [])
    (tmp_path / "photos" / "a.txt").write_text("a red ball\n")
    _scene(tmp_path / "photos" / "sub" / "b.jpg", [])
    (tmp_path / "photos" / "sub" / "b.txt").write_text("a blue box")
    _scene(tmp_path / "photos" / "c.png", [])  # no caption
    items, skipped = collect_items(tmp_path / "photos")
    assert [(i.image.name, i.caption) for i in items] == [("a.png", "a red ball"), ("b.jpg", "a blue box")]
    assert skipped == {"no caption file or empty caption": 1}

    (tmp_path / "caps.jsonl").write_text(
        json.dumps({"image": "photos/a.png", "caption": "a red ball", "phrases": ["red ball"]}) + "\n"
    )
    (tmp_path / "caps.csv").write_text(
        'image,caption,phrases\nphotos/a.png,"a red ball, a blue box",red ball;blue box\n'
    )
    (tmp_path / "caps.json").write_text(json.dumps({"photos/a.png": "a red ball"}))
    assert collect_items(tmp_path / "caps.jsonl")[0][0].phrases == ["red ball"]
    assert collect_items(tmp_path / "caps.csv")[0][0].phrases == ["red ball", "blue box"]
    assert collect_items(tmp_path / "caps.json")[0][0].caption == "a red ball"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "photos/a.png", "caption": "x"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        collect_items(tmp_path / "bad.jsonl")
    (tmp_path / "gone.csv").write_text("image,caption\nphotos/zzz.png,a cat\n")
    with pytest.raises(ValueError, match=r"gone.csv:2: image not found"):
        collect_items(tmp_path / "gone.csv")

    for clip, frames in (("clip1", 3), ("clip2", 1)):
        for k in range(frames):
            _scene(tmp_path / "clips" / clip / f"{k:03d}.png", [])
        (tmp_path / "clips" / clip / "caption.txt").write_text("a red ball")
    items, skipped = collect_items(tmp_path / "clips", video=True)
    assert [(i.image.name, i.reference_image.name) for i in items] == [("001.png", "000.png")]
    assert skipped == {"clip with fewer than 2 frames": 1}


# --- writing ---------------------------------------------------------------------------------------


def test_build_manifest_writes_valid_samples_with_masks(tmp_path):
    still = _scene(tmp_path / "src" / "still.png", [("red ball", (6, 8, 29, 39)), ("blue box", (48, 16, 89, 55))])
    plain = _scene(tmp_path / "src" / "plain.png", [])
    items = [
        SourceItem(still, "a red ball next to a blue box and a green cup", still),
        SourceItem(plain, "a red ball", plain),  # nothing detected
        SourceItem(plain, "it is so blue", plain),  # no phrase
    ]
    detector = ColorDetector()
    report = build_manifest(
        items,
        tmp_path / "out",
        detector,
        SubjectFilter(score_threshold=0.5),
        make_phrase_finder(),
        segmenter=ColorSegmenter(),
        batch_size=2,
    )
    assert (report.items, report.written, report.masks) == (3, 1, 2)
    assert report.skipped == {"fewer than 1 subject(s) detected": 1, "no subject phrase in the caption": 1}
    assert detector.calls[0][0] == ["red ball", "blue box", "green cup"]  # one batch of two, then one

    (sample,) = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert (sample.width, sample.height) == (96, 64)
    by_phrase = {s.phrase: s for s in sample.subjects}
    assert by_phrase["red ball"].box == pytest.approx((6 / 96, 8 / 64, 30 / 96, 40 / 64))
    assert by_phrase["blue box"].reference.crop == pytest.approx((48 / 96, 16 / 64, 90 / 96, 56 / 64))
    assert by_phrase["blue box"].reference.image == still
    mask = PIL.Image.open(by_phrase["blue box"].reference.mask)
    assert mask.size == (42, 40)  # the crop's size; its left half is the (fake) object
    assert np.asarray(mask)[:, :21].all() and not np.asarray(mask)[:, 21:].any()
    assert validate_manifest(tmp_path / "out" / "manifest.jsonl", open_images=True)[2] == 0

    item = MSDiffusionDataset(
        tmp_path / "out" / "manifest.jsonl", resolution=32, crop="center", image_processor=default_image_processor()
    )[0]
    assert item["num_subjects"] == 2 and set(item["subject_phrases"][:2]) == {"red ball", "blue box"}


def test_build_manifest_from_clips_takes_references_from_another_frame(tmp_path):
    for k, x in enumerate((4, 40, 60)):  # the ball moves
        _scene(tmp_path / "clips" / "c" / f"{k}.png", [("red ball", (x, 10, x + 20, 40))])
    (tmp_path / "clips" / "c.txt").write_text("a red ball rolling")
    items, _ = collect_items(tmp_path / "clips", video=True)
    report = build_manifest(
        items, tmp_path / "out", ColorDetector(), SubjectFilter(), make_phrase_finder(), save_crops=True
    )
    assert report.written == 1
    (sample,) = read_manifest(tmp_path / "out" / "manifest.jsonl")
    (subject,) = sample.subjects
    assert sample.image.name == "1.png"
    assert subject.box == pytest.approx((40 / 96, 10 / 64, 61 / 96, 41 / 64))  # from the target frame
    crop = PIL.Image.open(subject.reference.image)  # saved crop of frame 0, where the ball is at x = 4
    assert subject.reference.image.parent.name == "crops" and subject.reference.crop is None
    assert crop.size == (21, 31) and crop.getpixel((10, 10)) == (255, 0, 0)


# --- real model wrappers on tiny random models -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_models")
    save_tiny_detector_and_segmenter(folder)
    return folder


def test_owlv2_detector_and_sam_segmenter_wrappers(tiny_models):
    detector = OpenVocabularyDetector(str(tiny_models / "owlv2"))
    images = [
        PIL.Image.new("RGB", (80, 60), "red"),
        PIL.Image.new("RGB", (50, 70), "blue"),
        PIL.Image.new("RGB", (30, 30)),
    ]
    found = detector(images, [["dog", "cat"], ["sofa"], []], threshold=0.0)
    assert len(found) == 3 and found[2] == []
    # Padding queries (image 2 has one query, image 1 two) never come back as detections.
    assert {d.phrase for d in found[0]} <= {"dog", "cat"} and {d.phrase for d in found[1]} == {"sofa"}
    for detection in found[0] + found[1]:
        x0, y0, x1, y1 = detection.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and 0 <= detection.score <= 1

    segmenter = BoxSegmenter(str(tiny_models / "sam"))
    masks = segmenter(images, [[(0.1, 0.1, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)], [(0.0, 0.0, 1.0, 0.5)], []])
    assert [len(m) for m in masks] == [2, 1, 0]
    assert masks[0][0].shape == (60, 80) and masks[1][0].shape == (70, 50) and masks[0][0].dtype == bool

    # Half precision (the CUDA default): inputs are cast to the model's dtype, outputs back to float.
    half = OpenVocabularyDetector(str(tiny_models / "owlv2"), dtype=torch.bfloat16)
    assert {d.phrase for d in half(images[:1], [["dog"]], threshold=0.0)[0]} == {"dog"}
    half_masks = BoxSegmenter(str(tiny_models / "sam"), dtype=torch.bfloat16)(images[:1], [[(0.1, 0.1, 0.5, 0.5)]])
    assert half_masks[0][0].shape == (60, 80)


@pytest.mark.parametrize("size", [(96, 64), (64, 96)])
def test_owlv2_boxes_are_fractions_of_the_padded_square(tiny_models, size):
    """OWLv2 pads an image to a square at the bottom and right and predicts boxes in that square: on a
    non-square image, a box is its raw prediction scaled by the square's side, clipped to the image."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    width, height = size
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    found = OpenVocabularyDetector(str(tiny_models / "owlv2"))([image], [["dog"]], threshold=0.0)[0]

    processor = AutoProcessor.from_pretrained(tiny_models / "owlv2")
    model = AutoModelForZeroShotObjectDetection.from_pretrained(tiny_models / "owlv2").eval()
    with torch.no_grad():
        outputs = model(**processor(text=[["dog"]], images=[image], return_tensors="pt"))
    side = max(width, height)
    expected = []
    for (cx, cy, w, h), score in zip(outputs.pred_boxes[0].tolist(), outputs.logits[0, :, 0].sigmoid().tolist()):
        x0, x1 = (min(max((cx + s * w / 2) * side, 0), width) for s in (-1, 1))
        y0, y1 = (min(max((cy + s * h / 2) * side, 0), height) for s in (-1, 1))
        if x1 - x0 >= 1 and y1 - y0 >= 1:  # boxes wholly in the padding are dropped
            expected.append(((x0 / width, y0 / height, x1 / width, y1 / height), score))
    # The zeroed box head gives each patch of the 4 x 4 grid a box a quarter of the square wide, centred
    # at 1/4, 2/4, 3/4 and 4/4 of the square: the last row (or column) of boxes lies wholly in the padding.
    # Scaled by the image's own height and width, all 16 boxes would overlap the image.
    assert len(found) == len(expected) == 12
    for detection, (box, score) in zip(sorted(found, key=lambda d: d.box), sorted(expected)):
        assert detection.phrase == "dog"
        assert detection.box == pytest.approx(box, abs=1e-5) and detection.score == pytest.approx(score)


def test_grounding_dino_detector_wrapper(tmp_path, capsys):
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "dog", "red", "ball", "cat"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(
        GroundingDinoConfig(
            backbone_config=SwinConfig(
                image_size=64,
                patch_size=4,
                embed_dim=8,
                depths=[1, 1],
                num_heads=[1, 1],
                window_size=4,
                out_features=["stage1", "stage2"],
            ),
            text_config=BertConfig(
                vocab_size=len(words),
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=64,
            ),
            num_queries=10,
            encoder_layers=1,
            decoder_layers=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            d_model=32,
            num_feature_levels=2,
            encoder_n_points=2,
            decoder_n_points=2,
            max_text_len=32,
        )
    )
    model.save_pretrained(tmp_path / "gdino")
    processor = GroundingDinoProcessor(
        GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}), tokenizer
    )
    processor.save_pretrained(tmp_path / "gdino")

    detector = OpenVocabularyDetector(str(tmp_path / "gdino"))
    assert detector.family == "grounding-dino" and detector.threshold == 0.35
    # One phrase per pass: every phrase gets its own boxes (10 queries of the model each, at threshold 0).
    found = detector([PIL.Image.new("RGB", (80, 60), "red")], [["dog", "red ball"]], threshold=0.0)
    assert {d.phrase for d in found[0]} == {"dog", "red ball"}
    assert all(0 <= d.box[0] <= d.box[2] <= 1 and 0 <= d.box[1] <= d.box[3] <= 1 for d in found[0])

    # `msdiff data build` keeps Grounding DINO's boxes from its documented 0.35 up unless told otherwise.
    _scene(tmp_path / "photos" / "0.png", [("red ball", (4, 4, 40, 40))])
    (tmp_path / "photos" / "0.txt").write_text("a red ball")
    args = ["data", "build", str(tmp_path / "photos"), "--detector", str(tmp_path / "gdino"), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "detections scoring >= 0.35;" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--score-threshold", "0.5"]) == 0
    assert "detections scoring >= 0.5;" in capsys.readouterr().err


def test_build_command_end_to_end_on_tiny_models(tiny_models, tmp_path, capsys):
    source = tmp_path / "photos"
    scenes = [
        ("a red ball and a blue box", [("red ball", (4, 4, 40, 40)), ("blue box", (50, 20, 90, 60))]),
        ("a green cup on a table", [("green cup", (30, 10, 60, 50))]),
        ("a red ball", [("red ball", (10, 10, 80, 50))]),
    ]
    for k, (caption, objects) in enumerate(scenes):
        _scene(source / f"{k}.png", objects)
        (source / f"{k}.txt").write_text(caption)
    out = tmp_path / "dataset"
    args = [
        "data",
        "build",
        str(source),
        "--out",
        str(out),
        "--detector",
        str(tiny_models / "owlv2"),
        "--segmenter",
        str(tiny_models / "sam"),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        # random models: every query scores about 0.5, so the threshold is lowered to keep some
        "--score-threshold",
        "0.0",
        "--min-box-area",
        "0.001",
        "--max-overlap",
        "1.0",
    ]
    assert main(args) == 0
    printed, err = capsys.readouterr()
    assert "3 of 3 items written" in printed and "manifest:" in printed
    assert "detections scoring >= 0.0;" in err
    samples = read_manifest(out / "manifest.jsonl")
    assert len(samples) == 3
    assert {s.phrase for s in samples[0].subjects} <= {"red ball", "blue box"}
    assert all(1 <= len(s.subjects) <= 4 for s in samples)
    assert any(subject.reference.mask for sample in samples for subject in sample.subjects)  # SAM masks
    assert validate_manifest(out / "manifest.jsonl", open_images=True)[2] == 0

    assert main(["data", "check", str(out / "manifest.jsonl")]) == 0
    assert "samples: 3 valid" in capsys.readouterr().out
    assert main(args) == 2  # refuses to overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--detector", str(tmp_path / "nowhere")]) == 2
    assert "--detector: " in (err := capsys.readouterr().err) and "nowhere' does not exist" in err
