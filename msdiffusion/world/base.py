"""Training the world's SDXL-architecture base: the VAE, then the UNet with both text encoders.

Two stages, each resumable exactly from its last checkpoint (model, optimiser, EMA and random
states in one file written atomically):

1. `train_vae`: an `AutoencoderKL` on the world's scenes (L1 + MSE reconstruction of the
   posterior mean, subjects' pixels weighted up, a small KL term); its `scaling_factor` is then set so that latents have unit variance, as SDXL's is.
2. `train_base`: text-to-image, v prediction on SDXL's noise schedule (see `models.scheduler`), the UNet and both
   text encoders trained together from scratch; captions are emptied 10% of the time so that
   classifier-free guidance works, and half of the others describe the subjects' identities. The
   weights kept are an exponential moving average.

The base is then written as an ordinary diffusers SDXL folder (`save_base`) and frozen; the
adapter is trained on it with `msdiff train`. This is a plain loop, not `msdiffusion.train`:
that module trains an adapter around a frozen UNet, while here everything is trained from zero.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..train.loss import box_cover, diffusion_loss
from ..train.timesteps import draw_timesteps
from . import models
from .data import load_images, read_world_manifest


@dataclass
class BaseRecipe:
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_subject_weight: float = 2.0
    unet_channels: tuple[int, int, int] = models.UNET_CHANNELS
    unet_attention: tuple[bool, bool, bool] = models.UNET_ATTENTION
    unet_batch: int = 32
    warmup_steps: int = 200
    # The UNet's learning-rate schedule: cosine cycles of (steps, peak learning rate, high-noise share),
    # each a warm restart of the last. A finished build is extended by adding a cycle, which leaves
    # every earlier step as it was. The share is the fraction of a batch's timesteps drawn from the
    # schedule's noisier half (t >= 500) instead of all of it: the world's bases form shapes from high
    # noise last and worst, and that half is where a sample's layout and outlines are decided.
    cycles: tuple[tuple[int, float, float], ...] = (
        (5000, 5e-4, 0.0),
        (2000, 2e-4, 0.0),
        (3000, 2e-4, 0.5),
        (3000, 3e-4, 0.5),
        (3000, 3e-4, 0.5),
    )
    # The UNet's loss on latent cells inside subjects' boxes is weighted by 1 + this (0: a plain
    # mean). Backgrounds (a grid, sand speckle) fill most of a scene and most of a plain loss, and
    # their noise-like texture cannot be predicted from mid noise anyway; the subjects' outlines,
    # which the bases lose from mid noise, get a larger share.
    subject_loss_weight: float = 3.0
    # (class, factor) pairs: a scene holding a subject of one of these classes is drawn `factor` times
    # as often as the manifest has it (the largest factor of its subjects): every class is as common
    # in the data, but not as easy to learn. Empty: every scene as often.
    class_sampling: tuple[tuple[str, float], ...] = ()
    caption_drop: float = 0.1
    # Of the captions kept, this share describes each subject's identity ("a red blue small dotted
    # star"), the rest names classes only, as the adapter's data and the evaluation's prompts do. A
    # base that only ever saw class names has no reason to learn to draw a colour or pattern on
    # command, and draws their average; with words for them it learns to draw at least the colours
    # named, which the adapter's subject tokens can then steer.
    identity_captions: float = 0.5
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    # A snapshot (`save_snapshot`: the EMA base at a cycle's end, as `train_base` writes under
    # `snapshots/`) to start from when there is no checkpoint: the next cycle starts from its weights
    # with a fresh optimiser and `warmup_steps` of warmup. A warm restart, not an exact resume: it
    # lets a recipe longer than one sitting on a machine continue on another, from 18 MB of fp16
    # (the exact state, model, EMA and AdamW moments in fp32, is 150 MB).
    init_from: str | None = None
    seed: int = 0


def save_training_state(path: Path, modules: dict, optimizer, generator: torch.Generator, step: int) -> None:
    """Everything a stage needs to resume exactly; a kill during the save leaves the previous file intact."""
    from ..atomic import atomic_path

    state = {name: module.state_dict() for name, module in modules.items()}
    state.update(
        optimizer=optimizer.state_dict(), generator=generator.get_state(), torch_rng=torch.get_rng_state(), step=step
    )
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume_training_state(path: Path, modules: dict, optimizer, generator: torch.Generator) -> int:
    """Load what `save_training_state` wrote (if there is a file); returns the step to continue from."""
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=True)  # tensors and plain values only: a file never runs code
    for name, module in modules.items():
        module.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


SNAPSHOT_STEP = "training_step.json"


def cycle_ends(recipe: BaseRecipe) -> list[int]:
    """The steps at which the recipe's cycles end (the last is its total)."""
    ends, total = [], 0
    for steps, _, _ in recipe.cycles:
        total += steps
        ends.append(total)
    return ends


def warmup_cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak` over `warmup` steps, then a cosine to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _cycle(step: int, recipe: BaseRecipe) -> tuple[int, int, float, float]:
    """The cycle `step` belongs to: (its first step, its length, its peak learning rate, its high-noise share)."""
    first = 0
    for steps, peak, high_noise in recipe.cycles:
        if step < first + steps:
            return first, steps, peak, high_noise
        first += steps
    raise ValueError(f"step {step} is past the recipe's {first} steps")


def _base_lr(step: int, recipe: BaseRecipe) -> float:
    """Warmup and cosine over the first cycle, then a cosine from each later cycle's peak."""
    first, steps, peak, _ = _cycle(step, recipe)
    if first == 0:
        return warmup_cosine_lr(step, steps, recipe.warmup_steps, peak)
    return warmup_cosine_lr(step - first + 1, steps + 1, 1, peak)


def scene_sampling_weights(entries: list, class_sampling: tuple[tuple[str, float], ...]) -> torch.Tensor | None:
    """Each manifest entry's chance to be drawn (`BaseRecipe.class_sampling`); None when all are equal."""
    factors = dict(class_sampling)
    if not factors or all(f == 1 for f in factors.values()):
        return None
    return torch.tensor(
        [max((factors.get(s.phrase, 1.0) for s in e.subjects), default=1.0) for e in entries], dtype=torch.float64
    )


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


# ---- stage 1: VAE ------------------------------------------------------------------------------------
def _vae_batch(seed: int, step: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Scenes drawn afresh for each step (a function of the step, so a resumed run sees the same):
    images (B, H, W, 3) and where their subjects are (B, H, W)."""
    from .scenes import random_scene

    scenes = [random_scene(np.random.default_rng([seed, 1, step, k])) for k in range(batch)]
    masks = [np.any(s.masks, axis=0) if s.masks else np.zeros(s.image.shape[:2], bool) for s in scenes]
    return np.stack([s.image for s in scenes]), np.stack(masks)


def _weighted_error(error: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (error.abs() * weight).mean() + (error.square() * weight).mean()


def vae_loss(vae, x: torch.Tensor, weight: torch.Tensor, recipe: BaseRecipe) -> torch.Tensor:
    """Reconstruction (L1 + MSE, per-pixel `weight`) and a small KL term."""
    posterior = vae.encode(x).latent_dist
    # Decoding the posterior's mean, not a sample: with a KL weight this small the sampled noise
    # only slows learning, and the base trains on the means too.
    latents = posterior.mode()
    return _weighted_error(vae.decode(latents).sample - x, weight) + recipe.vae_kl_weight * posterior.kl().mean()


def train_vae(out: str | Path, recipe: BaseRecipe, log: Callable = print):
    """Train the VAE on fresh scenes (resuming from `out/vae-checkpoint.pt`), write `out/vae/`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "vae" / "config.json").exists():
        from diffusers import AutoencoderKL

        log(f"vae: done already ({out / 'vae'})")
        return AutoencoderKL.from_pretrained(out / "vae")
    torch.manual_seed(recipe.seed)
    vae = models.vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(recipe.seed)
    checkpoint = out / "vae-checkpoint.pt"
    step = resume_training_state(checkpoint, {"model": vae}, optimizer, generator)
    if step:
        log(f"vae: resumed at step {step}")
    vae.train()
    start, window = time.perf_counter(), []
    while step < recipe.vae_steps:
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, recipe.vae_steps, 50, recipe.vae_lr)
        images, masks = _vae_batch(recipe.seed, step, recipe.vae_batch)
        x = _images_to_tensor(images)
        # Subjects cover a fifth of the pixels but carry what matters (class, colours, pattern).
        weight = 1 + recipe.vae_subject_weight * torch.from_numpy(masks).float()[:, None]
        loss = vae_loss(vae, x, weight, recipe)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.append(loss.item())
        if step % 50 == 0:
            log(f"vae step {step}/{recipe.vae_steps} loss {np.mean(window):.4f} ({time.perf_counter() - start:.0f} s)")
            window = []
        if step % recipe.checkpoint_every == 0 or step == recipe.vae_steps:
            save_training_state(checkpoint, {"model": vae}, optimizer, generator, step)
    vae.eval()
    with torch.no_grad():  # SDXL's latents have about unit variance after scaling; make ours so too
        sample = _images_to_tensor(np.concatenate([_vae_batch(recipe.seed + 1, k, 256)[0] for k in range(4)]))
        std = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in sample.split(256)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    pin_posterior_variance(vae)
    vae.save_pretrained(out / "vae")
    log(f"vae: scaling_factor {1.0 / std:.4f}; written to {out / 'vae'}")
    return vae


def pin_posterior_variance(vae, log_variance: float = -30.0) -> None:
    """Make the posterior's variance ~0, so that a sample is the mean.

    The VAE is trained on its posterior mean (its log-variance outputs never learn anything), and
    the base trains on means; `msdiff train`, like every diffusers training script, samples the
    posterior. With the variance pinned both see the same latents.
    """
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = log_variance


# ---- stage 2: UNet + text encoders ----------------------------------------------------------------------
class _Captions:
    """Both tokenizers' ids of every scene's captions (class names only, and described), computed once."""

    def __init__(self, entries: list, tokenizer, tokenizer_2):
        from .scenes import caption_for

        def ids(tok, texts):
            return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

        plain = [e.caption for e in entries]
        described = [
            caption_for(
                [s.phrase for s in e.subjects],
                e.meta["background"],
                [s.meta["identity"] for s in e.subjects],
            )
            for e in entries
        ]
        self.ids = ids(tokenizer, plain), ids(tokenizer_2, plain)
        self.described = ids(tokenizer, described), ids(tokenizer_2, described)
        self.empty = ids(tokenizer, [""]), ids(tokenizer_2, [""])

    def pick(
        self, index: torch.Tensor, keep: torch.Tensor, describe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids for a batch: described where `describe`, plain elsewhere, empty where not `keep` ((B, 1) masks)."""
        return tuple(
            torch.where(keep, torch.where(describe, described[index], plain[index]), empty)
            for plain, described, empty in zip(self.ids, self.described, self.empty)
        )


def encode_prompts(text_encoder, text_encoder_2, ids, ids_2) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt embeddings: penultimate states of both encoders, and the second's projection."""
    first = text_encoder(ids, output_hidden_states=True)
    second = text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def entry_boxes(entries: list) -> torch.Tensor:
    """(N, max subjects, 4) boxes of manifest entries, zeros for padding (`train.loss.box_cover`'s input)."""
    boxes = torch.zeros(len(entries), max([len(e.subjects) for e in entries] + [1]), 4)
    for n, entry in enumerate(entries):
        for k, subject in enumerate(entry.subjects):
            boxes[n, k] = torch.tensor(subject.box, dtype=torch.float32)
    return boxes


class _Base(torch.nn.Module):
    def __init__(self, unet, text_encoder, text_encoder_2):
        super().__init__()
        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2


def train_base(manifest: str | Path, vae, out: str | Path, recipe: BaseRecipe, log: Callable = print) -> _Base:
    """Train UNet + text encoders on VAE latents (resuming from `out/base-checkpoint.pt`); returns the EMA model."""
    from diffusers import DDPMScheduler

    out = Path(out)
    tokenizer, tokenizer_2 = models.tokenizers(out / "tokenizer")
    torch.manual_seed(recipe.seed + 1)
    text_encoder, text_encoder_2 = models.text_encoders(tokenizer)
    model = _Base(models.unet(recipe.unet_channels, recipe.unet_attention), text_encoder, text_encoder_2)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.cycles[0][1], weight_decay=0.01)
    noise_scheduler = DDPMScheduler.from_config(models.scheduler().config)
    entries = read_world_manifest(manifest)
    captions = _Captions(entries, tokenizer, tokenizer_2)
    scene_weights = scene_sampling_weights(entries, recipe.class_sampling)

    log(f"base: encoding {len(entries)} images with the VAE")
    images = load_images(manifest)
    with torch.no_grad():
        stats = [vae.encode(_images_to_tensor(images[i : i + 256])).latent_dist for i in range(0, len(images), 256)]
    mean = torch.cat([s.mean for s in stats])
    del images, stats
    scaling = vae.config.scaling_factor
    size = models.SIZE
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    cover = box_cover(entry_boxes(entries), *mean.shape[-2:]) if recipe.subject_loss_weight else None

    generator = torch.Generator().manual_seed(recipe.seed + 2)
    checkpoint = out / "base-checkpoint.pt"
    step = resume_training_state(checkpoint, {"model": model, "ema": ema}, optimizer, generator)
    warm_start = None
    if recipe.init_from and step:  # an exact resume inside a restarted run keeps the restart's warmup
        warm_start = json.loads((Path(recipe.init_from) / SNAPSHOT_STEP).read_text())["step"]
    elif recipe.init_from:
        warm_start = step = load_snapshot(model, recipe, log)
        ema.load_state_dict(model.state_dict())
        generator.manual_seed(recipe.seed + 2 + step)  # not the first cycle's batches again
        log(f"base: warm restart from {recipe.init_from} at step {step} (fresh optimiser)")
    ends = cycle_ends(recipe)
    if step and step != warm_start:
        log(f"base: resumed at step {step}")
        if (
            step in ends and not (out / "snapshots" / f"step-{step}" / SNAPSHOT_STEP).exists()
        ):  # stopped while writing it
            save_snapshot(ema, vae, out / "snapshots" / f"step-{step}", out / "tokenizer", step, recipe)
    model.train()
    params, ema_params = list(model.parameters()), list(ema.parameters())
    start, window, first = time.perf_counter(), [], step
    total = ends[-1]
    while step < total:
        lr = _base_lr(step, recipe)
        if warm_start is not None:  # fresh AdamW moments: their first steps are the largest
            lr *= min(1.0, (step - warm_start + 1) / recipe.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        b = recipe.unet_batch
        if scene_weights is None:  # as every earlier build drew its batches
            index = torch.randint(len(entries), (b,), generator=generator)
        else:
            index = torch.multinomial(scene_weights, b, replacement=True, generator=generator)
        latents = mean[index] * scaling
        keep = (torch.rand(b, generator=generator) >= recipe.caption_drop)[:, None]
        describe = (torch.rand(b, generator=generator) < recipe.identity_captions)[:, None]
        ids, ids_2 = captions.pick(index, keep, describe)
        noise = torch.randn(latents.shape, generator=generator)
        high_noise = _cycle(step, recipe)[3]
        timesteps = draw_timesteps(b, noise_scheduler.config.num_train_timesteps, high_noise, generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prompt_embeds, pooled = encode_prompts(model.text_encoder, model.text_encoder_2, ids, ids_2)
        prediction = model.unet(
            noisy,
            timesteps,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(b, -1)},
        ).sample
        target = (
            noise
            if noise_scheduler.config.prediction_type == "epsilon"
            else noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        loss = diffusion_loss(prediction, target, None if cover is None else cover[index], recipe.subject_loss_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        window.append(loss.item())
        if step % 50 == 0:
            elapsed = time.perf_counter() - start
            left = (total - step) * elapsed / (step - first)  # at this sitting's rate so far
            left_text = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.0f} min"
            log(
                f"base step {step}/{total} loss {np.mean(window):.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"({elapsed:.0f} s; about {left_text} left)"
            )
            window = []
        if step % recipe.checkpoint_every == 0 or step == total:
            save_training_state(checkpoint, {"model": model, "ema": ema}, optimizer, generator, step)
        if step in ends:
            save_snapshot(ema, vae, out / "snapshots" / f"step-{step}", out / "tokenizer", step, recipe)
    return ema.eval()


def save_snapshot(
    ema: _Base, vae, folder: str | Path, tokenizer_dir: str | Path, step: int, recipe: BaseRecipe
) -> Path:
    """The EMA base after `step` steps as an ordinary SDXL folder (fp16), with the step and the
    settings a warm restart must share (`BaseRecipe.init_from`)."""
    folder = save_base(ema, vae, folder, tokenizer_dir)
    record = {
        "step": step,
        "unet_channels": list(recipe.unet_channels),
        "unet_attention": list(recipe.unet_attention),
        "cycles": [list(c) for c in recipe.cycles],
        "subject_loss_weight": recipe.subject_loss_weight,
        "class_sampling": [list(c) for c in recipe.class_sampling],
    }
    (folder / SNAPSHOT_STEP).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def snapshot_from_checkpoint(
    checkpoint: str | Path, vae, folder: str | Path, tokenizer_dir: str | Path, recipe: BaseRecipe
) -> Path:
    """`save_snapshot` of the EMA in a `train_base` checkpoint file (to probe a base while it trains)."""
    tokenizer, _ = models.tokenizers(tokenizer_dir)
    ema = _Base(models.unet(recipe.unet_channels, recipe.unet_attention), *models.text_encoders(tokenizer))
    state = torch.load(checkpoint, weights_only=True)
    ema.load_state_dict(state["ema"])
    return save_snapshot(ema, vae, folder, tokenizer_dir, state["step"], recipe)


def snapshot_record(recipe: BaseRecipe) -> dict:
    """`recipe.init_from`'s snapshot record, checked to end one of the recipe's cycles before its last."""
    folder = Path(recipe.init_from)
    if not (folder / SNAPSHOT_STEP).exists():
        raise FileNotFoundError(
            f"{folder}: no {SNAPSHOT_STEP}; init_from takes a snapshot that train_base wrote under base-train/snapshots/."
        )
    try:
        record = json.loads((folder / SNAPSHOT_STEP).read_text())
        step = record["step"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{folder}: {SNAPSHOT_STEP} is not a snapshot record (no step); train_base writes it with each snapshot."
        ) from None
    ends = cycle_ends(recipe)
    if step not in ends[:-1]:
        raise ValueError(
            f"{folder} was taken after {step} steps, which is not the end of one of this recipe's cycles before its last "
            f"(they end at {', '.join(map(str, ends))}): a warm restart trains the cycles after it, so give the cycles it was "
            "trained with and at least one more (the recipe file's base.cycles)."
        )
    return record


def load_snapshot(model: _Base, recipe: BaseRecipe, log: Callable = print) -> int:
    """Load `recipe.init_from`'s weights into `model`; returns its step (checked by `snapshot_record`)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizerFast

    record, folder = snapshot_record(recipe), Path(recipe.init_from)
    channels, attention = record.get("unet_channels"), record.get("unet_attention")
    if (
        channels is None
        or tuple(channels) != tuple(recipe.unet_channels)
        or tuple(attention or ()) != tuple(recipe.unet_attention)
    ):
        raise ValueError(
            f"{folder} is a UNet with channels {channels} and attention {attention}; "
            f"the recipe asks for {list(recipe.unet_channels)} and {list(recipe.unet_attention)} (base.unet_channels)."
        )
    # The snapshot's words must be the world's: a token embedding row means a word through its id.
    theirs = CLIPTokenizerFast.from_pretrained(folder / "tokenizer").get_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        ours = models.tokenizers(tmp)[0].get_vocab()
    if theirs != ours:
        raise ValueError(
            f"{folder}: its tokenizer is not the world's ({len(theirs)} tokens against {len(ours)}): the world's words "
            "changed since it was taken, so it cannot be continued; build from scratch."
        )
    parts = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    for name, cls in parts.items():
        getattr(model, name).load_state_dict(cls.from_pretrained(folder / name, torch_dtype=torch.float32).state_dict())
    return record["step"]


def save_base(base: _Base, vae, out: str | Path, tokenizer_dir: str | Path) -> Path:
    """Write the base as an ordinary diffusers SDXL folder (fp16 weights: they are shipped), with the
    sampler of the schedule it was trained on (`models.scheduler`)."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = models.tokenizers(tokenizer_dir)
    pipe = StableDiffusionXLPipeline(
        vae=copy.deepcopy(vae),
        text_encoder=copy.deepcopy(base.text_encoder),
        text_encoder_2=copy.deepcopy(base.text_encoder_2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=copy.deepcopy(base.unet),
        scheduler=models.scheduler(),
        force_zeros_for_empty_prompt=False,  # trained with the empty caption as the unconditional input
    )
    pipe.to(torch.float16).save_pretrained(out)
    # A model loaded from a folder keeps that folder in its config as `_name_or_path`: a path on the
    # machine that trained it, meaningless in a shipped copy.
    for config in Path(out).rglob("config.json"):
        fields = json.loads(config.read_text())
        if fields.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    return Path(out)
