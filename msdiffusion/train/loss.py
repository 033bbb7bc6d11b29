"""The diffusion loss: squared error of the prediction, optionally weighted towards the subjects'
boxes (`subject_loss_weight`) and by min-SNR (`snr_gamma`).

The release trains with the plain mean; both weightings are off by default. The box weighting
serves the world's models (docs/world.md), where subjects are a small part of each image.
"""

from __future__ import annotations

import torch


def box_cover(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 4) boxes [x0, y0, x1, y1] in [0, 1] -> (B, 1, height, width): the share of each cell of
    the grid that lies inside a box (the largest over the boxes); all-zero boxes cover nothing."""
    boxes = boxes.float()

    def overlap(low: torch.Tensor, high: torch.Tensor, cells: int) -> torch.Tensor:  # (B, N, cells)
        edges = torch.arange(cells + 1, dtype=torch.float32, device=boxes.device) / cells
        spans = torch.minimum(edges[1:], high[..., None]) - torch.maximum(edges[:-1], low[..., None])
        return spans.clamp(min=0) * cells

    rows = overlap(boxes[..., 1], boxes[..., 3], height)
    cols = overlap(boxes[..., 0], boxes[..., 2], width)
    cover = rows[..., :, None] * cols[..., None, :]  # (B, N, height, width)
    if cover.shape[1] == 0:
        return cover.new_zeros(cover.shape[0], 1, height, width)
    return cover.amax(dim=1, keepdim=True)


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    cover: torch.Tensor | None = None,
    subject_weight: float = 0.0,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error, each latent cell weighted by 1 + `subject_weight` x its `cover`
    ((B, 1, h, w), `box_cover`), normalised by the batch's mean weight so that the loss keeps the
    plain mean's scale; each sample's share then weighted by `sample_weights` ((B,), min-SNR)."""
    error = (prediction.float() - target.float()).square()
    if subject_weight and cover is not None:
        weight = 1 + subject_weight * cover.to(error.device, error.dtype)
        error, norm = error * weight, weight.mean()
    else:
        norm = None
    if sample_weights is None:
        loss = error.mean()
    else:
        loss = (error.mean(dim=list(range(1, error.ndim))) * sample_weights).mean()
    return loss if norm is None else loss / norm


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min-SNR weighting (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
