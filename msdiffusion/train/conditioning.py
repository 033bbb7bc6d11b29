"""Batch -> UNet conditioning: caption embeddings, per-slot subject features, and the recipe's drops.

Features come either from the encoders (`EncoderFeatures`) or from a cache written by
`msdiff data cache` (`CachedFeatures`); both give the same tensors for the same batch. What stands
for "nothing" is computed once (`NullFeatures`): the empty caption's embeddings, the features of an
all-zero reference (image drop and padding slots) and the empty phrase's embedding (padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .config import TrainConfig


@dataclass
class Drops:
    """Per-sample drop decisions (B,) bool, drawn from the training generator."""

    image: torch.Tensor
    text: torch.Tensor
    grounding: torch.Tensor


def draw_drops(config: TrainConfig, batch_size: int, generator: torch.Generator) -> Drops:
    """The release's scheme: one uniform draw picks image / text / both drop, a second grounding drop."""
    u = torch.rand(batch_size, generator=generator)
    image_only = u < config.drop_image
    text_only = (u >= config.drop_image) & (u < config.drop_image + config.drop_text)
    both = (u >= config.drop_image + config.drop_text) & (u < config.drop_image + config.drop_text + config.drop_both)
    grounding = torch.rand(batch_size, generator=generator) < config.drop_grounding
    return Drops(image=image_only | both, text=text_only | both, grounding=grounding)


@dataclass
class NullFeatures:
    """Features of nothing, one row each."""

    prompt_embeds: torch.Tensor  # (77, D): the empty caption
    pooled_prompt_embeds: torch.Tensor  # (P,)
    image_features: torch.Tensor  # (L, E): an all-zero reference pixel tensor through the image encoder
    phrase_embeds: torch.Tensor  # (768,): the empty phrase

    def to(self, device, dtype) -> "NullFeatures":
        return NullFeatures(
            *(
                t.to(device, dtype)
                for t in (self.prompt_embeds, self.pooled_prompt_embeds, self.image_features, self.phrase_embeds)
            )
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": self.prompt_embeds,
            "pooled_prompt_embeds": self.pooled_prompt_embeds,
            "image_features": self.image_features,
            "phrase_embeds": self.phrase_embeds,
        }


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # (B, 77, D)
    pooled_prompt_embeds: torch.Tensor  # (B, P)
    image_features: torch.Tensor  # (B * N, L, E)
    phrase_embeds: torch.Tensor  # (B * N, 768)


class FeatureSource(Protocol):
    nulls: NullFeatures

    def captions(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]: ...

    def phrases(self, batch: dict, slots: torch.Tensor) -> torch.Tensor: ...

    def images(self, batch: dict, slots: torch.Tensor) -> torch.Tensor: ...


class EncoderFeatures:
    """Features computed by the text encoders and the image encoder, on the training device."""

    def __init__(self, text_encoders, image_encoder, device, dtype, reference_pixels_shape: tuple[int, int, int]):
        self.text_encoders = text_encoders
        self.image_encoder = image_encoder
        self.device, self.dtype = device, dtype
        self.nulls = null_features(text_encoders, image_encoder, device, reference_pixels_shape)

    def captions(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoders.encode_captions(list(batch["caption"]), self.device)

    def phrases(self, batch: dict, slots: torch.Tensor) -> torch.Tensor:
        flat = [phrase for row in batch["subject_phrases"] for phrase in row]
        chosen = [phrase for phrase, keep in zip(flat, slots.flatten().tolist()) if keep]
        return self.text_encoders.encode_phrases(chosen, self.device)

    @torch.no_grad()
    def images(self, batch: dict, slots: torch.Tensor) -> torch.Tensor:
        pixels = batch["subject_pixel_values"].flatten(0, 1)[slots.flatten().to(batch["subject_pixel_values"].device)]
        pixels = pixels.to(self.device, self.image_encoder.dtype, non_blocking=True)
        return self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]


@torch.no_grad()
def null_features(text_encoders, image_encoder, device, reference_pixels_shape: tuple[int, int, int]) -> NullFeatures:
    prompt, pooled = text_encoders.encode_captions([""], device)
    zeros = torch.zeros(1, *reference_pixels_shape, device=device, dtype=image_encoder.dtype)
    image = image_encoder(zeros, output_hidden_states=True).hidden_states[-2]
    phrase = text_encoders.encode_phrases([""], device)
    return NullFeatures(prompt[0], pooled[0], image[0], phrase[0])


class CachedFeatures:
    """Features read from the cache by `cache.CachedFeatureDataset` and delivered in the batch."""

    def __init__(self, nulls: NullFeatures):
        self.nulls = nulls

    def captions(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["prompt_embeds"], batch["pooled_prompt_embeds"]

    def phrases(self, batch: dict, slots: torch.Tensor) -> torch.Tensor:
        return batch["subject_phrase_embeds"].flatten(0, 1)[slots.flatten()]

    def images(self, batch: dict, slots: torch.Tensor) -> torch.Tensor:
        return batch["subject_image_features"].flatten(0, 1)[slots.flatten()]


def condition(batch: dict, drops: Drops, source: FeatureSource, device, dtype) -> Conditioning:
    """Conditioning of a batch after the drops: text drop empties the caption, image drop and padding
    use the all-zero reference's features, padding slots the empty phrase."""
    boxes = batch["subject_boxes"]
    batch_size, slots = boxes.shape[:2]
    real = torch.arange(slots, device=boxes.device)[None] < batch["num_subjects"].to(boxes.device)[:, None]
    nulls = source.nulls

    prompt, pooled = source.captions(batch)
    prompt, pooled = prompt.to(device, dtype), pooled.to(device, dtype)
    text_drop = drops.text.to(device)
    prompt = torch.where(text_drop[:, None, None], nulls.prompt_embeds.to(dtype), prompt)
    pooled = torch.where(text_drop[:, None], nulls.pooled_prompt_embeds.to(dtype), pooled)

    phrases = nulls.phrase_embeds.to(dtype).expand(batch_size * slots, -1).clone()
    if real.any():
        phrases[real.flatten().to(device)] = source.phrases(batch, real).to(device, dtype)

    seen = real & ~drops.image.to(real.device)[:, None]
    images = nulls.image_features.to(dtype).expand(batch_size * slots, -1, -1).clone()
    if seen.any():
        images[seen.flatten().to(device)] = source.images(batch, seen).to(device, dtype)
    return Conditioning(prompt, pooled, images, phrases)
