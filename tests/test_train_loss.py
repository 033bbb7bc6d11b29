"""The diffusion loss: the plain mean by default, box-weighted and min-SNR-weighted when asked."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import reset_accelerate, tiny_config, write_manifest

from msdiffusion.train.loss import box_cover, diffusion_loss, min_snr_weights


def test_box_cover_is_the_share_of_each_latent_cell_inside_a_box():
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 0.5, 0.25], [0.375, 0.625, 1.0, 1.0]],
            [[0.125, 0.125, 0.3125, 0.3125], [0.0, 0.0, 0.0, 0.0]],  # edges through the middle of cells; padding
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    cover = box_cover(boxes, 8, 8)
    assert cover.shape == (3, 1, 8, 8)
    assert cover[0, 0, :2, :4].eq(1).all() and cover[0, 0, 5:, 3:].eq(1).all()
    assert cover[0].sum() == 2 * 4 + 3 * 5  # nothing outside the two boxes
    assert cover[1, 0, 1, 1] == 1 and cover[1, 0, 2, 2] == 0.25 and cover[1, 0, 1, 2] == 0.5
    assert cover[1].sum() == pytest.approx(64 * 0.1875**2)  # the box's area in cells
    assert cover[2].sum() == 0
    assert box_cover(torch.zeros(2, 0, 4), 4, 4).eq(0).all()


def test_box_cover_of_a_wide_latent_puts_x_along_the_width():
    cover = box_cover(torch.tensor([[[0.0, 0.0, 0.5, 1.0]]]), 4, 8)  # the left half of a 4x8 latent
    assert cover.shape == (1, 1, 4, 8)
    assert cover[0, 0, :, :4].eq(1).all() and cover[0, 0, :, 4:].eq(0).all()


def test_diffusion_loss_weights_cells_inside_boxes_and_keeps_the_plain_mean_at_zero():
    prediction, target = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    cover = torch.zeros(2, 1, 8, 8)
    cover[:, :, :4] = 1  # the top half of each latent is a subject
    prediction[:, :, :4] = 1.0  # error 1 inside the boxes, 0 outside
    assert diffusion_loss(prediction, target, cover, 0.0) == pytest.approx(0.5)
    assert diffusion_loss(prediction, target) == pytest.approx(0.5)
    # weight 4 inside, 1 outside: (4 * 1 + 1 * 0) / (4 + 1)
    assert diffusion_loss(prediction, target, cover, 3.0) == pytest.approx(0.8)
    assert diffusion_loss(torch.full_like(target, 2.0), target, cover, 3.0) == pytest.approx(
        4.0
    )  # a uniform error is unchanged


def test_sample_weights_are_min_snr_and_combine_with_the_box_weights():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    timesteps = torch.tensor([10, 900])
    weights = min_snr_weights(scheduler, timesteps, 5.0, "epsilon")
    assert weights[0] < 1 and weights[1] == pytest.approx(1.0)  # low noise (high SNR) clipped to gamma / SNR
    assert torch.all(min_snr_weights(scheduler, timesteps, 5.0, "v_prediction") < weights)
    prediction, target = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    prediction[0], prediction[1, :, :4] = 1.0, 1.0  # sample 0 wrong everywhere, sample 1 in its top half
    sample = torch.tensor([0.5, 2.0])
    assert diffusion_loss(prediction, target, sample_weights=sample) == pytest.approx((0.5 * 1.0 + 2.0 * 0.5) / 2)
    cover = torch.zeros(2, 1, 8, 8)
    cover[:, :, :4] = 1
    # weights 4 inside, 1 outside (mean 2.5): sample 0 (4 + 1) / 2 / 2.5 = 1, sample 1 4 / 2 / 2.5 = 0.8
    assert diffusion_loss(prediction, target, cover, 3.0, sample) == pytest.approx((0.5 * 1.0 + 2.0 * 0.8) / 2)


@pytest.fixture()
def run(tmp_path):
    from msdiffusion.tiny import save_tiny_models
    from msdiffusion.train.loop import TrainingRun

    reset_accelerate()
    models, manifest = save_tiny_models(tmp_path / "models"), write_manifest(tmp_path / "data", 2)
    yield lambda **overrides: TrainingRun(tiny_config(models, manifest, tmp_path / "out", **overrides))
    reset_accelerate()


def test_training_weights_the_loss_inside_the_batch_boxes_with_subject_loss_weight(run):
    prediction, target = torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 4, 8)
    prediction[..., :4] = 1.0  # error only in the left half of a wide latent
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]]])  # a subject there; a padded slot
    timesteps = torch.tensor([500])
    plain = run()
    assert plain._loss(prediction, target, timesteps, boxes) == pytest.approx(0.5)
    reset_accelerate()
    weighted = run(subject_loss_weight=3.0)
    assert weighted._loss(prediction, target, timesteps, boxes) == pytest.approx(0.8)
    # the same batch and draws: a different loss once the boxes weigh more
    batch = next(iter(weighted.dataloader))
    losses = []
    for r in (weighted, plain):
        r.generator.manual_seed(1)
        losses.append(r.loss_on(batch).item())
    assert losses[0] != pytest.approx(losses[1], rel=1e-4)
