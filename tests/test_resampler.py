import math

import pytest
import torch

from msdiffusion.resampler import GroundingResampler, ResamplerConfig, box_fourier_embedding
from msdiffusion.tiny import TINY_RESAMPLER


def test_box_embedding_order_matches_spec():
    box = torch.tensor([[0.1, 0.2, 0.7, 0.9]])
    emb = box_fourier_embedding(box)
    assert emb.shape == (1, 64)
    for k in range(8):
        f = 100 ** (k / 8)
        for coord in range(4):
            assert emb[0, k * 8 + coord].item() == pytest.approx(math.sin(f * box[0, coord].item()), abs=2e-5)
            assert emb[0, k * 8 + 4 + coord].item() == pytest.approx(math.cos(f * box[0, coord].item()), abs=2e-5)


def small_resampler(seed=0):
    torch.manual_seed(seed)
    return GroundingResampler(TINY_RESAMPLER).eval()


def test_output_shape_and_grounding_inputs_matter():
    model = small_resampler()
    feats, phrases = torch.randn(3, 257, 32), torch.randn(3, 32)
    boxes = torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 0, 0]])
    out = model(feats, phrases, boxes)
    assert out.shape == (3, 16, 64)
    moved = model(feats, phrases, boxes.flip(0))
    assert not torch.allclose(out[0], moved[0])  # the box enters the tokens


def test_drop_grounding_uses_learned_latents_without_norm():
    model = small_resampler()
    latents = model.grounding_queries(torch.randn(2, 32), torch.rand(2, 4), torch.tensor([True, False]))
    assert torch.equal(latents[0], model.grounding_latents[0])
    assert not torch.equal(latents[1], model.grounding_latents[0])


def test_padded_references_equal_unpadded():
    model = small_resampler()
    one, two = torch.randn(1, 257, 32), torch.randn(1, 514, 32)
    phrases, boxes = torch.randn(2, 32), torch.rand(2, 4)
    alone_one = model(one, phrases[:1], boxes[:1])
    alone_two = model(two, phrases[1:], boxes[1:])
    padded = torch.zeros(2, 514, 32)
    padded[0, :257], padded[1] = one[0], two[0]
    mask = torch.zeros(2, 514, dtype=torch.bool)
    mask[0, :257], mask[1] = True, True
    both = model(padded, phrases, boxes, image_mask=mask)
    torch.testing.assert_close(both[0], alone_one[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], alone_two[0], atol=1e-5, rtol=1e-5)


def test_config_inferred_from_state_dict():
    model = small_resampler()
    assert ResamplerConfig.from_state_dict(model.state_dict()) == TINY_RESAMPLER
    released = ResamplerConfig()
    with torch.device("meta"):
        assert ResamplerConfig.from_state_dict(GroundingResampler(released).state_dict()) == released
