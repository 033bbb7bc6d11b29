"""The training manifest: parsing, line-numbered validation, and `msdiff data check`."""

import json

import PIL.Image
import pytest

from msdiffusion.app.cli import main
from msdiffusion.data.manifest import (
    ManifestError,
    Reference,
    Sample,
    SubjectRecord,
    read_manifest,
    validate_manifest,
    write_manifest,
)


def _image(path, size=(64, 48), color="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, color).save(path)
    return path


def _subject(phrase, box, reference="photo.png", **extra):
    return {"phrase": phrase, "box": box, "reference": reference, **extra}


def _write(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def folder(tmp_path):
    _image(tmp_path / "photo.png")
    _image(tmp_path / "refs" / "dog.png", (32, 32), "blue")
    _image(tmp_path / "masks" / "dog.png", (16, 32), "white")
    return tmp_path


def test_valid_manifest_resolves_paths_and_reference_forms(folder):
    manifest = _write(
        folder / "train.jsonl",
        [
            {
                "image": "photo.png",
                "caption": "A dog and a cat",
                "subjects": [
                    _subject(
                        "dog",
                        [0.1, 0.2, 0.5, 0.9],
                        {"image": "refs/dog.png", "crop": [0, 0, 0.5, 1], "mask": "masks/dog.png"},
                    ),
                    _subject("Cat", [0.5, 0.2, 0.9, 0.8]),
                ],
            },
            "",
            {
                "image": str(folder / "photo.png"),
                "caption": "an empty room",
                "subjects": [],
                "id": 7,
                "width": 64,
                "height": 48,
            },
        ],
    )
    samples = read_manifest(manifest)
    assert [s.line for s in samples] == [1, 3]
    first, second = samples
    assert first.image == folder / "photo.png"
    assert first.subjects[0].reference == Reference(
        folder / "refs/dog.png", (0.0, 0.0, 0.5, 1.0), folder / "masks/dog.png"
    )
    assert first.subjects[1].reference == Reference(folder / "photo.png")  # a plain path is the short form
    assert first.subjects[1].phrase == "Cat"  # phrases match the caption case-insensitively
    assert (second.id, second.width, second.height, second.subjects) == ("7", 64, 48, [])
    _, problems, total = validate_manifest(manifest, open_images=True)  # mask 16x32 is the crop's size
    assert (problems, total) == ([], 0)


def test_bad_manifest_lists_every_problem_with_line_numbers(folder):
    good = {"image": "photo.png", "caption": "a dog", "subjects": [_subject("dog", [0.1, 0.1, 0.5, 0.5])]}
    manifest = _write(
        folder / "bad.jsonl",
        [
            good,
            '{"image": "photo.png", "caption": "a dog",',  # 2: broken JSON
            {"image": "photo.png", "subjects": []},  # 3: no caption
            {
                "image": "photo.png",
                "caption": "a dog",
                "subjects": [_subject("dog", [0.5, 0.1, 0.2, 0.5])],
            },  # 4: reversed box
            {
                "image": "photo.png",
                "caption": "a dog",
                "subjects": [_subject("dog", [10, 20, 300, 200])],
            },  # 5: pixel box
            {
                "image": "photo.png",
                "caption": "a dog",
                "subjects": [_subject("cat", [0.1, 0.1, 0.5, 0.5])],
            },  # 6: phrase not in caption
            {"image": "photo.png", "catpion": "a dog", "caption": "a dog", "subjects": []},  # 7: typo key
            {
                "image": "missing.png",
                "caption": "a dog",
                "subjects": [_subject("dog", [0.1, 0.1, 0.5, 0.5], {"image": "refs/none.png"})],
            },  # 8: two missing files
            {
                "image": "photo.png",
                "caption": "a dog and a cat",
                "subjects": [_subject("dog", [0.1, 0.1, 0.4, 0.4]), _subject("dog", [0.5, 0.5, 0.9, 0.9])],
            },  # 9: dog twice
            [1, 2],  # 10: not an object
            {"image": "photo.png", "caption": "a dog", "subjects": [{"phrase": "dog"}]},  # 11: no box, no reference
        ],
    )
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    error = caught.value
    found = {(p.line, p.field) for p in error.problems}
    assert found == {
        (2, ""),
        (3, "caption"),
        (4, "subjects[0].box"),
        (5, "subjects[0].box"),
        (6, "subjects[0].phrase"),
        (7, "catpion"),
        (8, "image"),
        (8, "subjects[0].reference.image"),
        (9, "subjects[1].phrase"),
        (10, ""),
        (11, "subjects[0].box"),
        (11, "subjects[0].reference"),
    }
    text = str(error)
    assert f"{manifest}:2: not valid JSON" in text
    assert f"{manifest}:3: caption: missing (required)" in text
    assert f"{manifest}:4: subjects[0].box: [0.5, 0.1, 0.2, 0.5] is empty or reversed ([x0, y0, x1, y1]" in text
    assert "pixel coordinates must be divided by the image width and height" in text
    assert f"{manifest}:6: subjects[0].phrase: 'cat' does not appear in the caption" in text
    assert f"{manifest}:7: catpion: unknown key (did you mean 'caption'?); allowed: image, caption" in text
    assert "file not found" in text and "refs/none.png" in text
    assert "2 subjects are named 'dog' but the caption has it 1 time(s)" in text
    assert [p.kind for p in error.problems if p.line == 8] == ["missing", "missing"]


def test_problem_limit_keeps_counting(folder):
    manifest = _write(folder / "many.jsonl", ['{"image": 1}'] * 30)
    samples, problems, total = validate_manifest(manifest, max_problems=5)
    assert samples == [] and len(problems) == 5
    assert total == 90  # per line: image not a string, caption missing, subjects missing
    with pytest.raises(ManifestError, match=r"\.\.\. and 85 more problems"):
        read_manifest(manifest, max_problems=5)


def test_opening_images_checks_sizes_and_readability(folder):
    (folder / "broken.png").write_text("not an image")
    _image(folder / "masks" / "wrong.png", (5, 5))
    manifest = _write(
        folder / "sizes.jsonl",
        [
            {"image": "photo.png", "caption": "a dog", "width": 100, "height": 48, "subjects": []},
            {"image": "broken.png", "caption": "a dog", "subjects": []},
            {
                "image": "photo.png",
                "caption": "a dog",
                "subjects": [
                    _subject("dog", [0.1, 0.1, 0.5, 0.5], {"image": "refs/dog.png", "mask": "masks/wrong.png"})
                ],
            },
        ],
    )
    assert validate_manifest(manifest, open_images=False)[2] == 0  # headers are only read on request
    _, problems, _ = validate_manifest(manifest, open_images=True)
    by_line = {p.line: p for p in problems}
    assert "differ from the image's 64x48" in by_line[1].message
    assert by_line[2].kind == "unreadable"
    assert (
        by_line[3].field == "subjects[0].reference.mask" and "must be the reference image's size" in by_line[3].message
    )


def test_write_and_read_back(folder):
    sample = Sample(
        folder / "photo.png",
        "a dog on grass",
        [
            SubjectRecord(
                "dog", (0.1, 0.2, 0.3, 0.4), Reference(folder / "refs/dog.png", (0.0, 0.1, 0.9, 1.0)), {"score": 0.5}
            )
        ],
        id="x",
        width=64,
        height=48,
        meta={"source": "test"},
    )
    write_manifest([sample], folder / "out" / "manifest.jsonl")
    line = json.loads((folder / "out" / "manifest.jsonl").read_text())
    assert line["image"] == "../photo.png"  # relative to the manifest's folder
    (back,) = read_manifest(folder / "out" / "manifest.jsonl")
    assert back.subjects == sample.subjects and back.meta == sample.meta
    assert (back.image.resolve(), back.id, back.width) == (sample.image.resolve(), "x", 64)


def test_check_command_reports_statistics(folder, capsys):
    manifest = _write(
        folder / "train.jsonl",
        [
            {
                "image": "photo.png",
                "caption": "a dog and a cat",
                "subjects": [_subject("dog", [0.0, 0.0, 0.5, 0.5]), _subject("cat", [0.5, 0.5, 0.7, 0.7])],
            },
            {
                "image": "photo.png",
                "caption": "a dog",
                "subjects": [_subject("dog", [0.0, 0.0, 1.0, 1.0], "refs/dog.png")],
            },
        ],
    )
    assert main(["data", "check", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "samples: 2 valid, 0 line(s) with problems" in out
    assert "subjects: 3; subjects per sample: 1: 1, 2: 1" in out
    assert "box area (fraction of the image): min 0.040, 10% 0.082, median 0.250" in out
    assert "box area histogram: 0-0.01: 0, 0.01-0.05: 1, 0.05-0.1: 0, 0.1-0.25: 0, 0.25-0.5: 1" in out
    assert "2 taken from the target image itself, 1 from other images" in out
    assert "top phrases: dog (2), cat (1)" in out
    assert "problems: none" in out


def test_check_command_fails_on_problems(folder, capsys):
    manifest = _write(
        folder / "bad.jsonl",
        [
            {"image": "photo.png", "caption": "a dog", "subjects": [_subject("dog", [0.1, 0.1, 0.5, 0.5])]},
            {"image": "gone.png", "caption": "a dog", "subjects": []},
            {"image": "photo.png", "caption": "a dog", "subjects": [_subject("dog", [0.1, 0.1, 1.5, 0.5])]},
        ],
    )
    assert main(["data", "check", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert f"{manifest}:2: image: file not found" in out
    assert f"{manifest}:3: subjects[0].box: [0.1, 0.1, 1.5, 0.5] is outside [0, 1]" in out
    assert "samples: 1 valid, 2 line(s) with problems" in out
    assert "problems: 2 (missing files: 1, unreadable images: 0)" in out

    assert main(["data", "check", str(folder / "nowhere.jsonl")]) == 2
    assert "manifest not found" in capsys.readouterr().err
