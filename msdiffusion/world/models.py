"""The world's models: SDXL's architecture at a size that trains on a 2-core CPU.

Everything here is an ordinary diffusers / transformers class with SDXL's structure: an
`AutoencoderKL` (4x down-sampling: 64 px images, 16x16 latents), two CLIP text encoders whose
penultimate states are concatenated (cross-attention width 64 + 64), a `UNet2DConditionModel`
with SDXL's added time ids and pooled text embeddings (and attention at every level), and a
`CLIPVisionModelWithProjection` for the references. The adapter is the project's own, trained by
`msdiff train`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..resampler import ResamplerConfig
from ..tiny import write_tiny_tokenizer
from .scenes import BACKGROUNDS, CLASSES, IDENTITY_VOCABULARY, SIZE

# Every word a world caption can hold is one token of the world's tokenizer, the words that describe
# identities in the base's captions included.
VOCABULARY = sorted(
    {"a", "an", "and", "on", *CLASSES, *IDENTITY_VOCABULARY, *(w for name in BACKGROUNDS for w in name.split())}
)
# Latent channels: SDXL has 4 at 8x down-sampling; at 4x on 64 px images 4 channels lose the
# subjects' colours, 16 (as SD3 and FLUX have) keep them and cost the UNet almost nothing.
LATENT_CHANNELS = 16
TEXT_WIDTH = 64  # each text encoder; the UNet's cross-attention width is twice this
IMAGE_ENCODER_WIDTH = 64
# The adapter's resampler; the grounding MLP width follows the release's rule 2 * (phrase + 8 * 2 * 4).
RESAMPLER = ResamplerConfig(
    dim=128,
    depth=2,
    dim_head=32,
    heads=4,
    num_queries=16,
    embedding_dim=IMAGE_ENCODER_WIDTH,
    output_dim=2 * TEXT_WIDTH,
    ff_mult=2,
    phrase_dim=TEXT_WIDTH,
    num_freqs=8,
    grounding_hidden_dim=2 * (TEXT_WIDTH + 8 * 2 * 4),
)


def tokenizers(directory: str | os.PathLike):
    from transformers import CLIPTokenizer

    path = write_tiny_tokenizer(directory, VOCABULARY)
    return CLIPTokenizer.from_pretrained(path), CLIPTokenizer.from_pretrained(path, pad_token="!")


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def text_encoders(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=len(tokenizer),
        hidden_act="quick_gelu",
        projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(CLIPTextConfig(**config)), CLIPTextModelWithProjection(CLIPTextConfig(**config))


# Per level: 16x16, 8x8, 4x4. A narrower base (32, 64, 128) draws fewer shapes from high noise.
UNET_CHANNELS = (64, 96, 128)
# Which levels have attention. SDXL has none at its first level, but there a subject spans tens of
# latent cells; a world subject (18 to 42 px) spans 2 to 5 cells of the 8x8 level, too coarse for the
# subject tokens to draw an outline or a pattern, so the world's UNet attends at 16x16 too (4 px per
# cell, as SD 1.5 does at its first level).
UNET_ATTENTION = (True, True, True)


def unet(channels: tuple[int, int, int] = UNET_CHANNELS, attention: tuple[bool, bool, bool] = UNET_ATTENTION):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=tuple(channels),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(1, 2, 4),  # 32 channels per head (SDXL: 64) at a tenth of SDXL's width
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=6 * 16 + TEXT_WIDTH,
        norm_num_groups=16,
    )


def image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=IMAGE_ENCODER_WIDTH,
        intermediate_size=4 * IMAGE_ENCODER_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=SIZE,
        patch_size=8,
        projection_dim=IMAGE_ENCODER_WIDTH,
    )
    return CLIPVisionModelWithProjection(config)


def image_processor():
    """CLIP preprocessing at the world's size (the references are squashed to a square first anyway)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


def scheduler():
    """SDXL base's noise schedule and sampler, predicting v instead of epsilon.

    With epsilon prediction a base of this size denoises well at low noise but its x0 estimate at
    t > 700 is speckle: SDXL's schedule keeps sqrt(alpha_bar) = 0.07 at t = 999, so a small model's
    epsilon error is amplified 15x there, and every sample's layout is decided there. v prediction
    (as SD 2's 768 model) has no such amplification; `msdiff train` follows the base's scheduler, so
    the adapter trains on v too.
    """
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="v_prediction",
    )


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
