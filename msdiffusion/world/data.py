"""The world's training set on disk: PNG scenes, PNG references and the ordinary training manifest.

`write_dataset` renders scenes of training identities only and writes `manifest.jsonl` in the
format of docs/data.md (so `msdiff data check` and `msdiff train` read it like any other data);
each subject's reference is another rendering of it, stored with its mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

from ..data.manifest import Reference, Sample, SubjectRecord, read_manifest, write_manifest
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
    samples = [sample for _, sample in sorted((pair for part in parts for pair in part), key=lambda p: p[0])]
    manifest = directory / MANIFEST
    write_manifest(samples, manifest)  # the training data's own writer: the world's data is ordinary data
    return manifest


def _write_scenes(directory: Path, seed: int, indices: range) -> list[tuple[int, Sample]]:
    samples = []
    for i in indices:
        rng = np.random.default_rng([seed, i])
        scene = random_scene(rng, held_out=False)
        name = f"{i:06d}"
        image = directory / "images" / f"{name}.png"
        PIL.Image.fromarray(scene.image).save(image, compress_level=1)
        subjects = []
        for k, subject in enumerate(scene.subjects):
            reference, mask = render_reference(rng, subject.cls, subject.identity)
            ref, ref_mask = (
                directory / "references" / f"{name}_{k}.png",
                directory / "references" / f"{name}_{k}_mask.png",
            )
            PIL.Image.fromarray(reference).save(ref, compress_level=1)
            PIL.Image.fromarray((mask * 255).astype(np.uint8)).save(ref_mask, compress_level=1)
            box = tuple(round(float(c), 6) for c in subject.box)
            subjects.append(
                SubjectRecord(subject.cls, box, Reference(ref, mask=ref_mask), {"identity": subject.identity})
            )
        height, width = scene.image.shape[:2]
        samples.append(
            (i, Sample(image, scene.caption, subjects, name, width, height, {"background": scene.background}))
        )
    return samples


def read_world_manifest(manifest: str | Path) -> list[Sample]:
    """The world's manifest, read by the training data's reader (files are not opened here)."""
    return read_manifest(manifest, check_files=False)


def load_images(manifest: str | Path) -> np.ndarray:
    """All target images of a manifest as one (N, H, W, 3) uint8 array."""
    return np.stack([np.asarray(PIL.Image.open(s.image).convert("RGB")) for s in read_world_manifest(manifest)])
