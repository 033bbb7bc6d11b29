"""The evaluator's ceiling and what it must reject: held-out scenes as rendered, through a world
build's VAE (encode, decode the mean), asked for the wrong class, and asked as another identity
with the same colours (swapped, transposed, mirrored).

A diffusion model draws through its VAE's decoder, so what the round trip loses (thin stripes,
small dots) no base or adapter can put back: the second row bounds the world's identity and found
rates from above. The last rows are drawings with the right colours and the wrong pattern or
orientation: the identity judgement must accept almost none of them (docs/world.md, "The evaluator").

    python benchmarks/world_vae_ceiling.py --count 100                   # the shipped models
    python benchmarks/world_vae_ceiling.py --models runs/world --count 150
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from msdiffusion.world.weights import MODELS_HELP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help=MODELS_HELP)
    parser.add_argument("--count", type=int, default=150, help="held-out scenes (default: 150)")
    parser.add_argument("--seed", type=int, default=99)
    args = parser.parse_args()

    from diffusers import AutoencoderKL

    from msdiffusion.world.evaluate import WRONG_IDENTITIES, WorldEvaluator, ground_truth_check
    from msdiffusion.world.weights import world_models

    paths = world_models(args.models)
    vae = AutoencoderKL.from_pretrained(Path(paths["base"]) / "vae", dtype=torch.float32)
    evaluator = WorldEvaluator.from_file(paths["evaluator"])
    print("| images | subjects | found (IoU>=0.5) | placed (any shape) | colours only | identity correct |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = [
        ("rendered", {}),
        ("through the VAE", {"vae": vae}),
        ("rendered, the wrong class asked", {"wrong_class": True}),
    ]
    rows += [(f"rendered, asked as {name}", {"asked_as": name}) for name in WRONG_IDENTITIES]
    for name, options in rows:
        rates = ground_truth_check(evaluator, args.count, args.seed, **options)["all"]
        print(
            f"| {name} | {rates['subjects']} | {rates['found']:.1%} | {rates['placed']:.1%} | "
            f"{rates['colours_correct']:.1%} | {rates['identity_correct']:.1%} |"
        )


if __name__ == "__main__":
    main()
