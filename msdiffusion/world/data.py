"""The world's training set on disk: PNG scenes, PNG references and the ordinary training manifest.

`write_dataset` renders scenes of training identities only and writes `manifest.jsonl` in the
format of docs/data.md (so `msdiff data check` and `msdiff train` read it like any other data);
each subject's reference is another rendering of it, stored with its mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image

from .scenes import random_scene, render_reference

MANIFEST = "manifest.jsonl"


def write_dataset(directory: str | Path, num_scenes: int, seed: int = 0, workers: int = 2) -> Path:
    """Render `num_scenes` training scenes into `directory`; returns the manifest's path.

    Deterministic in (num_scenes, seed) whatever `workers` is: scene i uses its own generator, so
    an interrupted run that is started again rewrites the same files.
    """
    import multiprocessing

    directory = Path(directory)
    for sub in ("images", "references"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    chunks = [(directory, seed, range(start, num_scenes, workers)) for start in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.starmap(_write_scenes, chunks)
    lines = [line for _, line in sorted(pair for part in parts for pair in part)]
    manifest = directory / MANIFEST
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _write_scenes(directory: Path, seed: int, indices: range) -> list[tuple[int, str]]:
    lines = []
    for i in indices:
        rng = np.random.default_rng([seed, i])
        scene = random_scene(rng, held_out=False)
        name = f"{i:06d}"
        PIL.Image.fromarray(scene.image).save(directory / "images" / f"{name}.png", compress_level=1)
        subjects = []
        for k, subject in enumerate(scene.subjects):
            image, mask = render_reference(rng, subject.cls, subject.identity)
            ref, ref_mask = f"references/{name}_{k}.png", f"references/{name}_{k}_mask.png"
            PIL.Image.fromarray(image).save(directory / ref, compress_level=1)
            PIL.Image.fromarray((mask * 255).astype(np.uint8)).save(directory / ref_mask, compress_level=1)
            subjects.append(
                {
                    "phrase": subject.cls,
                    "box": [round(float(c), 6) for c in subject.box],
                    "reference": {"image": ref, "mask": ref_mask},
                    "meta": {"identity": subject.identity},
                }
            )
        lines.append(
            (
                i,
                json.dumps(
                    {
                        "id": name,
                        "image": f"images/{name}.png",
                        "caption": scene.caption,
                        "subjects": subjects,
                        "width": scene.image.shape[1],
                        "height": scene.image.shape[0],
                        "meta": {"background": scene.background},
                    }
                ),
            )
        )
    return lines


def read_manifest(manifest: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]


def load_images(manifest: str | Path) -> np.ndarray:
    """All target images of a manifest as one (N, H, W, 3) uint8 array."""
    root = Path(manifest).parent
    return np.stack(
        [np.asarray(PIL.Image.open(root / entry["image"]).convert("RGB")) for entry in read_manifest(manifest)]
    )
