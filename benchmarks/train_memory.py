"""Static training memory of the MS-Diffusion adapter on SDXL, from the real architectures' parameter counts.

Builds SDXL's UNet, VAE and text encoders (configs in `../shared/sdxl-base`), the ViT-bigG image
encoder (`../shared/clip-vit-bigg-image-encoder`) and the released-size adapter on the meta device
(no weights, no memory), counts parameters and prints the per-GPU bytes of each part of a training
run, as docs/training.md's memory table states them. Activations are not included: they depend on
resolution, batch and activation checkpointing, and need a GPU to measure.

    python benchmarks/train_memory.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def static_memory(shared: Path = SHARED) -> dict:
    """Parameter counts of SDXL, ViT-bigG and the released-size adapter, and the training memory rows (bytes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from msdiffusion.adapter import MSImageProjection, attach_ms_attention
    from msdiffusion.resampler import ResamplerConfig

    base = shared / "sdxl-base"
    vision = json.loads((shared / "clip-vit-bigg-image-encoder" / "clip_config.json").read_text())["vision_config"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
        frozen_unet = count(unet)
        attach_ms_attention(unet)
        projections = count(unet) - frozen_unet
        resampler = count(MSImageProjection(ResamplerConfig().to_dict()).image_proj)
        vae = count(AutoencoderKL.from_config(AutoencoderKL.load_config(base / "vae")))
        text = count(CLIPTextModel(CLIPTextConfig.from_pretrained(base / "text_encoder")))
        text += count(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(base / "text_encoder_2")))
        image = count(CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)))

    trainable = projections + resampler
    rows = [
        (
            f"trainable weights ({trainable / 1e6:.0f}M: projections {projections / 1e6:.0f}M, resampler {resampler / 1e6:.0f}M), fp32",
            trainable * 4,
        ),
        ("their gradients, fp32", trainable * 4),
        ("AdamW states, 2 x fp32", trainable * 8),
        ("  (adamw_8bit: 2 x 1 byte)", trainable * 2),
        (f"frozen UNet ({frozen_unet / 1e9:.2f}B), bf16/fp16", frozen_unet * 2),
        (
            f"text encoders ({text / 1e9:.2f}B) + image encoder ({image / 1e9:.2f}B), bf16 (0 with a cache)",
            (text + image) * 2,
        ),
        (f"VAE ({vae / 1e6:.0f}M), fp32", vae * 4),
        ("EMA copy (ema: true), fp32", trainable * 4),
    ]
    return {
        "rows": rows,
        # AdamW, the encoders loaded, no EMA; and with a feature cache (no encoders)
        "default": trainable * 16 + frozen_unet * 2 + (text + image) * 2 + vae * 4,
        "cached": trainable * 16 + frozen_unet * 2 + vae * 4,
        "lean": trainable * 10 + frozen_unet * 2 + vae * 4,  # a cache and adamw_8bit
    }


def main() -> int:
    if not (SHARED / "sdxl-base").is_dir():
        print(f"needs {SHARED / 'sdxl-base'} (the shared SDXL configs)", file=sys.stderr)
        return 1
    memory = static_memory()
    gb = 1e9
    for name, size in memory["rows"]:
        print(f"{size / gb:6.2f} GB  {name}")
    print(f"{memory['default'] / gb:6.2f} GB  total before activations (AdamW, encoders loaded, no EMA)")
    print(f"{memory['lean'] / gb:6.2f} GB  with a feature cache and adamw_8bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
