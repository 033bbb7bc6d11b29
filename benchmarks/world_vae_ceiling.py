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

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", required=True, help="a `msdiff world build --out` folder (base/vae, evaluator.safetensors)"
    )
    parser.add_argument("--count", type=int, default=150, help="held-out scenes (default: 150)")
    parser.add_argument("--seed", type=int, default=99)
    args = parser.parse_args()

    from diffusers import AutoencoderKL

    from msdiffusion.world.evaluate import WorldEvaluator, ground_truth_check

    root = Path(args.models)
    vae = AutoencoderKL.from_pretrained(root / "base" / "vae", dtype=torch.float32)
    evaluator = WorldEvaluator.from_file(root / "evaluator.safetensors")
    print("| images | subjects | found (IoU>=0.5) | placed (any shape) | identity correct |")
    print("| --- | --- | --- | --- | --- |")
    rows = (("rendered", None, False), ("through the VAE", vae, False), ("rendered, the wrong class asked", None, True))
    for name, through, wrong in rows:
        rates = ground_truth_check(evaluator, args.count, args.seed, vae=through, wrong_class=wrong)["all"]
        print(
            f"| {name} | {rates['subjects']} | {rates['found']:.1%} | {rates['placed']:.1%} | {rates['identity_correct']:.1%} |"
        )


if __name__ == "__main__":
    main()
