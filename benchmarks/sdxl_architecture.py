"""SDXL's real architecture with random weights, optionally narrowed, for benchmarks.

Configs come from `../shared/sdxl-base` (UNet, VAE, text encoders, scheduler, tokenizers) and
`../shared/clip-vit-bigg-image-encoder`. `width_divisor=4` divides every channel width by 4 and
keeps depth, layer counts, token counts and resolutions: the same shapes of computation at about
1/16 of the FLOPs, which makes CPU timings feasible. Models are built directly on the target device
(full-width SDXL built on a CPU first takes minutes before it ever reaches the GPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _load(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(
            f"{path} not found: benchmarks need the SDXL configs of ../shared beside the checkout (or pass --shared)."
        )
    return json.loads(path.read_text())


def build_sdxl(width_divisor: int = 4, device: str = "cpu", dtype=torch.float32, seed: int = 0, shared: Path = SHARED):
    """(MSDiffusionXLPipeline without adapter, MSAdapterCheckpoint, image encoder) at 1/width_divisor width,
    with random weights made on `device`."""
    with torch.device(device):
        return _build(width_divisor, device, dtype, seed, Path(shared))


def _build(width_divisor: int, device: str, dtype, seed: int, shared: Path):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from msdiffusion import MSDiffusionXLPipeline
    from msdiffusion.adapter import initial_checkpoint
    from msdiffusion.resampler import ResamplerConfig

    d = width_divisor
    base = shared / "sdxl-base"
    torch.manual_seed(seed)

    te1 = _load(base / "text_encoder/config.json")
    te2 = _load(base / "text_encoder_2/config.json")
    for cfg in (te1, te2):
        cfg["hidden_size"] //= d
        cfg["intermediate_size"] //= d
        cfg["projection_dim"] = cfg.get("projection_dim", 768) // d
    text_encoder = CLIPTextModel(CLIPTextConfig(**te1))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2))

    unet_config = _load(base / "unet/config.json")
    unet_config["block_out_channels"] = [c // d for c in unet_config["block_out_channels"]]
    unet_config["cross_attention_dim"] = te1["hidden_size"] + te2["hidden_size"]
    unet_config["projection_class_embeddings_input_dim"] = (
        6 * unet_config["addition_time_embed_dim"] + te2["projection_dim"]
    )
    unet_config["norm_num_groups"] = math.gcd(unet_config["norm_num_groups"], *unet_config["block_out_channels"])
    unet = UNet2DConditionModel.from_config(unet_config)

    vae_config = _load(base / "vae/config.json")
    vae_config["block_out_channels"] = [c // d for c in vae_config["block_out_channels"]]
    vae_config["norm_num_groups"] = math.gcd(vae_config.get("norm_num_groups", 32), *vae_config["block_out_channels"])
    vae = AutoencoderKL.from_config(vae_config)

    vision = _load(shared / "clip-vit-bigg-image-encoder/clip_config.json")["vision_config"]
    vision_config = CLIPVisionConfig(
        hidden_size=vision["hidden_size"] // d,
        intermediate_size=vision["intermediate_size"] // d,
        num_attention_heads=vision["num_attention_heads"],
        num_hidden_layers=vision["num_hidden_layers"],
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        projection_dim=vision["projection_dim"] // d,
    )
    image_encoder = CLIPVisionModelWithProjection(vision_config).eval()

    with torch.device("cpu"):  # the scheduler's tables stay on the host, as diffusers' pipelines expect
        scheduler = EulerDiscreteScheduler.from_config(_load(base / "scheduler/scheduler_config.json"))
    pipe = MSDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(base / "tokenizer_2"),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)

    released = ResamplerConfig()
    resampler = ResamplerConfig(
        dim=released.dim // d,
        depth=released.depth,
        dim_head=64,
        heads=released.dim // d // 64,
        num_queries=released.num_queries,
        embedding_dim=vision_config.hidden_size,
        output_dim=unet_config["cross_attention_dim"],
        ff_mult=released.ff_mult,
        phrase_dim=te1["hidden_size"],
        num_freqs=released.num_freqs,
        grounding_hidden_dim=vision_config.hidden_size,
    )
    return pipe, initial_checkpoint(pipe.unet, resampler), image_encoder.to(device, dtype)
