"""SDXL pipelines with subject inputs: text-to-image, image-to-image and inpainting, each with or
without ControlNet.

The pipelines are diffusers' own SDXL pipelines with one extra step before denoising: the
subjects are encoded into image tokens, appended to the prompt embeddings (zeros for the
negative prompt), and the layout is handed to the attention processors for the duration of
the call. Everything else (schedulers, callbacks, LoRA, offload, ControlNet, strength, inpainting
masks) is diffusers'. `from_pipe` turns one loaded pipeline into another without loading twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import FrozenDict
from diffusers.models.controlnets import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from .adapter import (
    AdapterMismatchError,
    MSAdapterCheckpoint,
    MSImageProjection,
    attach_full_attention,
    attach_ms_attention,
    attach_text_only,
    check_fits_unet,
    checkpoint_from_models,
    detach_ms_attention,
    load_checkpoint,
)
from .attention import MSAttnProcessor
from .layout import PHRASE_MATCHING, SubjectLayout, phrase_token_positions, warn_missing_phrases
from .release import REFERENCE_COMBINE
from .repaint import DEFAULT_FEATHER, DEFAULT_MARGIN, RepaintRegion
from .subjects import (
    REFERENCE_SQUARE_SIZE,
    Subject,
    build_subjects,
    default_image_processor,
    encode_phrases,
    encode_reference_images,
    prepare_reference_pixels,
)


@dataclass
class MSDiffusionPipelineOutput(BaseOutput):
    """`images` as in SDXL; `auto_layout_maps` (B, N, h, w) in [0, 1] when auto layout ran; `repaint_masks`
    (B, 1, H, W) in [0, 1] when inpainting pasted the picture back: how much of each pixel is generated."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    auto_layout_maps: torch.Tensor | None = None
    repaint_masks: torch.Tensor | None = None


@dataclass(frozen=True)
class PreparedSubjects:
    """Subjects encoded once by `pipe.prepare_subjects(...)`, for generations that reuse them (other
    seeds, other prompts naming the same phrases): `pipe(prompt, prepared_subjects=...)` then skips the
    image encoder, the phrases' text encoder and the resampler, which otherwise run at every call.

    The tokens were made from these subjects (references, phrases, boxes) with these settings: to
    change any of them, prepare again. Like diffusers' `ip_adapter_image_embeds`, they are not
    recomputed if the adapter's or the encoders' weights change afterwards."""

    subjects: list[list[Subject]]  # one row per prompt (or one row shared by every prompt)
    tokens: torch.Tensor  # (rows, dummy tokens + 16 per subject, D): `encode_subjects`' output
    drop_grounding_tokens: bool
    reference_size: int
    reference_combine: str

    def for_prompts(self, num_prompts: int) -> tuple[list[list[Subject]], torch.Tensor]:
        """The subjects and tokens of `num_prompts` prompts (a single row is shared by all)."""
        rows = len(self.subjects)
        if rows == num_prompts:
            return self.subjects, self.tokens
        if rows == 1:
            return self.subjects * num_prompts, self.tokens.expand(num_prompts, -1, -1)
        raise ValueError(
            f"prepared_subjects holds the subjects of {rows} prompts but {num_prompts} were given: "
            f"prepare them with num_prompts={num_prompts} (or with one set of subjects, shared by every prompt)."
        )


class MSDiffusionMixin:
    """Adapter loading and subject handling shared by the MS-Diffusion pipelines."""

    # ---- adapter ---------------------------------------------------------------------------
    def load_ms_adapter(
        self,
        pretrained_model_name_or_path: str | os.PathLike | MSAdapterCheckpoint,
        image_encoder: str | os.PathLike | torch.nn.Module | None = None,
        weight_name: str | None = None,
        subfolder: str | None = None,
        image_encoder_subfolder: str | None = None,
        **hub_kwargs,
    ) -> None:
        """Load the adapter (released `ms_adapter.bin`, project folder, or hub repo) and the image encoder.

        The checkpoint is checked against this UNet, text encoder and image encoder before anything
        is changed; a mismatch raises `AdapterMismatchError` naming the first bad key and shapes.
        """
        if isinstance(pretrained_model_name_or_path, MSAdapterCheckpoint):
            checkpoint = pretrained_model_name_or_path
        else:
            checkpoint = load_checkpoint(pretrained_model_name_or_path, weight_name, subfolder, **hub_kwargs)
        check_fits_unet(checkpoint, self.unet)
        encoder, processor = self._resolve_image_encoder(image_encoder, image_encoder_subfolder, **hub_kwargs)
        config = checkpoint.resampler_config
        if encoder.config.hidden_size != config.embedding_dim:
            raise AdapterMismatchError(
                f"The resampler reads {config.embedding_dim}-d image features (image_proj.proj_in.weight) but the image "
                f"encoder's hidden size is {encoder.config.hidden_size}: use the encoder the adapter was trained with."
            )
        if self.text_encoder is not None and self.text_encoder.config.hidden_size != config.phrase_dim:
            raise AdapterMismatchError(
                f"The resampler reads {config.phrase_dim}-d phrase embeddings (image_proj.latent_proj.0.weight) but the "
                f"first text encoder's hidden size is {self.text_encoder.config.hidden_size}."
            )
        projection = checkpoint.image_projection()
        # nn.Module.to: diffusers 0.42's ModelMixin.to warns about fp32 modules on every dtype cast.
        torch.nn.Module.to(projection, self.unet.device, self.unet.dtype)
        attach_ms_attention(self.unet, checkpoint.attention, getattr(self, "controlnet", None))
        self.register_modules(ms_image_projection=projection, image_encoder=encoder, feature_extractor=processor)

    def _resolve_image_encoder(self, image_encoder, subfolder, **hub_kwargs):
        if image_encoder is None:
            if self.image_encoder is None:
                raise ValueError(
                    "No image encoder: pass image_encoder= (a folder or hub id of CLIP ViT-bigG/14, e.g. "
                    "'laion/CLIP-ViT-bigG-14-laion2B-39B-b160k', or a CLIPVisionModelWithProjection)."
                )
            return self.image_encoder, self.feature_extractor or default_image_processor()
        if isinstance(image_encoder, torch.nn.Module):
            return image_encoder.to(self.unet.device), self.feature_extractor or default_image_processor()
        from transformers import CLIPVisionModelWithProjection

        kwargs = {"subfolder": subfolder} if subfolder else {}
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            image_encoder, dtype=self.unet.dtype, **kwargs, **hub_kwargs
        ).to(self.unet.device)
        processor = default_image_processor()
        try:  # the folder's own preprocessing if it has one, else CLIP's standard
            processor = type(processor).from_pretrained(image_encoder, **kwargs, **hub_kwargs)
        except (OSError, ValueError):
            pass
        return encoder, processor

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe`: a pipeline of this class on `pipeline`'s components, loading and copying
        nothing. The adapter comes along (its projection and image encoder are components; its attention
        processors live in the shared UNet), so one loaded SDXL serves every kind of generation.

        Unlike diffusers, the models keep their dtype unless `dtype` is given: diffusers casts them to
        float32, which, the models being shared, would cast `pipeline`'s own as well. An image encoder
        offload comes along too: the shared encoder rests on the CPU either way."""
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            unet = getattr(pipeline, "unet", None)
            if unet is not None:
                kwargs["dtype"] = unet.dtype
        with _without_empty_float32_warning():
            new = super().from_pipe(pipeline, **kwargs)
        if pipeline.__dict__.get("_image_encoder_offload", False):
            new.__dict__["_image_encoder_offload"] = True
        return new

    def unload_ms_adapter(self) -> None:
        """Restore plain SDXL attention and drop the adapter's modules."""
        detach_ms_attention(self.unet, getattr(self, "controlnet", None))
        self.register_modules(ms_image_projection=None)

    def save_ms_adapter(self, path: str | os.PathLike) -> os.PathLike:
        """Save the loaded adapter: released format if `path` ends in `.bin`, else the project format."""
        if self.ms_image_projection is None:
            raise ValueError("No MS-Diffusion adapter is loaded: call load_ms_adapter() first.")
        return checkpoint_from_models(self.unet, self.ms_image_projection).save(path)

    def save_pretrained(self, *args, **kwargs):
        if getattr(self, "ms_image_projection", None) is not None:
            raise ValueError(
                "Saving a pipeline with the MS-Diffusion adapter attached would store its weights inside the UNet. "
                "Save the adapter with save_ms_adapter(path), call unload_ms_adapter(), then save_pretrained()."
            )
        return super().save_pretrained(*args, **kwargs)

    def enable_image_encoder_offload(self) -> None:
        """Keep the image encoder on the CPU except while it encodes subjects. SDXL's (ViT-bigG, about 3.7 GB
        in fp16) then leaves the GPU to the UNet while denoising, at the cost of moving it there and back at
        each encoding (prepared subjects encode once). Call it after `pipe.to(device)`, which would move it
        back; `enable_model_cpu_offload` moves every model this way and needs no such call."""
        self.__dict__["_image_encoder_offload"] = True
        if self.image_encoder is not None:
            self.image_encoder.to("cpu")

    @contextlib.contextmanager
    def _image_encoder_on(self, device: torch.device) -> Iterator[None]:
        """The image encoder on `device` for the block, back on the CPU after when it is offloaded."""
        offloaded = self.__dict__.get("_image_encoder_offload", False) and torch.device(device).type != "cpu"
        if offloaded:
            self.image_encoder.to(device)
        try:
            yield
        finally:
            if offloaded:
                self.image_encoder.to("cpu")

    @property
    def _execution_device(self) -> torch.device:
        # diffusers finds the device by walking every module of every component for offloading hooks
        # (the image encoder adds ViT-bigG's); a generation with subjects asks once, then pins it for
        # the parent's `__call__`, which would ask again.
        pinned = self.__dict__.get("_pinned_execution_device")
        return pinned if pinned is not None else super()._execution_device

    @contextlib.contextmanager
    def _execution_device_pinned(self, device: torch.device) -> Iterator[None]:
        previous = self.__dict__.get("_pinned_execution_device")
        self.__dict__["_pinned_execution_device"] = device
        try:
            yield
        finally:
            self.__dict__["_pinned_execution_device"] = previous

    # ---- subjects --------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_subjects(
        self,
        subject_images: Any,
        subject_phrases: Any,
        subject_boxes: Any = None,
        subject_scales: Any = None,
        num_prompts: int | None = None,
        drop_grounding_tokens: bool = False,
        reference_size: int = REFERENCE_SQUARE_SIZE,
        reference_combine: str = "concat",
        subject_masks: Any = None,
    ) -> PreparedSubjects:
        """Encode subjects once for several generations (`pipe(..., prepared_subjects=...)`).

        The subject arguments are those of `__call__`; `num_prompts=None` prepares them for a single
        prompt (or to be shared by every prompt of a list), `num_prompts=K` for a list of K prompts,
        with the list-of-lists forms that `__call__` accepts for a list of prompts."""
        batched = num_prompts is not None
        subjects = build_subjects(
            num_prompts or 1, subject_images, subject_phrases, subject_boxes, subject_scales, batched, subject_masks
        )
        tokens = self.encode_subjects(
            subjects, self._execution_device, drop_grounding_tokens, reference_size, reference_combine
        )
        return PreparedSubjects(subjects, tokens, drop_grounding_tokens, reference_size, reference_combine)

    @torch.no_grad()
    def encode_subjects(
        self,
        subjects: list[list[Subject]],
        device: torch.device,
        drop_grounding_tokens: bool = False,
        reference_size: int = REFERENCE_SQUARE_SIZE,
        reference_combine: str = "concat",
    ) -> torch.Tensor:
        """Per prompt `[dummy tokens | 16 tokens per subject | zero padding]`: (B, 4 + 16 * N, D).

        A subject with several reference images: "concat" (the default) resamples the features of
        all of them together into its 16 tokens; "mean" resamples each image alone and averages the
        16-token sets (the world bench compares the two: docs/world.md)."""
        if self.ms_image_projection is None or self.image_encoder is None:
            raise ValueError("Subjects need the MS-Diffusion adapter: call pipe.load_ms_adapter(...) first.")
        if reference_combine not in REFERENCE_COMBINE:
            raise ValueError(
                f"reference_combine must be one of {', '.join(REFERENCE_COMBINE)}, got {reference_combine!r}."
            )
        flat = [subject for row in subjects for subject in row]
        if reference_combine == "mean":  # one entry per reference image, averaged back below
            owners = [k for k, s in enumerate(flat) for _ in s.images]
            entries = [dataclasses.replace(s, images=[image]) for s in flat for image in s.images]
        else:
            owners, entries = list(range(len(flat))), flat
        pixels = [prepare_reference_pixels(s.images, self.feature_extractor, reference_size) for s in entries]
        with self._image_encoder_on(device):
            features, feature_mask = encode_reference_images(self.image_encoder, pixels, device)
        phrase_embeds = encode_phrases(self.tokenizer, self.text_encoder, [s.phrase for s in entries], device)
        projection = self.ms_image_projection
        dtype = projection.dtype
        boxes = torch.tensor([s.box for s in entries], device=device, dtype=dtype)
        drop = torch.full((len(entries),), drop_grounding_tokens, device=device) if drop_grounding_tokens else None
        tokens = projection(features.to(dtype), phrase_embeds.to(dtype), boxes, drop, feature_mask)
        if len(entries) != len(flat):
            owner = torch.tensor(owners, device=device)
            summed = torch.zeros(len(flat), *tokens.shape[1:], device=device, dtype=tokens.dtype).index_add_(
                0, owner, tokens
            )
            tokens = summed / torch.bincount(owner, minlength=len(flat)).to(tokens.dtype)[:, None, None]
        # Only the real subjects were resampled: absent slots stay zero. The projection's dtype, not
        # autocast's: the dummy tokens are rounded once, to the prompt embeddings' dtype, by the caller.
        return projection.token_block(tokens.to(device), [len(row) for row in subjects], dtype)

    def subject_layout(
        self,
        prompts: list[str],
        subjects: list[list[Subject]],
        height: int,
        width: int,
        ms_scale: float,
        mask_threshold: float | None,
        start_step: int,
        phrase_matching: str = "tokens",
    ) -> SubjectLayout:
        """The layout the attention processors use, one row per prompt: subjects act in their region
        masks where they have one (polygons rasterised at `height x width`), else in their boxes."""
        num_subjects = max(len(row) for row in subjects)
        boxes = torch.zeros(len(subjects), num_subjects, 4, dtype=torch.float64)
        scales = None
        if any(s.scale is not None for row in subjects for s in row):
            scales = torch.zeros(len(subjects), num_subjects)
        positions = []
        for b, (prompt, row) in enumerate(zip(prompts, subjects)):
            phrases = [s.phrase for s in row]
            found = phrase_token_positions(self.tokenizer, prompt, phrases, phrase_matching)
            warn_missing_phrases(
                prompt, phrases, found, auto_layout=mask_threshold is not None, tokenizer=self.tokenizer
            )
            positions.append(found + [[] for _ in range(num_subjects - len(row))])
            for j, subject in enumerate(row):
                boxes[b, j] = torch.tensor(subject.box, dtype=torch.float64)
                if scales is not None:
                    scales[b, j] = ms_scale if subject.scale is None else subject.scale
        masks = _region_masks(subjects, height, width)
        if mask_threshold is None and not boxes.any():
            warnings.warn(
                "No subject has a box and auto layout is off, so the subjects cannot affect the image: "
                "give subject_boxes, or set mask_threshold (e.g. 0.5) to let auto layout place them.",
                stacklevel=3,
            )
        return self.ms_image_projection.subject_layout(
            boxes,
            (height // self.vae_scale_factor, width // self.vae_scale_factor),
            scale=ms_scale,
            subject_scales=scales,
            phrase_positions=positions,
            mask_threshold=mask_threshold,
            start_step=start_step,
            masks=masks,
        )

    def _generate(
        self,
        parent_call: Callable,
        kwargs: dict,
        *,  # by name: several of these share a type, and a swap in order would pass unnoticed
        prompt: str | list[str] | None,
        subject_images: Any,
        subject_phrases: Any,
        subject_boxes: Any,
        subject_scales: Any,
        ms_scale: float,
        drop_grounding_tokens: bool,
        mask_threshold: float | None,
        start_step: int,
        reference_size: int,
        phrase_matching: str,
        reference_combine: str,
        tokens_in_prompt_embeds: bool = False,
        prepared_subjects: PreparedSubjects | None = None,
        processors: list[MSAttnProcessor] | None = None,
        subject_masks: Any = None,
        output_size: tuple[int, int] | None = None,
        repaint: RepaintRegion | None = None,
    ) -> MSDiffusionPipelineOutput | tuple:
        """The subject-aware call around the parent pipeline's `__call__`. The UNet gets the text
        embeddings alone, as bare SDXL does, and its processors the subjects' keys/values projected
        once per generation; `tokens_in_prompt_embeds` appends the subject tokens to the embeddings
        too, for ControlNets that attend over them. `output_size` (height, width) is the size of a
        parent that takes no `height`/`width` (image-to-image: its input picture's); else they are
        read from `kwargs`. `repaint` (inpainting) makes the mask from the subjects' regions when none is
        given, and pastes the picture back outside it."""
        _reject_unknown_arguments(self, parent_call, kwargs)
        return_dict = kwargs.pop("return_dict", True)
        processors = _ms_processors(self.unet) if processors is None else processors
        state = processors[0].state if processors else None
        if prepared_subjects is not None:
            given = [
                name
                for name, value in (
                    ("subject_images", subject_images),
                    ("subject_phrases", subject_phrases),
                    ("subject_boxes", subject_boxes),
                    ("subject_scales", subject_scales),
                    ("subject_masks", subject_masks),
                )
                if value is not None
            ]
            if given:
                raise ValueError(
                    f"Give either prepared_subjects or {', '.join(given)}, not both: prepared subjects carry their "
                    "references, phrases, boxes, masks and scales (prepare again to change them)."
                )
            _check_prepared_settings(prepared_subjects, drop_grounding_tokens, reference_size, reference_combine)
        elif subject_images is None and subject_phrases is None and subject_boxes is None and subject_masks is None:
            with _without_empty_float32_warning():  # the VAE's upcast (image-to-image, inpainting) casts
                output = parent_call(self, prompt=prompt, **kwargs)  # plain SDXL: no layout is active
            if repaint is not None:
                images, alpha = repaint.paste(output.images, kwargs)
                if alpha is not None:
                    output = MSDiffusionPipelineOutput(images=images, repaint_masks=alpha)
            return output if return_dict else (output.images,)
        if state is None:
            raise ValueError("Subjects need the MS-Diffusion adapter: call pipe.load_ms_adapter(...) first.")
        if prompt is None or kwargs.get("prompt_embeds") is not None:
            raise ValueError("With subjects, give `prompt` as text (not prompt_embeds): phrases are located in it.")
        if mask_threshold is not None and not 0 <= mask_threshold < 1:
            raise ValueError(f"mask_threshold must be in [0, 1) (normalised attention), got {mask_threshold}.")
        if start_step < 1:
            raise ValueError(f"start_step must be >= 1, got {start_step}.")
        if phrase_matching not in PHRASE_MATCHING:
            raise ValueError(f"phrase_matching must be one of {', '.join(PHRASE_MATCHING)}, got {phrase_matching!r}.")
        batched = not isinstance(prompt, str)
        prompts = list(prompt) if batched else [prompt]
        if prepared_subjects is not None:
            subjects, image_tokens = prepared_subjects.for_prompts(len(prompts))
        else:
            subjects = build_subjects(
                len(prompts), subject_images, subject_phrases, subject_boxes, subject_scales, batched, subject_masks
            )
            image_tokens = None

        device = self._execution_device
        if output_size is None:
            height = kwargs.pop("height", None) or self.default_sample_size * self.vae_scale_factor
            width = kwargs.pop("width", None) or self.default_sample_size * self.vae_scale_factor
            kwargs.update(height=height, width=width)
        else:
            height, width = output_size
        guidance_scale = kwargs.get("guidance_scale")
        do_cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        cross_attention_kwargs = kwargs.get("cross_attention_kwargs") or {}
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts,
            prompt_2=kwargs.pop("prompt_2", None),
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=kwargs.pop("negative_prompt", None),
            negative_prompt_2=kwargs.pop("negative_prompt_2", None),
            lora_scale=cross_attention_kwargs.get("scale"),
            clip_skip=kwargs.get("clip_skip"),
        )
        if image_tokens is None:
            image_tokens = self.encode_subjects(
                subjects, device, drop_grounding_tokens, reference_size, reference_combine
            )
        image_tokens = image_tokens.to(device, prompt_embeds.dtype)
        text_length = prompt_embeds.shape[1]
        tokens_in_prompt_embeds = tokens_in_prompt_embeds or not _processors_take_projected_tokens(processors)
        if tokens_in_prompt_embeds:
            prompt_embeds = torch.cat([prompt_embeds, image_tokens], dim=1)
            if negative_embeds is not None:  # the negative branch sees no subject: all image tokens zero
                negative_embeds = torch.cat([negative_embeds, torch.zeros_like(image_tokens)], dim=1)
        layout = self.subject_layout(
            prompts, subjects, height, width, ms_scale, mask_threshold, start_step, phrase_matching
        )
        repeats = kwargs.get("num_images_per_prompt") or 1
        layout = layout.repeat_interleave(repeats)
        if repaint is not None:
            repaint.from_subjects(subjects, height, width, repeats, kwargs)

        # Every layer projects the subject tokens once, here, not inside the denoising loop.
        image_tokens = image_tokens.repeat_interleave(repeats, 0)
        activation = state.activate(
            layout,
            image_tokens=image_tokens,
            tokens_in_hidden_states=tokens_in_prompt_embeds,
            num_text_tokens=text_length,
        )
        with activation, self._execution_device_pinned(device), _without_empty_float32_warning():
            output = parent_call(
                self,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                **kwargs,
            )
        maps = state.auto_layout_maps() if mask_threshold is not None else None
        images, alpha = repaint.paste(output.images, kwargs) if repaint is not None else (output.images, None)
        output = MSDiffusionPipelineOutput(images=images, auto_layout_maps=maps, repaint_masks=alpha)
        return output if return_dict else (output.images,)


@contextlib.contextmanager
def _without_empty_float32_warning() -> Iterator[None]:
    """diffusers 0.42's `ModelMixin.to` warns at every dtype cast that "modules should be kept in float32: []",
    naming none; `from_pipe` casts every model (to the dtype they have, here), and image-to-image and inpainting
    cast the VAE to float32 to encode the picture. Only that empty warning is dropped."""
    logger = logging.getLogger("diffusers.models.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _bind_controlnet_processors(pipeline, controlnet_image_tokens: bool) -> list[MSAttnProcessor]:
    """The UNet's subject-aware processors, after giving the ControlNet(s) theirs: text only, or (as the
    released inference_controlnet.py runs) plain attention over the subject tokens too. Set at every call:
    the option may change between calls, and the ControlNet may have been swapped."""
    processors = _ms_processors(pipeline.unet)
    state = processors[0].state if processors else None
    if controlnet_image_tokens:
        attach_full_attention(pipeline.controlnet)
    elif state is not None:
        attach_text_only(pipeline.controlnet, state)
    return processors


def _picture_size(pipeline, image: Any, height: int | None, width: int | None) -> tuple[Any, tuple[int, int]]:
    """The picture(s) to start from and the output's (height, width): the picture's size rounded down to a
    multiple of 8, as diffusers' preprocessing makes it, unless `height` / `width` say otherwise (the picture
    is then resized to them here, since diffusers' image-to-image pipeline takes no size)."""
    if image is None:
        raise ValueError(
            "`image` is required: the picture (PIL image, array or tensor, or a list of them) to start from."
        )
    factor = pipeline.vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % factor):
            raise ValueError(f"{name} must be a positive multiple of {factor}, got {value}.")
    pixels = pipeline.image_processor.preprocess(image, height=height, width=width)
    if pixels.shape[1] == pipeline.vae.config.latent_channels:  # latents given as the picture
        size = (pixels.shape[-2] * factor, pixels.shape[-1] * factor)
        if (height or size[0], width or size[1]) != size:
            raise ValueError(f"`image` holds latents of a {size[1]}x{size[0]} picture: they cannot be resized.")
        return image, size
    size = (pixels.shape[-2], pixels.shape[-1])
    if height is None and width is None:
        return image, size  # diffusers resizes it exactly so
    # diffusers reads tensors in [0, 1] (and normalises them itself)
    return ((pixels.to(torch.float32) + 1) / 2).clamp(0, 1), size


def _in_prompt_order(value: Any, prompt: Any, kwargs: dict, mask: bool = False) -> Any:
    """Pictures (or masks) given one per prompt, repeated for each prompt's images in turn. diffusers'
    image-to-image and inpainting tile fewer pictures than images over the batch (1, 2, 1, 2) while a
    prompt's images come together (1, 1, 2, 2), so with `num_images_per_prompt > 1` the second prompt
    would be drawn on the first picture. (ControlNet's control images are already repeated in order.) A mask
    array of 3 dimensions is a batch, as diffusers reads it; a picture's is one picture."""
    repeats = kwargs.get("num_images_per_prompt") or 1
    if isinstance(prompt, str) or (prompt is None and kwargs.get("prompt_embeds") is None):
        count = 1
    else:
        count = len(prompt) if prompt is not None else kwargs["prompt_embeds"].shape[0]
    if repeats == 1 or count == 1 or value is None:
        return value
    if isinstance(value, list) and len(value) == count:
        return [item for item in value for _ in range(repeats)]
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim >= (3 if mask else 4) and value.shape[0] == count:
        return value.repeat_interleave(repeats, 0) if isinstance(value, torch.Tensor) else value.repeat(repeats, 0)
    return value


# diffusers still accepts these through the `**kwargs` of its `__call__`, with a deprecation warning.
_DEPRECATED_DIFFUSERS_ARGUMENTS = ("callback", "callback_steps")


def _reject_unknown_arguments(pipeline, parent_call: Callable, kwargs: dict) -> None:
    """diffusers' SDXL `__call__` takes `**kwargs` for its deprecated callbacks and drops every other
    name unread, so `pipe(..., scale=0.3)` would run at the default `ms_scale`: a wrong image with no
    error. Names neither call declares are refused here instead."""
    declared = {
        name
        for call in (parent_call, type(pipeline).__call__)
        for name, parameter in inspect.signature(call).parameters.items()
        if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) and name != "self"
    }
    unknown = sorted(set(kwargs) - declared - set(_DEPRECATED_DIFFUSERS_ARGUMENTS))
    if not unknown:
        return
    hints = [
        f"{name!r} (did you mean {' or '.join(close)}?)"
        if (close := difflib.get_close_matches(name, sorted(declared), n=2, cutoff=0.75))
        else repr(name)
        for name in unknown
    ]
    raise TypeError(f"{type(pipeline).__name__}() got unexpected keyword argument(s) {', '.join(hints)}.")


def _check_prepared_settings(
    prepared: PreparedSubjects, drop_grounding_tokens: bool, reference_size: int, reference_combine: str
) -> None:
    """A call's encoding settings must be left at their defaults or match those the subjects were prepared with."""
    for name, given, default in (
        ("drop_grounding_tokens", drop_grounding_tokens, False),
        ("reference_size", reference_size, REFERENCE_SQUARE_SIZE),
        ("reference_combine", reference_combine, "concat"),
    ):
        prepared_value = getattr(prepared, name)
        if given != default and given != prepared_value:
            raise ValueError(
                f"{name}={given!r}, but the prepared subjects were encoded with {name}={prepared_value!r}: "
                f"pass it to prepare_subjects(...) instead."
            )


def _region_masks(subjects: list[list[Subject]], height: int, width: int) -> list[list[torch.Tensor | None]] | None:
    """Each subject's region mask for a `height x width` output (None: its box), or None without any mask."""
    if all(s.mask is None for row in subjects for s in row):
        return None
    masks = []
    for b, row in enumerate(subjects):
        masks.append([])
        for j, subject in enumerate(row):
            mask = subject.region_mask(height, width)
            if mask is not None and not mask.any():  # a polygon thinner than a pixel at this size
                raise ValueError(
                    f"subject {j} ({subject.phrase!r}): its polygon covers no pixel centre of the {width}x{height} "
                    "output; make it larger."
                )
            if isinstance(subject.mask, torch.Tensor) and not _same_aspect(mask.shape, (height, width)):
                warnings.warn(
                    f"subject {j} ({subject.phrase!r}): its {mask.shape[1]}x{mask.shape[0]} mask is stretched over the "
                    f"{width}x{height} output (a mask, like a box, is fractions of the image): give a mask of the "
                    "output's shape if the region should keep its proportions.",
                    stacklevel=4,
                )
            masks[b].append(mask)
    return masks


def _same_aspect(shape: tuple[int, int], size: tuple[int, int], tolerance: float = 0.02) -> bool:
    return abs((shape[1] / shape[0]) / (size[1] / size[0]) - 1) <= tolerance


def _ms_processors(unet) -> list[MSAttnProcessor]:
    """The UNet's subject-aware processors, found in one walk of its modules (a generation needs them
    once: each walk of SDXL's 2,140 modules costs milliseconds of host time)."""
    return [p for p in unet.attn_processors.values() if isinstance(p, MSAttnProcessor)]


def _processors_take_projected_tokens(processors: list[MSAttnProcessor]) -> bool:
    """Whether every subject-aware processor reads the keys/values projected on activation. A
    subclass with its own `__call__` (the tests' literal reference, the benchmark's model of the
    release) reads the subject tokens appended to the text, as the released processors do."""
    return all(type(p).__call__ is MSAttnProcessor.__call__ for p in processors)


_SUBJECT_DOC = """
        Subject arguments (everything else is the parent SDXL pipeline's):
            subject_images: one entry per subject (a PIL image, path, array, or a list of several images of
                the same subject). With a list of prompts, one such list per prompt, or one list shared by all.
            subject_phrases: the words naming each subject in the prompt, e.g. ["dog", "cat"].
            subject_boxes: `[x0, y0, x1, y1]` per subject, fractions of the output image; all zeros = no box.
            subject_masks: optional region of any shape per subject (None = its box): a mask image, array or
                tensor of any size (white = the region; stretched over the output like a box's fractions), or a
                polygon as a list of (x, y) fractions. The subject's tokens then act only in it, at every UNet
                resolution; the grounding resampler reads the box given, else the mask's bounding box. The released
                weights were trained with boxes: see docs/img2img-inpainting.md.
            subject_scales: optional per-subject strength (replaces `ms_scale` for the subjects given one).
            ms_scale: strength of the subject tokens (0.6 released default; ~0.4 for background-like subjects).
            drop_grounding_tokens: use the learned grounding latents instead of phrase+box ones.
            mask_threshold, start_step: auto layout; from step `start_step` each layer's subject regions come from
                its averaged phrase attention maps thresholded at `mask_threshold` (good for overlapping boxes).
            reference_size: the square the references are squashed to before CLIP preprocessing (512 released).
            phrase_matching: how phrases are located in the prompt for auto layout: "tokens" (default; the k-th
                subject of a repeated phrase at its k-th occurrence) or "release" (the released code's positions,
                which differ for repeated phrases; for reproducing its images).
            reference_combine: a subject with several images: "concat" (default: all images'
                features resampled together) or "mean" (each image's 16 tokens, averaged).
            prepared_subjects: subjects encoded once by `pipe.prepare_subjects(...)`, in place of the subject_*
                arguments: reused across calls (other seeds, other prompts), they skip the encoders.
"""


_REPAINT_DOC = """
        Repainted part (inpainting):
            repaint_margin: without `mask_image`, the subjects' regions (boxes or masks) grown by this fraction of
                the output's shorter side are repainted (default 0.02).
            keep_outside: paste the picture back outside the repainted part, through its edge feathered over
                `repaint_feather` (a fraction of the shorter side, default 0.02), so the rest of the output *is* the
                picture; else the kept part is the picture's VAE round trip, as in diffusers. Default: True
                without `mask_image`, False with one. The output's `repaint_masks` hold the alphas used.
"""


class MSDiffusionXLPipeline(MSDiffusionMixin, StableDiffusionXLPipeline):
    """SDXL with MS-Diffusion subjects. `from_pretrained` accepts anything diffusers' SDXL pipeline does."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->ms_image_projection->unet->vae"
    _optional_components = [*StableDiffusionXLPipeline._optional_components, "ms_image_projection"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        ms_image_projection: MSImageProjection | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(ms_image_projection=ms_image_projection)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        subject_images: Any = None,
        subject_phrases: Any = None,
        subject_boxes: Any = None,
        subject_scales: Any = None,
        subject_masks: Any = None,
        ms_scale: float = 0.6,
        drop_grounding_tokens: bool = False,
        mask_threshold: float | None = None,
        start_step: int = 5,
        reference_size: int = REFERENCE_SQUARE_SIZE,
        phrase_matching: str = "tokens",
        reference_combine: str = "concat",
        prepared_subjects: PreparedSubjects | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        **kwargs,
    ) -> MSDiffusionPipelineOutput | tuple:
        kwargs.update(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        return self._generate(
            StableDiffusionXLPipeline.__call__,
            kwargs,
            prompt=prompt,
            subject_images=subject_images,
            subject_phrases=subject_phrases,
            subject_boxes=subject_boxes,
            subject_scales=subject_scales,
            ms_scale=ms_scale,
            drop_grounding_tokens=drop_grounding_tokens,
            mask_threshold=mask_threshold,
            start_step=start_step,
            reference_size=reference_size,
            phrase_matching=phrase_matching,
            reference_combine=reference_combine,
            prepared_subjects=prepared_subjects,
            subject_masks=subject_masks,
        )

    __call__.__doc__ = "Generate images with subjects in their boxes." + _SUBJECT_DOC


class MSDiffusionXLControlNetPipeline(MSDiffusionMixin, StableDiffusionXLControlNetPipeline):
    """SDXL + ControlNet (one or several) with MS-Diffusion subjects.

    ControlNets see only the text tokens (the intent of the released code's `CNAttnProcessor`);
    `controlnet_image_tokens=True` lets them attend over the subject tokens too, which is what the
    released `inference_controlnet.py` actually runs, for reproducing its images.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->ms_image_projection->unet->vae"
    _optional_components = [*StableDiffusionXLControlNetPipeline._optional_components, "ms_image_projection"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | list[ControlNetModel] | tuple[ControlNetModel] | MultiControlNetModel,
        scheduler: KarrasDiffusionSchedulers,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        ms_image_projection: MSImageProjection | None = None,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            controlnet,
            scheduler,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_modules(ms_image_projection=ms_image_projection)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        controlnet_image_tokens: bool = False,
        subject_images: Any = None,
        subject_phrases: Any = None,
        subject_boxes: Any = None,
        subject_scales: Any = None,
        subject_masks: Any = None,
        ms_scale: float = 0.6,
        drop_grounding_tokens: bool = False,
        mask_threshold: float | None = None,
        start_step: int = 5,
        reference_size: int = REFERENCE_SQUARE_SIZE,
        phrase_matching: str = "tokens",
        reference_combine: str = "concat",
        prepared_subjects: PreparedSubjects | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        **kwargs,
    ) -> MSDiffusionPipelineOutput | tuple:
        processors = _bind_controlnet_processors(self, controlnet_image_tokens)
        kwargs.update(image=image, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        return self._generate(
            StableDiffusionXLControlNetPipeline.__call__,
            kwargs,
            prompt=prompt,
            subject_images=subject_images,
            subject_phrases=subject_phrases,
            subject_boxes=subject_boxes,
            subject_scales=subject_scales,
            ms_scale=ms_scale,
            drop_grounding_tokens=drop_grounding_tokens,
            mask_threshold=mask_threshold,
            start_step=start_step,
            reference_size=reference_size,
            phrase_matching=phrase_matching,
            reference_combine=reference_combine,
            tokens_in_prompt_embeds=controlnet_image_tokens,
            prepared_subjects=prepared_subjects,
            processors=processors,
            subject_masks=subject_masks,
        )

    __call__.__doc__ = (
        "Generate images with subjects in their boxes, guided by ControlNet `image`(s).\n\n"
        "        controlnet_image_tokens: let the ControlNet attend over the subject tokens as well as the text, as the\n"
        "            released inference_controlnet.py does (default False: text tokens only)." + _SUBJECT_DOC
    )


_CONTROLNET_DOC = """
        control_image: the ControlNet condition(s) (one per ControlNet), resized to the output size.
        controlnet_image_tokens: let the ControlNet attend over the subject tokens as well as the text, as the
            released inference_controlnet.py does (default False: text tokens only)."""


class MSDiffusionXLImg2ImgPipeline(MSDiffusionMixin, StableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image with MS-Diffusion subjects: `image` is noised to `strength` and denoised with
    the prompt and the subjects in their boxes or masks. Build it with `from_pretrained` and
    `load_ms_adapter`, or from a loaded pipeline with `MSDiffusionXLImg2ImgPipeline.from_pipe(pipe)`."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->ms_image_projection->unet->vae"
    _optional_components = [*StableDiffusionXLImg2ImgPipeline._optional_components, "ms_image_projection"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        ms_image_projection: MSImageProjection | None = None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            requires_aesthetics_score=requires_aesthetics_score,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(ms_image_projection=ms_image_projection)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.3,
        height: int | None = None,
        width: int | None = None,
        subject_images: Any = None,
        subject_phrases: Any = None,
        subject_boxes: Any = None,
        subject_scales: Any = None,
        subject_masks: Any = None,
        ms_scale: float = 0.6,
        drop_grounding_tokens: bool = False,
        mask_threshold: float | None = None,
        start_step: int = 5,
        reference_size: int = REFERENCE_SQUARE_SIZE,
        phrase_matching: str = "tokens",
        reference_combine: str = "concat",
        prepared_subjects: PreparedSubjects | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        **kwargs,
    ) -> MSDiffusionPipelineOutput | tuple:
        _check_strength_steps(strength, num_inference_steps, kwargs)
        image = _in_prompt_order(image, prompt, kwargs)
        image, size = _picture_size(self, image, height, width)
        kwargs.update(
            image=image, strength=strength, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale
        )
        return self._generate(
            StableDiffusionXLImg2ImgPipeline.__call__,
            kwargs,
            prompt=prompt,
            subject_images=subject_images,
            subject_phrases=subject_phrases,
            subject_boxes=subject_boxes,
            subject_scales=subject_scales,
            ms_scale=ms_scale,
            drop_grounding_tokens=drop_grounding_tokens,
            mask_threshold=mask_threshold,
            start_step=start_step,
            reference_size=reference_size,
            phrase_matching=phrase_matching,
            reference_combine=reference_combine,
            prepared_subjects=prepared_subjects,
            subject_masks=subject_masks,
            output_size=size,
        )

    __call__.__doc__ = (
        "Redraw `image` with the prompt and subjects in their boxes or masks.\n\n"
        "        image: the picture(s) to start from (one, or one per prompt); the output takes its size, rounded down\n"
        "            to a multiple of 8, unless `height` / `width` are given (the picture is then resized to them).\n"
        "        strength: how far the picture is noised (0: kept, 1: drawn anew). A subject needs enough of it to be\n"
        "            drawn; its region changes most (see docs/img2img-inpainting.md)." + _SUBJECT_DOC
    )


class MSDiffusionXLInpaintPipeline(MSDiffusionMixin, StableDiffusionXLInpaintPipeline):
    """SDXL inpainting with MS-Diffusion subjects: the white part of `mask_image` is repainted with the
    prompt and the subjects in their boxes or masks. Works with a plain SDXL UNet (4 input channels)
    and with an inpainting one (9), like diffusers' pipeline. Build it with `from_pretrained` and
    `load_ms_adapter`, or from a loaded pipeline with `MSDiffusionXLInpaintPipeline.from_pipe(pipe)`."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->ms_image_projection->unet->vae"
    _optional_components = [*StableDiffusionXLInpaintPipeline._optional_components, "ms_image_projection"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        ms_image_projection: MSImageProjection | None = None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            requires_aesthetics_score=requires_aesthetics_score,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(ms_image_projection=ms_image_projection)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        strength: float = 0.9999,
        height: int | None = None,
        width: int | None = None,
        subject_images: Any = None,
        subject_phrases: Any = None,
        subject_boxes: Any = None,
        subject_scales: Any = None,
        subject_masks: Any = None,
        ms_scale: float = 0.6,
        drop_grounding_tokens: bool = False,
        mask_threshold: float | None = None,
        start_step: int = 5,
        reference_size: int = REFERENCE_SQUARE_SIZE,
        phrase_matching: str = "tokens",
        reference_combine: str = "concat",
        prepared_subjects: PreparedSubjects | None = None,
        keep_outside: bool | None = None,
        repaint_margin: float = DEFAULT_MARGIN,
        repaint_feather: float = DEFAULT_FEATHER,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        **kwargs,
    ) -> MSDiffusionPipelineOutput | tuple:
        _refuse_crop_with_subjects(kwargs, subject_images, prepared_subjects)
        if mask_image is None and subject_images is None and prepared_subjects is None:
            raise ValueError(
                "Give `mask_image` (white where the picture is repainted, black where it is kept) or subjects, "
                "whose regions are then repainted."
            )
        image, mask_image = (
            _in_prompt_order(image, prompt, kwargs),
            _in_prompt_order(mask_image, prompt, kwargs, mask=True),
        )
        repaint = RepaintRegion(self, mask_image, keep_outside, repaint_margin, repaint_feather)
        _check_strength_steps(strength, num_inference_steps, kwargs)
        _, (height, width) = _picture_size(self, image, height, width)  # diffusers resizes image and mask itself
        kwargs.update(
            image=image,
            mask_image=mask_image,
            strength=strength,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
        with _plain_unet_of_any_latent_width(self):
            return self._generate(
                StableDiffusionXLInpaintPipeline.__call__,
                kwargs,
                prompt=prompt,
                subject_images=subject_images,
                subject_phrases=subject_phrases,
                subject_boxes=subject_boxes,
                subject_scales=subject_scales,
                ms_scale=ms_scale,
                drop_grounding_tokens=drop_grounding_tokens,
                mask_threshold=mask_threshold,
                start_step=start_step,
                reference_size=reference_size,
                phrase_matching=phrase_matching,
                reference_combine=reference_combine,
                prepared_subjects=prepared_subjects,
                subject_masks=subject_masks,
                repaint=repaint,
            )

    __call__.__doc__ = (
        "Repaint part of `image` with the prompt and subjects in their boxes or masks: the white part of\n"
        "        `mask_image`, or without it the subjects' regions.\n\n"
        "        image, mask_image: the picture(s) and what to repaint (white) or keep (black); the output takes the\n"
        "            picture's size, rounded down to a multiple of 8, unless `height` / `width` are given.\n"
        "        strength: how far the repainted part is noised (diffusers' default 0.9999: drawn anew).\n"
        "        Subjects are placed by their boxes/masks (fractions of the output), independently of a `mask_image`:\n"
        "        put them inside the repainted part. `padding_mask_crop` is refused with subjects."
        + _REPAINT_DOC
        + _SUBJECT_DOC
    )


@contextlib.contextmanager
def _plain_unet_of_any_latent_width(pipeline) -> Iterator[None]:
    """diffusers' inpainting pipelines tell a plain UNet (its input: the latents alone, blended with the
    picture's at every step) by SDXL's 4 input channels and refuse other counts. A UNet whose input is its
    VAE's latents of another width (the procedural world's 16) is plain too: its config reads 4 for the
    call. Nothing else reads it: the UNet's forward uses its layers, not its config."""
    unet = getattr(pipeline.unet, "_orig_mod", pipeline.unet)  # under torch.compile, the module itself
    width = pipeline.vae.config.latent_channels
    if width == 4 or unet.config.in_channels != width:
        yield
        return
    original = unet._internal_dict
    unet._internal_dict = FrozenDict({**original, "in_channels": 4})
    try:
        yield
    finally:
        unet._internal_dict = original


def _check_strength_steps(strength: float, num_inference_steps: int, kwargs: dict) -> None:
    """diffusers runs `int(num_inference_steps * strength)` steps; at zero it fails deep in the UNet with
    an empty batch. Said here instead (custom timesteps, sigmas and denoising_start count otherwise)."""
    if any(kwargs.get(name) is not None for name in ("timesteps", "sigmas", "denoising_start")):
        return
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}.")
    if int(num_inference_steps * strength) < 1:
        raise ValueError(
            f"strength={strength} of num_inference_steps={num_inference_steps} leaves no denoising step "
            f"(diffusers runs int(steps * strength)): raise num_inference_steps to at least {math.ceil(1 / strength) if strength else 'any'} "
            "or raise strength."
        )


def _refuse_crop_with_subjects(kwargs: dict, subject_images: Any, prepared_subjects: Any) -> None:
    """diffusers' `padding_mask_crop` repaints a crop around the mask, resized to the output size: boxes and
    masks, fractions of the whole picture, would land elsewhere."""
    if kwargs.get("padding_mask_crop") is not None and (subject_images is not None or prepared_subjects is not None):
        raise ValueError(
            "padding_mask_crop cannot be used with subjects: their boxes and masks are fractions of the whole picture, "
            "but the crop is generated alone. Leave padding_mask_crop=None."
        )


class MSDiffusionXLControlNetImg2ImgPipeline(MSDiffusionMixin, StableDiffusionXLControlNetImg2ImgPipeline):
    """SDXL image-to-image + ControlNet (one or several) with MS-Diffusion subjects; ControlNets see
    the text tokens only unless `controlnet_image_tokens=True` (see `MSDiffusionXLControlNetPipeline`)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->ms_image_projection->unet->vae"
    _optional_components = [*StableDiffusionXLControlNetImg2ImgPipeline._optional_components, "ms_image_projection"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | list[ControlNetModel] | tuple[ControlNetModel] | MultiControlNetModel,
        scheduler: KarrasDiffusionSchedulers,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        ms_image_projection: MSImageProjection | None = None,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            controlnet,
            scheduler,
            requires_aesthetics_score=requires_aesthetics_score,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_modules(ms_image_projection=ms_image_projection)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        control_image: Any = None,
        strength: float = 0.8,
        height: int | None = None,
        width: int | None = None,
        controlnet_image_tokens: bool = False,
        subject_images: Any = None,
        subject_phrases: Any = None,
        subject_boxes: Any = None,
        subject_scales: Any = None,
        subject_masks: Any = None,
        ms_scale: float = 0.6,
        drop_grounding_tokens: bool = False,
        mask_threshold: float | None = None,
        start_step: int = 5,
        reference_size: int = REFERENCE_SQUARE_SIZE,
        phrase_matching: str = "tokens",
        reference_combine: str = "concat",
        prepared_subjects: PreparedSubjects | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        **kwargs,
    ) -> MSDiffusionPipelineOutput | tuple:
        _check_strength_steps(strength, num_inference_steps, kwargs)
        processors = _bind_controlnet_processors(self, controlnet_image_tokens)
        image = _in_prompt_order(image, prompt, kwargs)
        _, (height, width) = _picture_size(self, image, height, width)  # diffusers resizes both pictures itself
        kwargs.update(
            image=image,
            control_image=control_image,
            strength=strength,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
        return self._generate(
            StableDiffusionXLControlNetImg2ImgPipeline.__call__,
            kwargs,
            prompt=prompt,
            subject_images=subject_images,
            subject_phrases=subject_phrases,
            subject_boxes=subject_boxes,
            subject_scales=subject_scales,
            ms_scale=ms_scale,
            drop_grounding_tokens=drop_grounding_tokens,
            mask_threshold=mask_threshold,
            start_step=start_step,
            reference_size=reference_size,
            phrase_matching=phrase_matching,
            reference_combine=reference_combine,
            tokens_in_prompt_embeds=controlnet_image_tokens,
            prepared_subjects=prepared_subjects,
            processors=processors,
            subject_masks=subject_masks,
        )

    __call__.__doc__ = (
        "Redraw `image` with the prompt and subjects in their boxes or masks, guided by ControlNet `control_image`(s).\n\n"
        "        image: the picture(s) to start from; the output takes its size (rounded down to a multiple of 8) unless\n"
        "            `height` / `width` are given.\n"
        "        strength: how far the picture is noised (diffusers' default for this pipeline: 0.8)."
        + _CONTROLNET_DOC
        + _SUBJECT_DOC
    )


class MSDiffusionXLControlNetInpaintPipeline(MSDiffusionMixin, StableDiffusionXLControlNetInpaintPipeline):
    """SDXL inpainting + ControlNet (one or several) with MS-Diffusion subjects (4- or 9-channel UNets);
    ControlNets see the text tokens only unless `controlnet_image_tokens=True`."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->ms_image_projection->unet->vae"
    _optional_components = [*StableDiffusionXLControlNetInpaintPipeline._optional_components, "ms_image_projection"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | list[ControlNetModel] | tuple[ControlNetModel] | MultiControlNetModel,
        scheduler: KarrasDiffusionSchedulers,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        ms_image_projection: MSImageProjection | None = None,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            controlnet,
            scheduler,
            requires_aesthetics_score=requires_aesthetics_score,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_modules(ms_image_projection=ms_image_projection)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        control_image: Any = None,
        strength: float = 0.9999,
        height: int | None = None,
        width: int | None = None,
        controlnet_image_tokens: bool = False,
        subject_images: Any = None,
        subject_phrases: Any = None,
        subject_boxes: Any = None,
        subject_scales: Any = None,
        subject_masks: Any = None,
        ms_scale: float = 0.6,
        drop_grounding_tokens: bool = False,
        mask_threshold: float | None = None,
        start_step: int = 5,
        reference_size: int = REFERENCE_SQUARE_SIZE,
        phrase_matching: str = "tokens",
        reference_combine: str = "concat",
        prepared_subjects: PreparedSubjects | None = None,
        keep_outside: bool | None = None,
        repaint_margin: float = DEFAULT_MARGIN,
        repaint_feather: float = DEFAULT_FEATHER,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        **kwargs,
    ) -> MSDiffusionPipelineOutput | tuple:
        _refuse_crop_with_subjects(kwargs, subject_images, prepared_subjects)
        if mask_image is None and subject_images is None and prepared_subjects is None:
            raise ValueError(
                "Give `mask_image` (white where the picture is repainted, black where it is kept) or subjects, "
                "whose regions are then repainted."
            )
        image, mask_image = (
            _in_prompt_order(image, prompt, kwargs),
            _in_prompt_order(mask_image, prompt, kwargs, mask=True),
        )
        repaint = RepaintRegion(self, mask_image, keep_outside, repaint_margin, repaint_feather)
        _check_strength_steps(strength, num_inference_steps, kwargs)
        processors = _bind_controlnet_processors(self, controlnet_image_tokens)
        _, (height, width) = _picture_size(self, image, height, width)
        kwargs.update(
            image=image,
            mask_image=mask_image,
            control_image=control_image,
            strength=strength,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
        with _plain_unet_of_any_latent_width(self):
            return self._generate(
                StableDiffusionXLControlNetInpaintPipeline.__call__,
                kwargs,
                prompt=prompt,
                subject_images=subject_images,
                subject_phrases=subject_phrases,
                subject_boxes=subject_boxes,
                subject_scales=subject_scales,
                ms_scale=ms_scale,
                drop_grounding_tokens=drop_grounding_tokens,
                mask_threshold=mask_threshold,
                start_step=start_step,
                reference_size=reference_size,
                phrase_matching=phrase_matching,
                reference_combine=reference_combine,
                tokens_in_prompt_embeds=controlnet_image_tokens,
                prepared_subjects=prepared_subjects,
                processors=processors,
                subject_masks=subject_masks,
                repaint=repaint,
            )

    __call__.__doc__ = (
        "Repaint the white part of `mask_image` in `image` with the prompt and subjects, guided by ControlNet "
        "`control_image`(s).\n\n"
        "        image, mask_image: the picture(s) and what to repaint (white); the output takes the picture's size\n"
        "            unless `height` / `width` are given; without `mask_image` the subjects' regions are repainted.\n"
        "            `padding_mask_crop` is refused with subjects." + _REPAINT_DOC + _CONTROLNET_DOC + _SUBJECT_DOC
    )
