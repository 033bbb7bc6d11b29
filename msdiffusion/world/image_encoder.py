"""The world's image encoder, trained contrastively on renderings of the world's subjects.

SDXL's MS-Diffusion reads references through a frozen CLIP image encoder trained on the web. The
world has no such encoder, so it trains one, as CLIP was trained but with the world's truth for
captions: two renderings of the same subject (class and identity; another size, angle and
background, as `scenes.render_reference` draws references) are a positive pair, every other
subject in the batch a negative (InfoNCE both ways, a fixed temperature). Training identities
only: the held-out ones stay unseen by every model.

The resampler reads the encoder's penultimate hidden states, not the embedding this loss shapes;
in a 3-layer ViT those states are what the last layer pools from (`identity_retrieval` measures
both). Putting the same loss on those states too makes them retrieve identities as well as the
embedding does, but gives the adapter no more identities, so the loss stays on the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..subjects import prepare_reference_pixels
from . import models
from .base import warmup_cosine_lr
from .scenes import CLASSES, NUM_IDENTITIES, is_held_out, render_reference


@dataclass
class ImageEncoderRecipe:
    steps: int = 1200
    batch: int = 256  # subjects per step, two renderings each
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    temperature: float = 0.1
    pool_subjects: int = 6000  # rendered once; each step picks two of a subject's views
    views: int = 4
    seed: int = 0


def render_views(subjects: list[tuple[str, int]], views: int, seed: int) -> torch.Tensor:
    """(len(subjects), views, 3, H, W) pixels as the pipelines hand references to the encoder."""
    image_processor = models.image_processor()
    pixels = []
    for k, (cls, identity) in enumerate(subjects):
        rng = np.random.default_rng([seed, 7, k])
        images = [PIL.Image.fromarray(render_reference(rng, cls, identity)[0]) for _ in range(views)]
        pixels.append(prepare_reference_pixels(images, image_processor, models.SIZE))
    return torch.stack(pixels)


def subject_pool(count: int, held_out: bool, seed: int) -> list[tuple[str, int]]:
    """`count` random (class, identity) pairs, from the training identities or the held-out ones."""
    rng = np.random.default_rng([seed, 8, int(held_out)])
    pool = [i for i in range(NUM_IDENTITIES) if is_held_out(i) == held_out]
    return [(str(rng.choice(CLASSES)), int(rng.choice(pool))) for _ in range(count)]


def _subject_keys(subjects: list[tuple[str, int]]) -> torch.Tensor:
    """One integer per (class, identity): equal keys are the same subject."""
    return torch.tensor([CLASSES.index(c) * NUM_IDENTITIES + i for c, i in subjects])


def penultimate_summary(output) -> torch.Tensor:
    """(N, width) the penultimate hidden states (what the resampler reads) averaged over tokens:
    a crude summary of what it sees, for a loss or a retrieval test."""
    return output.hidden_states[-2].mean(1)


def _infonce(a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE; `same` marks pairs of rows that show one subject (not counted as negatives)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    logits = logits.masked_fill(same & ~torch.eye(len(a), dtype=torch.bool), float("-inf"))
    target = torch.arange(len(a))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_image_encoder(recipe: ImageEncoderRecipe, log: Callable = print):
    """A `CLIPVisionModelWithProjection` of `models.image_encoder`'s shape, trained as above."""
    if recipe.views < 2 or recipe.batch < 2 or recipe.pool_subjects < 2 or recipe.steps < 1:
        raise ValueError(
            f"ImageEncoderRecipe: views, batch and pool_subjects must be at least 2 (a positive pair needs two "
            f"renderings, a negative another subject) and steps at least 1; got views={recipe.views}, "
            f"batch={recipe.batch}, pool_subjects={recipe.pool_subjects}, steps={recipe.steps}."
        )
    torch.manual_seed(recipe.seed)
    encoder = models.image_encoder()
    subjects = subject_pool(recipe.pool_subjects, held_out=False, seed=recipe.seed)
    pixels = render_views(subjects, recipe.views, recipe.seed)
    keys = _subject_keys(subjects)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=recipe.learning_rate, weight_decay=0.05)
    generator = torch.Generator().manual_seed(recipe.seed)
    for step in range(recipe.steps):
        lr = warmup_cosine_lr(step, recipe.steps, recipe.warmup_steps, recipe.learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = torch.randint(len(subjects), (recipe.batch,), generator=generator)
        first = torch.randint(recipe.views, (recipe.batch,), generator=generator)
        second = (first + torch.randint(1, recipe.views, (recipe.batch,), generator=generator)) % recipe.views
        batch = torch.cat([pixels[rows, first], pixels[rows, second]])
        features = encoder(pixel_values=batch).image_embeds
        same = keys[rows][:, None] == keys[rows][None, :]
        loss = _infonce(features[: recipe.batch], features[recipe.batch :], same, recipe.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == recipe.steps - 1:
            log(f"  image encoder step {step}: loss {loss.item():.3f}, lr {lr:.2e}")
    return encoder.eval().requires_grad_(False)


@torch.no_grad()
def identity_retrieval(encoder, count: int = 500, seed: int = 1) -> dict[str, float]:
    """Top-1 retrieval among `count` held-out subjects: for each, is its nearest other rendering
    its own (class and identity)? On the projected embedding, and on `penultimate_summary`."""
    subjects = subject_pool(count, held_out=True, seed=seed)
    pixels = render_views(subjects, 2, seed)
    out = encoder(pixel_values=pixels.flatten(0, 1).to(encoder.dtype), output_hidden_states=True)
    keys = _subject_keys(subjects)
    rates = {}
    for name, features in (("penultimate", penultimate_summary(out)), ("embedding", out.image_embeds)):
        features = F.normalize(features.float(), dim=-1).view(count, 2, -1)
        nearest = (features[:, 0] @ features[:, 1].T).argmax(1)
        rates[name] = float((keys[nearest] == keys).float().mean())
    return rates
