"""Where the project follows the released MS-Diffusion code by default, and the release's behaviour
offered as an option where the project's own choice is kept (docs/training.md, "Differences from
the release"; issue 12). Everything runs on tiny random models."""

from __future__ import annotations

import types

import pytest

from msdiffusion.resampler import ResamplerConfig, released_grounding_hidden_dim


# --- 1. grounding MLP width of new adapters --------------------------------------------------------


@pytest.mark.parametrize("image_width", [1664, 1280, 1024])  # ViT-bigG, ViT-H, ViT-L
def test_new_adapter_grounding_width_follows_the_release_rule_not_the_encoder(image_width):
    from msdiffusion.train import TrainConfig
    from msdiffusion.train.models import resampler_config

    unet = types.SimpleNamespace(config=types.SimpleNamespace(cross_attention_dim=2048))
    config = TrainConfig(base="b", image_encoder="e", manifest="m")
    rc = resampler_config(config, unet, image_width=image_width, phrase_width=768)
    assert rc.grounding_hidden_dim == 2 * (768 + 8 * 2 * 4) == 1664  # the release's latent_proj width
    assert rc.embedding_dim == image_width
    # an explicit override is still honoured
    config = TrainConfig(base="b", image_encoder="e", manifest="m", resampler={"grounding_hidden_dim": 96})
    assert resampler_config(config, unet, image_width=image_width, phrase_width=768).grounding_hidden_dim == 96


def test_tiny_adapter_uses_the_release_rule_and_loading_reads_the_width_from_the_checkpoint(tmp_path):
    import torch

    from msdiffusion.adapter import initial_checkpoint, load_checkpoint
    from msdiffusion.tiny import TINY_RESAMPLER, tiny_sdxl_components

    assert TINY_RESAMPLER.grounding_hidden_dim == released_grounding_hidden_dim(TINY_RESAMPLER.phrase_dim) == 2 * (32 + 64)
    unet = tiny_sdxl_components(tmp_path / "tok")["unet"]
    # a checkpoint of another width (e.g. trained before this rule) still loads with its own width
    odd = ResamplerConfig(**{**TINY_RESAMPLER.to_dict(), "grounding_hidden_dim": 40})
    torch.manual_seed(0)
    path = initial_checkpoint(unet, odd).save(tmp_path / "ms_adapter.bin")
    loaded = load_checkpoint(path)
    assert loaded.resampler_config.grounding_hidden_dim == 40
    assert loaded.image_proj["latent_proj.0.weight"].shape == (40, 32 + 64)
