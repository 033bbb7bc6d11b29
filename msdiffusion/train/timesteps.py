"""Which noise levels a training step sees."""

from __future__ import annotations

import torch


def draw_timesteps(
    batch_size: int, num_timesteps: int, high_noise_share: float, generator: torch.Generator
) -> torch.Tensor:
    """Uniform timesteps, a `high_noise_share` of them drawn from the noisier half of the schedule only.

    The noisier half is where a sample's layout and outlines are decided; a small or young model is
    weakest there (docs/world.md). With no share no further numbers are drawn, so the random stream
    is the one uniform sampling always used, and runs from before the option resume unchanged.
    """
    timesteps = torch.randint(0, num_timesteps, (batch_size,), generator=generator)
    if high_noise_share > 0:
        high = torch.rand(batch_size, generator=generator) < high_noise_share
        noisier = torch.randint(num_timesteps // 2, num_timesteps, (batch_size,), generator=generator)
        timesteps = torch.where(high, noisier, timesteps)
    return timesteps
