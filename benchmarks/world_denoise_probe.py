"""From how much noise can the world's base bring a real scene back? Measured, per noise level.

Held-out scenes are noised to a strength (diffusers' SDXL img2img: strength 0.5 starts half-way
down the schedule, 1.0 at its top) and denoised by the base alone with their class-only caption.
The evaluator then scores the result against the scene's own subjects: found (the class, in its
place), placed (any shape in its place) and identity correct. The scene's layout and looks survive
low strengths as signal; from high strengths the base has to form them itself, which is what it
does when it generates. Where the rates fall is where the base is weak (docs/world.md).

    python benchmarks/world_denoise_probe.py --models runs/world-att --count 48
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True, help="a `msdiff world build --out` folder")
    parser.add_argument("--count", type=int, default=48, help="held-out scenes")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.7, 0.9, 1.0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=99, help="scenes are those of the evaluator's ground-truth check")
    args = parser.parse_args()

    import diffusers
    import PIL.Image
    from diffusers import StableDiffusionXLImg2ImgPipeline

    diffusers.utils.logging.set_verbosity_error()  # img2img warns about the VAE's dtype once per call

    from msdiffusion.world.evaluate import AskedSubject, WorldEvaluator, summarize
    from msdiffusion.world.scenes import SIZE, caption_for, random_scene

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        args.models / "base", dtype=torch.float32, requires_aesthetics_score=False
    )
    pipe.set_progress_bar_config(disable=True)
    evaluator = WorldEvaluator.from_file(args.models / "evaluator.safetensors")
    scenes = [random_scene(np.random.default_rng([args.seed, i]), held_out=True) for i in range(args.count)]
    asked = [[AskedSubject(s.cls, s.identity, s.box) for s in scene.subjects] for scene in scenes]
    print(
        f"{args.models}: {args.count} held-out scenes, {sum(map(len, asked))} subjects, {args.steps} steps, guidance {args.guidance}"
    )
    print("| strength | found (IoU >= 0.5) | placed (any shape) | identity correct |")
    print("| --- | --- | --- | --- |")
    for strength in args.strengths:
        images = []
        for start in range(0, len(scenes), 8):
            chunk = scenes[start : start + 8]
            output = pipe(
                prompt=[caption_for([s.cls for s in scene.subjects], scene.background) for scene in chunk],
                image=[PIL.Image.fromarray(scene.image) for scene in chunk],
                strength=strength,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=SIZE,
                width=SIZE,
                generator=[torch.Generator().manual_seed(start + k) for k in range(len(chunk))],
            )
            images += [np.asarray(image.convert("RGB")) for image in output.images]
        maps = evaluator.class_maps(np.stack(images))
        rates = summarize([evaluator.evaluate(im, a, m) for im, a, m in zip(images, asked, maps)])["all"]
        print(
            f"| {strength:g} | {rates['found']:.1%} | {rates['placed']:.1%} | {rates['identity_correct']:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
