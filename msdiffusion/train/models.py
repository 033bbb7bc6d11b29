"""What training holds: the frozen SDXL parts, the encoders, and the trainable adapter around the UNet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..adapter import (
    MSAdapterCheckpoint,
    MSImageProjection,
    attach_ms_attention,
    check_fits_unet,
    cross_attention_layers,
    load_checkpoint,
)
from ..attention import MSAttentionState, MSAttnProcessor
from ..layout import SubjectLayout
from ..resampler import ResamplerConfig, released_grounding_hidden_dim
from .config import TrainConfig


@dataclass
class TextEncoders:
    """SDXL's two tokenizers and text encoders, tokenizers built once for the whole run."""

    tokenizer: Any
    tokenizer_2: Any
    text_encoder: Any
    text_encoder_2: Any

    @torch.no_grad()
    def encode_captions(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL prompt embeddings (B, 77, 768 + 1280) and pooled embeddings (B, 1280), as the pipeline makes them."""
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        return torch.cat(hidden, dim=-1), output.text_embeds

    @torch.no_grad()
    def encode_phrases(self, phrases: list[str], device) -> torch.Tensor:
        """Phrase embeddings: the first text encoder's pooled output (B, 768)."""
        from ..subjects import encode_phrases

        return encode_phrases(self.tokenizer, self.text_encoder, phrases, device)

    def to(self, device=None, dtype=None) -> "TextEncoders":
        self.text_encoder.to(device, dtype)
        self.text_encoder_2.to(device, dtype)
        return self


def _hub_kwargs(config: TrainConfig) -> dict:
    return {k: v for k, v in (("variant", config.variant), ("revision", config.revision)) if v}


def load_text_encoders(config: TrainConfig) -> TextEncoders:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kwargs = _hub_kwargs(config)
    encoders = TextEncoders(
        CLIPTokenizer.from_pretrained(config.base, subfolder="tokenizer", revision=config.revision),
        CLIPTokenizer.from_pretrained(config.base, subfolder="tokenizer_2", revision=config.revision),
        CLIPTextModel.from_pretrained(config.base, subfolder="text_encoder", **kwargs),
        CLIPTextModelWithProjection.from_pretrained(config.base, subfolder="text_encoder_2", **kwargs),
    )
    for model in (encoders.text_encoder, encoders.text_encoder_2):
        model.requires_grad_(False).eval()
    return encoders


def load_image_encoder(config: TrainConfig):
    """The CLIP vision encoder and its preprocessing."""
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(config.image_encoder).requires_grad_(False).eval()
    return encoder, load_image_processor(config)


def load_image_processor(config: TrainConfig):
    """CLIP preprocessing of the image encoder's folder if it has one, else CLIP's standard (no weights loaded)."""
    from ..subjects import default_image_processor

    processor = default_image_processor()
    try:
        return type(processor).from_pretrained(config.image_encoder)
    except (OSError, ValueError):
        return processor


def reference_pixels_size(image_processor) -> tuple[int, int]:
    """(height, width) of the pixel tensors the image processor makes."""
    crop = getattr(image_processor, "crop_size", None) or {"height": 224, "width": 224}
    if isinstance(crop, dict):
        return int(crop["height"]), int(crop["width"])
    return int(crop.height), int(crop.width)


def load_unet_and_vae(config: TrainConfig):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    kwargs = _hub_kwargs(config)
    unet = UNet2DConditionModel.from_pretrained(config.base, subfolder="unet", **kwargs)
    if config.vae:
        vae = AutoencoderKL.from_pretrained(config.vae)
    else:
        vae = AutoencoderKL.from_pretrained(config.base, subfolder="vae", **kwargs)
    unet.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    return unet, vae


def encoder_widths(config: TrainConfig) -> tuple[int, int]:
    """(image encoder hidden size, first text encoder hidden size), from configs only (no weights)."""
    from transformers import AutoConfig, CLIPTextConfig

    image_config = AutoConfig.from_pretrained(config.image_encoder)
    image_config = getattr(image_config, "vision_config", image_config)
    text_config = CLIPTextConfig.from_pretrained(config.base, subfolder="text_encoder", revision=config.revision)
    return image_config.hidden_size, text_config.hidden_size


def resampler_config(config: TrainConfig, unet, image_width: int, phrase_width: int) -> ResamplerConfig:
    """The released architecture (or the config's overrides), with the widths the models fix.

    The grounding MLP's hidden width follows the release's rule, `2 * (phrase_dim + 8 * num_freqs)`,
    not the image encoder's width (they coincide only for ViT-bigG), so that an adapter trained with
    any encoder loads into the released code.
    """
    values = {**ResamplerConfig().to_dict(), **config.resampler}
    values.update(embedding_dim=image_width, output_dim=unet.config.cross_attention_dim, phrase_dim=phrase_width)
    if "grounding_hidden_dim" not in config.resampler:
        values["grounding_hidden_dim"] = released_grounding_hidden_dim(phrase_width, values["num_freqs"])
    return ResamplerConfig(**values)


class AdapterTrainingModel(nn.Module):
    """The frozen UNet with MS-Diffusion processors attached, plus the image projection.

    This is the module handed to `accelerator.prepare` (DDP wraps it): its only trainable
    parameters are the resampler and every `to_k_ip` / `to_v_ip`. The dummy image tokens are kept
    frozen, as in the release (their image-branch output is zeroed anyway).
    """

    def __init__(self, unet, projection: MSImageProjection, attention_state: MSAttentionState):
        super().__init__()
        self.unet = unet
        self.projection = projection
        self.attention_state = attention_state
        projection.dummy_image_tokens.requires_grad_(False)

    @property
    def processors(self) -> list[MSAttnProcessor]:
        """The cross-attention processors in `unet.attn_processors` order."""
        processors = self.unet.attn_processors
        names = list(processors)
        return [processors[names[i]] for i in cross_attention_layers(self.unet)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.projection.parameters() if p.requires_grad]
        for processor in self.processors:
            params.extend(processor.parameters())
        return params

    def subject_tokens(
        self,
        image_features: torch.Tensor,
        phrase_embeds: torch.Tensor,
        boxes: torch.Tensor,
        drop_grounding: torch.Tensor,
    ) -> torch.Tensor:
        """`[dummy tokens | 16 tokens per subject slot]` (B, 4 + 16 N, D) for (B, N) subject slots."""
        batch, slots = boxes.shape[:2]
        # Unlike inference, which leaves absent subjects' tokens zero, every slot is resampled, padding
        # included (`condition` gives it the null reference and the empty phrase); its zero box hides it.
        tokens = self.projection(
            image_features, phrase_embeds, boxes.reshape(batch * slots, 4), drop_grounding.repeat_interleave(slots)
        )
        return self.projection.token_block(tokens, [slots] * batch)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        image_features: torch.Tensor,
        phrase_embeds: torch.Tensor,
        boxes: torch.Tensor,
        drop_grounding: torch.Tensor,
    ) -> torch.Tensor:
        """The UNet's prediction; call it inside `attention_state.activate(layout)` (see `subject_layout`)."""
        image_tokens = self.subject_tokens(image_features, phrase_embeds, boxes, drop_grounding)
        encoder_hidden_states = torch.cat([prompt_embeds, image_tokens.to(prompt_embeds.dtype)], dim=1)
        return self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": pooled_prompt_embeds, "time_ids": time_ids},
        ).sample

    def subject_layout(self, boxes: torch.Tensor, latent_size: tuple[int, int], scale: float) -> SubjectLayout:
        """The layout of a batch: padding slots have zero boxes, which cover no cell."""
        return self.projection.subject_layout(boxes.detach(), latent_size, scale=scale)


def build_training_model(config: TrainConfig, unet, image_width: int, phrase_width: int) -> AdapterTrainingModel:
    """Attach the adapter to `unet` (fp32 at this point): new, or from `config.init_adapter`."""
    if config.init_adapter:
        checkpoint = load_checkpoint(config.init_adapter)
        check_fits_unet(checkpoint, unet)
        rc = checkpoint.resampler_config
        if rc.embedding_dim != image_width or rc.phrase_dim != phrase_width:
            raise ValueError(
                f"init_adapter {config.init_adapter} reads {rc.embedding_dim}-d image features and {rc.phrase_dim}-d "
                f"phrases, but the image encoder gives {image_width} and the text encoder {phrase_width}."
            )
        projection = checkpoint.image_projection()
        state = attach_ms_attention(unet, checkpoint.attention)
    else:
        torch.manual_seed(config.seed)
        projection = MSImageProjection(
            resampler_config(config, unet, image_width, phrase_width).to_dict(), config.num_dummy_tokens
        )
        state = attach_ms_attention(unet)  # to_k_ip / to_v_ip start as copies of to_k / to_v
    model = AdapterTrainingModel(unet, projection, state)
    for param in model.trainable_parameters():
        param.requires_grad_(True)
    return model


def load_adapter_weights(model: AdapterTrainingModel, checkpoint: MSAdapterCheckpoint) -> None:
    """Copy a checkpoint's tensors into the existing parameters (the optimiser keeps referring to them)."""
    check_fits_unet(checkpoint, model.unet)
    state = {f"image_proj.{k}": v for k, v in checkpoint.image_proj.items()}
    state["dummy_image_tokens"] = checkpoint.dummy_image_tokens
    model.projection.load_state_dict(state)
    for i, processor in zip(cross_attention_layers(model.unet), model.processors):
        processor.load_state_dict(checkpoint.attention[i])
