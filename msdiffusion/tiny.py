"""Tiny random SDXL-shaped models: for tests and for `msdiff demo` where no weights can be downloaded.

They have SDXL's structure (two CLIP text encoders, a 3-level UNet with cross-attention at the two
lower levels, a VAE with scale factor 8, a CLIP vision encoder, an MS-Diffusion adapter) at a few
hundred thousand parameters. Images they make show the wiring works, not quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .adapter import MSAdapterCheckpoint, initial_checkpoint
from .resampler import ResamplerConfig, released_grounding_hidden_dim

# Words the tiny tokenizer knows as whole tokens; others are split into characters (still valid).
TINY_VOCABULARY = (
    "a an the and of in on at with wearing holding near beside under next to is photo picture "
    "dog cat toy teddy bear backpack clock duck sneaker lantern teapot flower sloth plushie wolf "
    "beach room snow jungle grass street cobblestone forest mountain waterfall barn park table sofa "
    "red blue green yellow black white brown small big cute fluffy sitting standing running "
    "hat cap shirt t-shirt jacket coat sweater jeans shorts trousers dress glasses scarf man woman person"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character table of byte-level BPE (as CLIP and GPT-2 define it)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def write_tiny_tokenizer(directory: str | os.PathLike, words=TINY_VOCABULARY) -> Path:
    """Write a valid CLIP BPE tokenizer (vocab.json, merges.txt) that knows `words` as single tokens."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab)
    for word in dict.fromkeys(w.lower() for w in words):
        # Where the merges made so far leave this word, as CLIP's BPE applies them (lowest rank
        # first, anywhere in the word); then merge what is left left to right. The new merges rank
        # after every earlier one, so they never change how an earlier word is split.
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            if merged not in known:
                vocab.append(merged)
                known.add(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return directory


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as CLIP's tokenizer does it: merge the best-ranked pair, repeat."""
    while len(symbols) > 1:
        pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def tiny_tokenizers(directory: str | os.PathLike):
    """The two SDXL tokenizers (the second pads with "!" like SDXL's)."""
    from transformers import CLIPTokenizer

    path = write_tiny_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(path), CLIPTokenizer.from_pretrained(path, pad_token="!")


def tiny_sdxl_components(tokenizer_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Random SDXL-shaped components (fp32, CPU)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_tokenizers(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    )
    text_config = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )  # SDXL base's scheduler settings
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def tiny_image_encoder(seed: int = 0):
    """A random CLIP vision tower with the real input size (224 px, 257 tokens) and a 32-d width."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=224,
        patch_size=14,
        projection_dim=32,
    )
    return CLIPVisionModelWithProjection(config).eval()


TINY_RESAMPLER = ResamplerConfig(
    dim=128,
    depth=2,
    dim_head=64,
    heads=2,
    num_queries=16,
    embedding_dim=32,
    output_dim=64,
    ff_mult=2,
    phrase_dim=32,
    num_freqs=8,
    grounding_hidden_dim=released_grounding_hidden_dim(32, 8),
)


def tiny_adapter_checkpoint(unet, seed: int = 0) -> MSAdapterCheckpoint:
    """A random adapter for `unet`: `to_k_ip`/`to_v_ip` from `to_k`/`to_v` (the training init), random resampler."""
    torch.manual_seed(seed)
    checkpoint = initial_checkpoint(unet, TINY_RESAMPLER, num_dummy_tokens=4)
    torch.nn.init.normal_(checkpoint.dummy_image_tokens)  # random, so that tests would see them leak
    return checkpoint


def tiny_pipeline(seed: int = 0, controlnet: bool = False, work_dir: str | os.PathLike | None = None):
    """An `MSDiffusionXLPipeline` (or the ControlNet one) of tiny random models with the adapter loaded."""
    import tempfile

    from .pipelines import MSDiffusionXLControlNetPipeline, MSDiffusionXLPipeline

    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="msdiff-tiny-"))
    components = tiny_sdxl_components(work_dir / "tokenizer", seed)
    if controlnet:
        from diffusers import ControlNetModel

        torch.manual_seed(seed + 1)
        net = ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(8, 16, 16, 16))
        # Its output convolutions start at zero; random ones make the tiny ControlNet visibly act.
        for param in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
            torch.nn.init.normal_(param, std=0.05)
        components["controlnet"] = net
        pipe = MSDiffusionXLControlNetPipeline(**components)
    else:
        pipe = MSDiffusionXLPipeline(**components)
    pipe.load_ms_adapter(tiny_adapter_checkpoint(pipe.unet, seed), image_encoder=tiny_image_encoder(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_models(directory: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write tiny models the way real ones are found on disk; returns their paths.

    `base/`: a diffusers SDXL folder; `adapter/`: project-format adapter; `ms_adapter.bin`: the same
    adapter in the released format; `image_encoder/`: a transformers CLIP vision folder.
    """
    from diffusers import StableDiffusionXLPipeline

    directory = Path(directory)
    components = tiny_sdxl_components(directory / "tokenizer-src", seed)
    StableDiffusionXLPipeline(**components).save_pretrained(directory / "base")
    checkpoint = tiny_adapter_checkpoint(components["unet"], seed)
    paths = {
        "base": directory / "base",
        "adapter": checkpoint.save(directory / "adapter"),
        "released_adapter": checkpoint.save(directory / "ms_adapter.bin"),
        "image_encoder": directory / "image_encoder",
    }
    tiny_image_encoder(seed).save_pretrained(paths["image_encoder"])
    return paths
