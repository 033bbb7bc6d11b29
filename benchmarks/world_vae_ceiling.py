"""The best any base could score with a world build's VAE: the evaluator on held-out scenes as
rendered, and the same scenes passed through the VAE (encode, decode the mean).

A diffusion model draws through its VAE's decoder, so what the round trip loses (thin stripes,
small dots) no base or adapter can put back: the second row bounds the world's identity and found
rates from above.

    python benchmarks/world_vae_ceiling.py --models runs/world --count 150
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", required=True, help="a `msdiff world build --out` folder (base/vae, evaluator.safetensors)")
    parser.add_argument("--count", type=int, default=150, help="held-out scenes (default: 150)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from diffusers import AutoencoderKL

    from msdiffusion.world.evaluate import AskedSubject, WorldEvaluator, summarize
    from msdiffusion.world.scenes import random_scene

    root = Path(args.models)
    vae = AutoencoderKL.from_pretrained(root / "base" / "vae", torch_dtype=torch.float32)
    evaluator = WorldEvaluator.from_file(root / "evaluator.safetensors")
    scenes = [random_scene(np.random.default_rng([args.seed, 21, i]), held_out=True) for i in range(args.count)]
    rendered = np.stack([s.image for s in scenes])
    with torch.no_grad():
        x = torch.from_numpy(rendered).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = torch.cat([vae.decode(vae.encode(x[i : i + 50]).latent_dist.mode()).sample for i in range(0, len(x), 50)])
    round_trip = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    print("| images | subjects | found (IoU>=0.5) | placed (any shape) | identity correct |")
    print("| --- | --- | --- | --- | --- |")
    for name, images in (("rendered", rendered), ("through the VAE", round_trip)):
        maps = evaluator.class_maps(images)
        results = [
            evaluator.evaluate(image, [AskedSubject(s.cls, s.identity, s.box) for s in scene.subjects], class_map)
            for image, scene, class_map in zip(images, scenes, maps)
        ]
        rates = summarize(results)["all"]
        print(f"| {name} | {rates['subjects']} | {rates['found']:.1%} | {rates['placed']:.1%} | {rates['identity_correct']:.1%} |")


if __name__ == "__main__":
    main()
