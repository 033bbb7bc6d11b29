"""Does the drawn arrangement of a subject's two colours follow its reference?

A third of the world's identities are two colours arranged along an axis: halves (vertical or
horizontal) and gradients (four directions). Which colour goes on which side is part of the
identity, and only the reference shows it. This draws `--count` lone held-out subjects of those
patterns on a plain wall, each twice: with its reference, and with the reference mirrored across the
identity's axis (which asks for the other arrangement). In the drawn shape (every pixel the
evaluator's segmenter does not call background) it compares the mean colour of the two sides of
the axis with the identity's two colours, and reports how often the arrangement is the one asked,
and how often mirroring the reference mirrors the drawing (1.0: the reference decides it; near 0:
something else does). The base alone, asked by the caption that describes the identity ("a red
blue vertical halved square"), and the real renderings (a check of the measure: 1.0) are scored
the same way.

    python benchmarks/world_arrangement.py --count 96
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np

from msdiffusion.world.weights import MODELS_HELP


def asked_side_score(image: np.ndarray, shape: np.ndarray, identity: int, mirrored: bool = False) -> float:
    """> 0 when the first colour is on the side of the axis the identity asks for (the other side
    when `mirrored`); nan when no shape, or a shape on one side only, was drawn."""
    from msdiffusion.world.scenes import COLORS, identity_parts

    first, second, (_, direction) = identity_parts(identity)
    if shape.sum() < 20:
        return float("nan")
    ys, xs = np.nonzero(shape)
    yy, xx = np.mgrid[: shape.shape[0], : shape.shape[1]]
    # halves and gradients at 0 and 90 degrees put the first colour left / on top; 180 and 270 right / below
    low_side = (xx < (xs.min() + xs.max()) / 2) if direction % 180 == 0 else (yy < (ys.min() + ys.max()) / 2)
    first_side = low_side if (direction < 180) != mirrored else ~low_side
    if not (shape & first_side).any() or not (shape & ~first_side).any():
        return float("nan")
    a, b = (np.array(COLORS[c], np.float32) for c in (first, second))
    near, far = (image[shape & side].astype(np.float32).mean(0) for side in (first_side, ~first_side))
    return float(
        np.linalg.norm(near - b) + np.linalg.norm(far - a) - np.linalg.norm(near - a) - np.linalg.norm(far - b)
    )


def mirror(reference: np.ndarray, identity: int) -> np.ndarray:
    from msdiffusion.world.scenes import identity_parts

    direction = identity_parts(identity)[2][1]
    return np.ascontiguousarray(reference[:, ::-1] if direction % 180 == 0 else reference[::-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help=MODELS_HELP)
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--training", action="store_true", help="training identities instead of held-out ones")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import tempfile

    import PIL.Image

    from msdiffusion.bench.definitions import BenchSample, BenchSubject
    from msdiffusion.bench.runner import BenchSettings
    from msdiffusion.loading import WORLD, named_settings
    from msdiffusion.world.bench import WorldScorer, run_world_samples
    from msdiffusion.world.scenes import (
        NUM_IDENTITIES,
        SceneSubject,
        caption_for,
        identity_parts,
        is_held_out,
        render_reference,
        render_scene,
    )
    from msdiffusion.world.weights import world_models, world_pipeline

    paths = world_models(args.models)
    scorer = WorldScorer(paths["evaluator"], paths["image_encoder"])
    pipe = None

    def pipeline():
        nonlocal pipe
        pipe = pipe or world_pipeline(paths)
        return pipe

    arranged = [
        i
        for i in range(NUM_IDENTITIES)
        if identity_parts(i)[2][0] in ("halves", "gradient") and is_held_out(i) != args.training
    ]
    scratch = Path(tempfile.mkdtemp(prefix="world-arrangement-"))
    references = scratch / "references"
    jobs, mirrored_jobs, described, truth, identities = [], [], [], [], []
    for n in range(args.count):
        rng = np.random.default_rng([args.seed, 9, n])
        identity = int(rng.choice(arranged))
        cls = str(rng.choice(["square", "circle", "diamond", "heart"]))  # shapes the models draw most reliably
        scene = render_scene(rng, [SceneSubject(cls, identity)], background="a plain wall")
        box = tuple(float(c) for c in scene.subjects[0].box)
        reference = render_reference(rng, cls, identity)[0]
        for source, image in ((f"{n:04d}", reference), (f"{n:04d}-mirrored", mirror(reference, identity))):
            (references / source).mkdir(parents=True)
            PIL.Image.fromarray(image).save(references / source / "0.png")
        caption = caption_for([cls], scene.background)
        jobs.append(
            BenchSample("arrangement", f"{n:04d}", "own", caption, (BenchSubject(cls, cls, f"{n:04d}", box, identity),))
        )
        mirrored_jobs.append(
            BenchSample(
                "arrangement",
                f"{n:04d}",
                "mirrored",
                caption,
                (BenchSubject(cls, cls, f"{n:04d}-mirrored", box, identity),),
            )
        )
        described.append(
            BenchSample(
                "arrangement",
                f"{n:04d}",
                "described",
                caption_for([cls], scene.background, [identity]),
                jobs[-1].subjects,
            )
        )
        truth.append(asked_side_score(scene.image.astype(np.float32), scene.masks[0], identity))
        identities.append(identity)
    settings = BenchSettings(
        base=WORLD, adapter=WORLD, image_encoder=WORLD, **vars(named_settings(WORLD)), seed=args.seed
    )

    def scores(samples: list, mirrored: bool, **changes) -> np.ndarray:
        """Each sample generated through the bench runner (the same seed per sample id in every run)."""
        out = scratch / samples[0].group
        run_world_samples(samples, out, dataclasses.replace(settings, **changes), pipeline, scorer, references)
        images = [
            np.asarray(PIL.Image.open(out / "images" / s.group / f"{s.sample_id}_0.png").convert("RGB"))
            for s in samples
        ]
        maps = scorer.evaluator.class_maps(np.stack(images))
        return np.array([asked_side_score(im, m != 0, i, mirrored) for im, m, i in zip(images, maps, identities)])

    own = scores(jobs, mirrored=False)
    flipped = scores(mirrored_jobs, mirrored=True)
    # scale 0: the image branch adds nothing, so this is the base alone (docs/world.md, "Ablations")
    words = scores(described, mirrored=False, scale=0.0)

    def rate(values: np.ndarray) -> str:
        drawn = values[~np.isnan(values)]
        return f"{np.mean(drawn > 0):.2f} of {len(drawn)}"

    both = ~np.isnan(own) & ~np.isnan(flipped)
    follows = np.mean((own[both] > 0) == (flipped[both] > 0))  # as asked both times, or wrong both times
    print(f"{len(jobs)} lone {'training' if args.training else 'held-out'} subjects of halves and gradients")
    print(f"  real renderings, as asked:                     {rate(np.array(truth))}")
    print(f"  with the reference, as asked:                  {rate(own)}")
    print(f"  with the mirrored reference, as it asks:       {rate(flipped)}")
    print(f"  mirroring the reference mirrors the drawing:   {follows:.2f} of {both.sum()}")
    print(f"  the base alone, described caption, as asked:   {rate(words)}")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
