"""Shared by the training tests: tiny models on disk, generated captioned images and manifests, small configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

# Words the tiny tokenizer (msdiffusion.tiny) knows whole; the shapes' colours follow the phrase.
SCENES = [
    ("a red dog and a blue cat on the grass", [("dog", (255, 0, 0)), ("cat", (0, 0, 255))]),
    ("a green toy on the table", [("toy", (0, 200, 0))]),
    (
        "a yellow duck and a black clock and a white teapot",
        [("duck", (250, 220, 0)), ("clock", (20, 20, 20)), ("teapot", (240, 240, 240))],
    ),
    ("a brown bear in the snow", [("bear", (130, 80, 30))]),
]


def write_photos(
    folder: Path, count: int, size=(80, 64), seed: int = 0, name: str = "{:03d}.png"
) -> list[tuple[Path, str, list]]:
    """Captioned images (`NAME.png` + `NAME.txt`) with one filled rectangle per subject; returns
    (path, caption, [(phrase, box in [0, 1])]) per image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(count):
        caption, subjects = SCENES[k % len(SCENES)]
        image = PIL.Image.new("RGB", size, tuple(int(v) for v in rng.integers(60, 200, 3)))
        draw = PIL.ImageDraw.Draw(image)
        boxes = []
        width, height = size
        for j, (phrase, colour) in enumerate(subjects):
            x0 = int(j * width / len(subjects)) + int(rng.integers(0, 4))
            x1 = int((j + 1) * width / len(subjects)) - int(rng.integers(1, 4))
            y0, y1 = int(rng.integers(2, height // 3)), int(rng.integers(2 * height // 3, height - 1))
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
            boxes.append((phrase, (x0 / width, y0 / height, x1 / width, y1 / height)))
        path = folder / name.format(k)
        image.save(path)
        path.with_suffix(".txt").write_text(caption)
        written.append((path, caption, boxes))
    return written


def write_manifest(folder: Path, count: int, size=(80, 64), seed: int = 0) -> Path:
    """A valid manifest over `write_photos` images: references are crops of the targets."""
    photos = write_photos(folder / "photos", count, size, seed)
    lines = []
    for path, caption, boxes in photos:
        subjects = [
            {
                "phrase": phrase,
                "box": [round(v, 6) for v in box],
                "reference": {"image": f"photos/{path.name}", "crop": [round(v, 6) for v in box]},
            }
            for phrase, box in boxes
        ]
        lines.append(json.dumps({"image": f"photos/{path.name}", "caption": caption, "subjects": subjects}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def tiny_config(models: dict, manifest: Path, output_dir: Path, **overrides):
    """A config for tiny CPU runs: 64 px, batch 2, no workers, no tracker, no validation."""
    from msdiffusion.train import TrainConfig

    values = dict(
        base=str(models["base"]),
        image_encoder=str(models["image_encoder"]),
        manifest=str(manifest),
        output_dir=str(output_dir),
        resolution=64,
        train_batch_size=2,
        dataloader_workers=0,
        max_train_steps=2,
        checkpointing_steps=0,
        validation_steps=0,
        report_to="none",
        log_every=1,
        resampler={"dim": 64, "depth": 1, "heads": 1, "ff_mult": 1, "grounding_hidden_dim": 32},
    )
    values.update(overrides)
    return TrainConfig(**values).validate()


def reset_accelerate() -> None:
    """accelerate keeps process-wide state; tests that build several runs in one process reset it."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
