"""`msdiff data check` decodes every image, in parallel; an empty manifest is a problem."""

import json

import numpy as np
import PIL.Image

from msdiffusion.app.cli import main
from msdiffusion.data.manifest import validate_manifest


def _manifest(tmp_path, count=6, truncate=(2,)):
    rng = np.random.default_rng(0)
    lines = []
    for k in range(count):
        path = tmp_path / f"{k}.jpg"
        PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        if k in truncate:
            raw = path.read_bytes()
            path.write_bytes(raw[: len(raw) // 2])
        subject = {
            "phrase": "dog",
            "box": [0.1, 0.1, 0.6, 0.7],
            "reference": {"image": f"{k}.jpg", "crop": [0.1, 0.1, 0.6, 0.7]},
        }
        lines.append(json.dumps({"image": f"{k}.jpg", "caption": "a dog", "subjects": [subject]}))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_truncated_image_is_a_problem(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    assert main(["data", "check", str(manifest), "--workers", "3"]) == 1
    captured = capsys.readouterr()
    assert "manifest.jsonl:3: image: cannot read" in captured.out and "truncated" in captured.out
    assert "unreadable images: 2" in captured.out  # the target and its reference (the same file)
    assert "decoding images" in captured.err  # the progress bar
    # headers only: the header of a truncated JPEG is intact, so it passes (documented as the trade-off)
    assert main(["data", "check", str(manifest), "--headers-only", "--quiet"]) == 0


def test_parallel_check_keeps_line_order(tmp_path):
    manifest = _manifest(tmp_path, count=12, truncate=(3, 7, 10))
    _, problems, total = validate_manifest(manifest, open_images=True, decode=True, workers=4)
    assert [p.line for p in problems] == [4, 4, 8, 8, 11, 11] and total == 6


def test_empty_manifest_is_a_problem(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["data", "check", str(tmp_path / "empty.jsonl")]) == 1
    out = capsys.readouterr().out
    assert "the manifest has no samples" in out and "problems: 1 (the manifest is empty)" in out


def test_an_image_over_pillows_pixel_limit_is_an_unreadable_image_everywhere(tmp_path, capsys):
    """A small PNG of 200 million pixels (Pillow refuses to decode it: DecompressionBombError, which
    is neither an OSError nor a ValueError) is a problem line in `data check`, a sample that
    `bad_samples: skip` can replace in training, and a one-line error as a subject photo."""
    import pytest

    from msdiffusion.data.dataset import SampleReadError, _open_rgb
    from msdiffusion.subjects import load_image

    manifest = _manifest(tmp_path, truncate=())
    PIL.Image.new("1", (20000, 10000)).save(tmp_path / "2.jpg", format="PNG")  # a few KB on disk
    assert main(["data", "check", str(manifest), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "manifest.jsonl:3: image: cannot read" in out and "decompression bomb" in out, out
    with pytest.raises(SampleReadError, match="cannot read"):
        _open_rgb(tmp_path / "2.jpg", "manifest.jsonl:3: image")
    with pytest.raises(ValueError, match="cannot read .*2.jpg"):
        load_image(str(tmp_path / "2.jpg"), "subjects[0].image")
