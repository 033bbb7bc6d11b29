"""Validation images during training: the project's pipeline on the current weights, boxes drawn."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..preview import draw_layout
from ..settings import GenerationSettings, check_generation_values
from ..subjects import load_image
from .config import TrainConfig


@dataclass
class ValidationEntry:
    prompt: str
    images: list[PIL.Image.Image]
    phrases: list[str]
    boxes: list[tuple[float, float, float, float]]
    negative_prompt: str | None = None


def validation_settings(config: TrainConfig) -> GenerationSettings:
    """How validation images are made: `validation_settings` (job-file names) at the training resolution."""
    values = check_generation_values(dict(config.validation_settings), "validation_settings")
    return GenerationSettings(**{**values, "size": [config.resolution, config.resolution]})


def validation_entries(config: TrainConfig, dataset) -> list[ValidationEntry]:
    """The config's `validation` entries, or else the first `validation_samples` samples of the manifest
    that have subjects (their caption, references as training prepares them, and boxes)."""
    negative_prompt = validation_settings(config).negative_prompt  # of entries that give none
    if config.validation:
        return [
            ValidationEntry(
                prompt=entry["prompt"],
                images=[load_image(s["image"], f"validation subject {s['phrase']!r}") for s in entry["subjects"]],
                phrases=[s["phrase"] for s in entry["subjects"]],
                boxes=[tuple(float(v) for v in s["box"]) for s in entry["subjects"]],
                # an entry's own negative prompt (null for none), else the config's (the release's by default)
                negative_prompt=entry["negative_prompt"]
                if "negative_prompt" in entry
                else validation_settings(config).negative_prompt,
            )
            for entry in config.validation
        ]
    entries = []
    for index in range(len(dataset)):
        if len(entries) == config.validation_samples:
            break
        sample = dataset.sample(index)
        subjects = sample.subjects[: config.max_subjects]
        if not subjects:
            continue
        where = dataset.location(index)  # its shard's file:line in a sharded manifest
        opened: dict = {}
        # The dataset's own reference preparation (crop, mask), so validation sees what training sees.
        images = [dataset.reference_image(s.reference, opened, where, j) for j, s in enumerate(subjects)]
        entries.append(
            ValidationEntry(
                sample.caption,
                images,
                [s.phrase for s in subjects],
                [s.box for s in subjects],
                negative_prompt=negative_prompt,
            )
        )
    return entries


class Validator:
    """Builds an `MSDiffusionXLPipeline` around the training models and writes images per step.

    `components` holds the frozen models (vae, unet, text encoders, tokenizers, image encoder and
    processor). When training reads cached features they are loaded here on first use and kept on
    the CPU between validations.
    """

    def __init__(
        self, config: TrainConfig, entries: list[ValidationEntry], components: dict, scheduler_config, device, dtype
    ):
        self.config = config
        self.entries = entries
        self.components = components
        self.scheduler_config = scheduler_config
        self.device, self.dtype = device, dtype
        self.out_dir = Path(config.output_dir) / "validation"

    def _encoders(self) -> dict:
        """Text and image encoders on the device (loaded now if training does without them)."""
        from .models import load_image_encoder, load_text_encoders

        c = self.components
        if c.get("text_encoders") is None:
            c["text_encoders"] = load_text_encoders(self.config)
            c["offload"] = True
        if c.get("image_encoder") is None:
            c["image_encoder"], c["image_processor"] = load_image_encoder(self.config)
            c["offload"] = True
        c["text_encoders"].to(self.device, self.dtype)
        c["image_encoder"].to(self.device, self.dtype)
        return c

    def _offload(self) -> None:
        c = self.components
        if c.get("offload"):
            c["text_encoders"].to("cpu")
            c["image_encoder"].to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @torch.no_grad()
    def run(self, step: int, projection) -> list[PIL.Image.Image]:
        """Generate every entry; save `validation/step-NNNNNN/K.png` and `K-layout.png`; return the layout images."""
        from diffusers import EulerDiscreteScheduler

        from ..pipelines import MSDiffusionXLPipeline

        c = self._encoders()
        text = c["text_encoders"]
        pipe = MSDiffusionXLPipeline(
            vae=c["vae"],
            text_encoder=text.text_encoder,
            text_encoder_2=text.text_encoder_2,
            tokenizer=text.tokenizer,
            tokenizer_2=text.tokenizer_2,
            unet=c["unet"],
            scheduler=EulerDiscreteScheduler.from_config(self.scheduler_config),
            image_encoder=c["image_encoder"],
            feature_extractor=c["image_processor"],
            ms_image_projection=projection,
        )
        pipe.set_progress_bar_config(disable=True)
        folder = self.out_dir / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        previews = []
        settings = validation_settings(self.config)
        try:
            for k, entry in enumerate(self.entries):
                generator = torch.Generator("cpu").manual_seed(self.config.validation_seed + k)
                with autocast:
                    arguments = {**settings.pipeline_arguments(), "negative_prompt": entry.negative_prompt}
                    image = pipe(
                        prompt=entry.prompt,
                        subject_images=entry.images,
                        subject_phrases=entry.phrases,
                        subject_boxes=entry.boxes,
                        generator=generator,
                        **arguments,
                    ).images[0]
                preview = draw_layout(image, entry.boxes, entry.phrases)
                image.save(folder / f"{k}.png")
                preview.save(folder / f"{k}-layout.png")
                previews.append(preview)
        finally:
            del pipe
            self._offload()
        return previews


def log_images(accelerator, images: list[PIL.Image.Image], step: int) -> None:
    """Send validation images to the trackers that take images (TensorBoard, wandb)."""
    if not images:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.stack([np.asarray(i) for i in images])}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": images}, step)
