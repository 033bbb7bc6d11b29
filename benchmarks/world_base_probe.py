"""What the world's base draws from words alone: held-out subjects asked by a described caption.

The adapter can only steer what the base knows how to draw. This asks the base (no adapter) for
one held-out subject at a time, with the caption that describes its identity ("a red blue small
dotted star on sand") and with the plain one ("a star on sand"), and reports how often the
evaluator finds a shape of the asked class anywhere, and how often that shape has the asked
identity (against the same rivals as `msdiff world evaluate`).

    python benchmarks/world_base_probe.py --models runs/world --count 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def draw_picture(pipe, path: Path, steps: int, guidance: float) -> None:
    """Top: a rendering of 8 training identities; bottom: the base's image for their described captions."""
    import PIL.Image

    from msdiffusion.world.scenes import SIZE, caption_for, random_subjects, render_reference

    rng = np.random.default_rng(1)
    prompts, references = [], []
    for _ in range(8):
        subject = random_subjects(rng, 1, held_out=False)[0]
        prompts.append(caption_for([subject.cls], "a plain wall", [subject.identity]))
        references.append(render_reference(rng, subject.cls, subject.identity)[0])
    images = pipe(
        prompt=prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        generator=[torch.Generator().manual_seed(k) for k in range(8)],
    ).images
    grid = np.concatenate([np.concatenate(references, 1), np.concatenate([np.asarray(i) for i in images], 1)], 0)
    PIL.Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), PIL.Image.NEAREST).save(path)
    print(f"picture: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True, help="a `msdiff world build --out` folder")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--picture", type=Path, help="also draw 8 training identities from their described captions (docs/world.md)"
    )
    args = parser.parse_args()

    from diffusers import StableDiffusionXLPipeline

    from msdiffusion.world.evaluate import (
        MIN_REGION_PIXELS,
        WorldEvaluator,
        connected_regions,
        held_out_jobs,
        identity_is_correct,
    )
    from msdiffusion.world.scenes import CLASSES, SIZE, caption_for

    pipe = StableDiffusionXLPipeline.from_pretrained(args.models / "base", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    evaluator = WorldEvaluator.from_file(args.models / "evaluator.safetensors")
    if args.picture:
        draw_picture(pipe, args.picture, args.steps, args.guidance)
    jobs = held_out_jobs(args.count, args.seed, subject_counts=(1,))
    for described in (False, True):
        found = correct = 0
        for start in range(0, len(jobs), 8):
            chunk = jobs[start : start + 8]
            prompts = []
            for job in chunk:
                subject = job.subjects[0]
                background = job.prompt.split(" on ", 1)[1]
                prompts.append(caption_for([subject.cls], background, [subject.identity] if described else None))
            generators = [torch.Generator().manual_seed(args.seed + start + k) for k in range(len(chunk))]
            images = pipe(
                prompt=prompts,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=SIZE,
                width=SIZE,
                generator=generators,
            ).images
            images = np.stack([np.asarray(image.convert("RGB")) for image in images])
            for image, class_map, job in zip(images, evaluator.class_maps(images), chunk):
                subject = job.subjects[0]
                regions = [
                    r
                    for r in connected_regions(class_map == 1 + CLASSES.index(subject.cls))
                    if r.sum() >= MIN_REGION_PIXELS
                ]
                if regions:
                    found += 1
                    largest = max(regions, key=lambda r: r.sum())
                    correct += identity_is_correct(image, largest, subject, [])
        kind = "described caption" if described else "class-only caption"
        print(
            f"{kind:20s}: asked class drawn {found / len(jobs):6.1%}, and with the asked identity {correct / len(jobs):6.1%} ({len(jobs)} held-out subjects)"
        )


if __name__ == "__main__":
    main()
