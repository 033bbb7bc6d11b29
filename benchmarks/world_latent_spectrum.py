"""How much of a world VAE's latent lies at high spatial frequencies, against the image itself.

Diffusion forms an image coarse to fine: noise drowns a latent's high frequencies first, so what
the base must decide at high noise (where a subject is, what shape it has) is only there to be
learned if the latent keeps it at low frequencies. Autoencoders with many latent channels tend
to hide structure in high-frequency codes instead (Skorokhodov et al. 2025, "Improving the
diffusability of autoencoders"), and the world's VAE has 16 channels at 4x down-sampling.

For held-out scenes this prints, for the scaled latents (16x16) and for the images averaged over
the same 4x4-pixel cells, the share of each one's energy (per channel, mean removed) above 1/4,
1/2 and 3/4 of the grid's Nyquist frequency. A latent that keeps more energy up there than the
image does is harder to diffuse (docs/world.md, ninth build).

    python benchmarks/world_latent_spectrum.py --vae runs/world/base/vae
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

CUTOFFS = (0.25, 0.5, 0.75)


def high_frequency_shares(grids: torch.Tensor) -> list[float]:
    """Mean over images and channels of the share of energy above each cutoff (a fraction of Nyquist,
    by the larger of the two axes' frequencies) of (N, C, H, W) grids."""
    centred = grids - grids.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centred).abs().square()
    frequency = torch.fft.fftfreq(grids.shape[-1]).abs() / 0.5
    radius = torch.maximum(frequency[:, None], frequency[None, :])
    total = power.sum(dim=(-2, -1)).clamp_min(1e-12)
    return [(power[..., radius > cutoff].sum(dim=-1) / total).mean().item() for cutoff in CUTOFFS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", required=True, help="an AutoencoderKL folder (a world build's base/vae)")
    parser.add_argument("--count", type=int, default=128, help="held-out scenes (default: 128)")
    parser.add_argument("--seed", type=int, default=99)
    args = parser.parse_args()

    from diffusers import AutoencoderKL

    from msdiffusion.world.scenes import random_scene

    vae = AutoencoderKL.from_pretrained(args.vae, dtype=torch.float32).eval()
    images = np.stack(
        [random_scene(np.random.default_rng([args.seed, i]), held_out=True).image for i in range(args.count)]
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(64)]) * vae.config.scaling_factor
    factor = x.shape[-1] // latents.shape[-1]
    header = " | ".join(f"above {c:g} Nyquist" for c in CUTOFFS)
    print(f"| {args.count} held-out scenes | {header} |")
    print("| --- |" + " --- |" * len(CUTOFFS))
    for name, grids in (
        (f"latents ({latents.shape[1]} channels)", latents),
        (f"images averaged over {factor}x{factor} px", F.avg_pool2d(x, factor)),
    ):
        print(f"| {name} | " + " | ".join(f"{share:.1%}" for share in high_frequency_shares(grids)) + " |")


if __name__ == "__main__":
    main()
