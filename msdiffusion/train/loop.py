"""The training loop: frozen SDXL, trainable MS-Diffusion adapter, everything distributed by accelerate.

Run it with `msdiff train --config FILE` on one device, or `accelerate launch ... -m msdiffusion train
--config FILE` on several GPUs or machines (docs/training.md).

Determinism and resume: every random draw of a step (drops, timesteps, noise, the VAE's latent
sample) comes from one `torch.Generator` per process, seeded from `(seed, process index)` and saved
in each checkpoint; the data order and crops depend on `(seed, epoch, index)` only; optimizer, LR
schedule, grad-scaler and EMA states are saved by `accelerator.save_state`. A run resumed from step
k therefore continues exactly as if it had not stopped (with the same number of processes).

Crashes: a checkpoint is visible under its name only once complete (`checkpoints.py`); the run's
exports are replaced atomically (`..atomic`); SIGTERM stops the run after saving a checkpoint at the
end of the current step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, remove_stale_temporaries, replace_path, write_text_atomic
from ..data.dataset import MASK_COLORS
from .checkpoints import (
    STATE_FILE,
    check_checkpoint,
    checkpoint_path,
    checkpoint_step,
    find_checkpoints,
    list_checkpoints,
    partial_checkpoints,
    partial_path,
    write_state,
)
from .conditioning import CachedFeatures, EncoderFeatures, condition, draw_drops
from .config import ConfigError, TrainConfig
from .loss import box_cover, diffusion_loss, min_snr_weights
from .timesteps import draw_timesteps

logger = logging.getLogger("msdiffusion.train")

ADAPTER_DIR = "adapter"  # project format, the weights to use (EMA when on)
RELEASED_FILE = "ms_adapter.bin"  # released format, the same weights
TRAINABLE_DIR = "trainable"  # with EMA: the raw training weights a resume continues from
SUMMARY_FILE = "train_summary.json"


def train(config: TrainConfig) -> dict[str, Any]:
    """Train as `config` says; returns the run summary (also written to `output_dir/train_summary.json`)."""
    run = TrainingRun(config)
    summary = run.train()
    run.release()
    return summary


def _check_new_run_output(config: TrainConfig) -> None:
    """A new run in a folder another run trained into would mix the two: its checkpoints would replace
    the other's step by step, `checkpoints_total_limit` would remove its own first (the other's are
    later), `latest` would then resume the other run, and its adapter would replace the other's."""
    output_dir = Path(config.output_dir)
    if config.resume_from_checkpoint is not None:
        return
    found = [p.name for p in list_checkpoints(output_dir)]
    if (output_dir / ADAPTER_DIR).exists():
        found.append(f"{ADAPTER_DIR}/")
    if found:
        shown = ", ".join(found) if len(found) <= 4 else f"{found[0]} ... {found[-1]}: {len(found)} entries"
        raise ConfigError(
            [
                f"output_dir: {output_dir} holds another run's training ({shown}). Continue it with "
                "resume_from_checkpoint: latest (--resume-from-checkpoint latest), or start over in a new "
                "output_dir (or after removing that folder)."
            ]
        )


class TrainingRun:
    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

        self.config = config.validate()
        self.output_dir = Path(config.output_dir)
        _check_new_run_output(config)
        _check_tracker(config.report_to)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            # pinned batches are copied to the GPU while the previous step still runs
            dataloader_config=DataLoaderConfiguration(non_blocking=config.pin_memory),
        )
        check_distributed_type(self.accelerator.distributed_type)
        if config.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            # accelerate runs no fp16 autocast on the CPU, and the fp32 adapter cannot take fp16 inputs
            raise ConfigError(["mixed_precision: fp16 needs a GPU; on the CPU use bf16 or no"])
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines
        if not self.accelerator.is_local_main_process:
            logger.setLevel(logging.WARNING)
        self.device = self.accelerator.device
        self.weight_dtype = getattr(torch, config.weight_dtype_name)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.generator = torch.Generator("cpu").manual_seed(_process_seed(config.seed, self.accelerator.process_index))
        self._build()

    # ---- set-up -----------------------------------------------------------------------------------
    def _build(self) -> None:
        from diffusers import DDPMScheduler

        from .cache import FeatureCache
        from .data import build_dataloader, build_dataset
        from .models import (
            build_training_model,
            encoder_widths,
            load_image_encoder,
            load_image_processor,
            load_text_encoders,
            load_unet_and_vae,
            reference_pixels_size,
        )

        config, accelerator = self.config, self.accelerator
        self.noise_scheduler = DDPMScheduler.from_pretrained(
            config.base, subfolder="scheduler", revision=config.revision
        )
        self.prediction_type = config.prediction_type or self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                [
                    f"prediction_type: the base's scheduler predicts {self.prediction_type!r}; training supports epsilon and v_prediction"
                ]
            )
        # The data first: a manifest or cache problem is reported before the models load.
        image_processor = load_image_processor(config)
        cache = FeatureCache(config.cache) if config.cache else None
        self.dataset = build_dataset(config, image_processor, cache, self._cache_settings() if cache else None)
        dataloader, self.batches = build_dataloader(config, self.dataset, cached=cache is not None)
        if config.bad_samples == "stop":
            self._check_images()
        self.bad_samples = 0

        unet, vae = load_unet_and_vae(config)
        if cache is None:
            text_encoders = load_text_encoders(config)
            image_encoder, _ = load_image_encoder(config)
            widths = (image_encoder.config.hidden_size, text_encoders.text_encoder.config.hidden_size)
        else:
            text_encoders = image_encoder = None
            widths = encoder_widths(config)

        self.model = build_training_model(config, unet, *widths)
        # Frozen parts in the weight dtype; the trainable ones stay float32 (mixed precision by autocast).
        # (nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast of a model it loaded.)
        torch.nn.Module.to(unet, self.device, self.weight_dtype)
        for param in self.model.trainable_parameters():
            param.data = param.data.float()
        torch.nn.Module.to(self.model.projection, self.device)
        upcast_vae = self.weight_dtype == torch.float16 and not config.vae and vae.config.force_upcast
        torch.nn.Module.to(vae, self.device, torch.float32 if upcast_vae else self.weight_dtype)
        self.vae = vae
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

        if cache is None:
            text_encoders.to(self.device, self.weight_dtype)
            image_encoder.to(self.device, self.weight_dtype)
            pixels_shape = (3, *reference_pixels_size(image_processor))
            self.features = EncoderFeatures(text_encoders, image_encoder, self.device, self.weight_dtype, pixels_shape)
        else:
            self.features = CachedFeatures(cache.nulls().to(self.device, self.weight_dtype))

        self.params = self.model.trainable_parameters()
        self.optimizer = _optimizer(config, self.params)
        self.ema = None
        if config.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=config.ema_decay)
            accelerator.register_for_checkpointing(self.ema)

        self.prepared_model, self.optimizer, self.dataloader = accelerator.prepare(
            self.model, self.optimizer, dataloader
        )
        if len(self.dataloader) == 0:
            raise ConfigError(
                [
                    f"train_batch_size: {len(self.batches)} full batch(es) an epoch cannot be shared by "
                    f"{accelerator.num_processes} processes; lower it or add samples"
                ]
            )
        self.steps_per_epoch = math.ceil(len(self.dataloader) / config.gradient_accumulation_steps)
        self.max_train_steps = config.max_train_steps or config.num_train_epochs * self.steps_per_epoch
        from diffusers.optimization import get_scheduler

        # accelerate steps a prepared scheduler once per process per optimiser step
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            self.optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.max_train_steps * accelerator.num_processes,
        )
        self.lr_scheduler = accelerator.prepare(lr_scheduler)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

        self.validator = None
        if config.validation_steps and accelerator.is_main_process:
            from .validation import Validator, validation_entries

            entries = validation_entries(config, self.dataset)
            components = {
                "vae": vae,
                "unet": unet,
                "text_encoders": text_encoders,
                "image_encoder": image_encoder,
                "image_processor": image_processor,
            }
            self.validator = Validator(
                config, entries, components, self.noise_scheduler.config, self.device, self.weight_dtype
            )

    def _check_images(self) -> None:
        """Decode every image of the manifest now, so a broken file stops the run before its first step."""
        import os

        from tqdm.auto import tqdm

        from ..data.manifest import ManifestError, validate_manifest

        logger.info(
            "decoding every image of the manifest (bad_samples: stop; skip instead to replace bad samples as they come)"
        )
        bar = tqdm(desc="checking images", unit="sample", disable=not self.accelerator.is_local_main_process)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        workers = max(1, self.config.dataloader_workers, min(8, os.cpu_count() or 1))
        _, problems, total = validate_manifest(
            self.config.manifest, open_images=True, decode=True, workers=workers, progress=progress
        )
        bar.close()
        if problems:
            raise ManifestError(self.config.manifest, problems, total)

    def _cache_settings(self) -> dict[str, Any]:
        """What the cached features depend on, as the training config has it."""
        c = self.config
        return {
            "base": c.base,
            "image_encoder": c.image_encoder,
            "reference_size": c.reference_size or c.resolution,
            "mask_references": c.mask_references,
            "mask_color": list(MASK_COLORS[c.mask_color]) if c.mask_references else None,
        }

    # ---- one step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        posterior = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        latents = posterior.sample(generator=self.generator).float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def loss_on(self, batch: dict) -> torch.Tensor:
        """Forward the batch and return the training loss (the caller runs backward inside `activate`)."""
        config = self.config
        batch_size = batch["pixel_values"].shape[0]
        drops = draw_drops(config, batch_size, self.generator)
        latents = self._latents(batch["pixel_values"])
        with torch.no_grad():
            cond = condition(batch, drops, self.features, self.device, self.weight_dtype)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        if config.noise_offset:
            noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=self.generator).to(
                self.device
            )
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = draw_timesteps(batch_size, num_timesteps, config.high_noise_share, self.generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        boxes = batch["subject_boxes"].to(self.device)
        prediction = self.prepared_model(
            noisy,
            timesteps,
            cond.prompt_embeds,
            cond.pooled_prompt_embeds,
            time_ids.to(self.device, self.weight_dtype),
            cond.image_features,
            cond.phrase_embeds,
            boxes,
            drops.grounding.to(self.device),
        )
        return self._loss(prediction, target, timesteps, boxes)

    def _loss(
        self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, boxes: torch.Tensor
    ) -> torch.Tensor:
        config = self.config
        cover = box_cover(boxes, *prediction.shape[-2:]) if config.subject_loss_weight else None
        sample_weights = None
        if config.snr_gamma is not None:
            sample_weights = min_snr_weights(self.noise_scheduler, timesteps, config.snr_gamma, self.prediction_type)
        return diffusion_loss(prediction, target, cover, config.subject_loss_weight, sample_weights)

    def training_step(self, batch: dict) -> torch.Tensor:
        """One micro-batch: loss, backward, and (on accumulation boundaries) clip + optimiser step."""
        accelerator = self.accelerator
        latent_size = tuple(side // self.vae_scale_factor for side in batch["pixel_values"].shape[-2:])
        with accelerator.accumulate(self.prepared_model):
            layout = self.model.subject_layout(batch["subject_boxes"], latent_size, self.config.ms_scale)
            # Backward inside the layout too: activation checkpointing recomputes the attention there.
            with self.model.attention_state.activate(layout):
                loss = self.loss_on(batch)
                accelerator.backward(loss)
            if accelerator.sync_gradients and self.config.max_grad_norm is not None:
                accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        config, accelerator = self.config, self.accelerator
        global_step = self._resume() if config.resume_from_checkpoint else 0
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.output_dir / "config.yaml") as tmp:
                config.save(tmp)
            accelerator.init_trackers(config.tracker_project_name, config=_tracker_config(config))
        self._log_plan(global_step)

        progress = tqdm(
            total=self.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
        )
        with logging_redirect_tqdm():  # log lines are printed above the bar instead of through it
            summary = self._train_loop(global_step, progress)
        return summary

    def _train_loop(self, global_step: int, progress) -> dict[str, Any]:
        from accelerate import skip_first_batches

        config, accelerator = self.config, self.accelerator
        window = _Window(time.perf_counter())
        run_start, start_step = time.perf_counter(), global_step
        samples_per_step = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        last_loss = None
        stopped_at: Path | None = None  # the checkpoint a SIGTERM stop saved
        with _StopRequest() as stop:
            while global_step < self.max_train_steps and stopped_at is None:
                epoch, done = divmod(global_step, self.steps_per_epoch)
                loader = self.dataloader
                if done:  # resume mid-epoch: the batches of the steps already taken are skipped, not re-read
                    loader = skip_first_batches(self.dataloader, done * config.gradient_accumulation_steps)
                loader.set_epoch(epoch)
                self.batches.set_epoch(epoch)
                fetch_start = time.perf_counter()
                for batch in loader:
                    window.data_time += time.perf_counter() - fetch_start
                    for message in batch.pop("bad_samples", ()):
                        self.bad_samples += 1
                        logger.warning("skipped an unreadable sample (bad_samples: skip): %s", message)
                    loss = self.training_step(batch)
                    window.add_loss(loss)
                    if accelerator.sync_gradients:
                        global_step += 1
                        window.steps += 1
                        progress.update(1)
                        if self.ema is not None:
                            self.ema.step(self.params)
                        if global_step % config.log_every == 0 or global_step == self.max_train_steps:
                            last_loss = self._log(window, global_step, samples_per_step, progress)
                            window = _Window(time.perf_counter())
                        pause = time.perf_counter()  # checkpoints and validation do not count in samples/s
                        stopping = global_step < self.max_train_steps and self._stop_agreed(stop)
                        saved = None
                        if stopping or (config.checkpointing_steps and global_step % config.checkpointing_steps == 0):
                            saved = self.save_checkpoint(global_step)
                        if not stopping and config.validation_steps and global_step % config.validation_steps == 0:
                            self.validate(global_step)
                        if saved is not None and not stopping and global_step < self.max_train_steps:
                            stopping = self._stop_agreed(stop)  # SIGTERM during this save: it is the one to resume from
                        window.start += time.perf_counter() - pause
                        if stopping:
                            stopped_at = saved
                            break
                        if global_step >= self.max_train_steps:
                            break
                    fetch_start = time.perf_counter()
            progress.close()
            if stopped_at is not None:
                return self._stopped(global_step, stopped_at, stop.signal_name)

            if config.checkpointing_steps and global_step % config.checkpointing_steps:
                self.save_checkpoint(global_step)  # so a longer run can resume from the end
            if config.validation_steps and global_step % config.validation_steps:
                self.validate(global_step)
            elapsed = time.perf_counter() - run_start
            summary = self._finish(
                global_step, last_loss, (global_step - start_step) * samples_per_step / max(elapsed, 1e-9)
            )
        accelerator.end_training()
        return summary

    def release(self) -> None:
        """Free the models, and with them the process group, while the interpreter is fully alive.

        `end_training` unregisters the process group, but DDP's reducer keeps it alive; freed by the
        garbage collector during interpreter shutdown, gloo's threads could abort the process
        ("terminate called without an active exception") after a run that had succeeded.
        Only after a finished run: on an error another process may still be inside a collective.
        """
        import gc

        self.accelerator.free_memory()
        self.__dict__.clear()
        gc.collect()

    def _stop_agreed(self, stop: "_StopRequest") -> bool:
        """Whether any process was asked to stop; all processes must stop (and save) at the same step."""
        requested = stop.signal_name is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(requested)], device=self.device)
            requested = bool(self.accelerator.gather(flag).max().item())
        return requested

    def _stopped(self, step: int, checkpoint: Path, signal_name: str | None) -> dict[str, Any]:
        """End a run stopped by a signal: no export or summary (the run is not finished), trackers closed."""
        signal_name = signal_name or "a signal to another process"
        if self.accelerator.is_main_process:
            logger.warning(
                "stopped by %s at step %d of %d; %s holds everything to resume: run the same command with "
                "--resume-from-checkpoint latest",
                signal_name,
                step,
                self.max_train_steps,
                checkpoint,
            )
        self.accelerator.end_training()
        return {
            "steps": step,
            "stopped_by": signal_name,
            "checkpoint": str(checkpoint),
            "max_train_steps": self.max_train_steps,
        }

    def _log_plan(self, global_step: int) -> None:
        c, a = self.config, self.accelerator
        trainable = sum(p.numel() for p in self.params)
        frozen = sum(p.numel() for p in self.model.unet.parameters() if not p.requires_grad)
        logger.info(
            "training plan: %d samples; %d batches per epoch on each process; %d steps per epoch; %d steps in all%s; "
            "%d samples per step (batch %d x %d process(es) x %d accumulation); %.1fM trainable parameters, frozen "
            "UNet %.1fM; mixed precision: %s; text and image features: %s",
            len(self.dataset),
            len(self.dataloader),
            self.steps_per_epoch,
            self.max_train_steps,
            f" (resuming at step {global_step})" if global_step else "",
            c.train_batch_size * a.num_processes * c.gradient_accumulation_steps,
            c.train_batch_size,
            a.num_processes,
            c.gradient_accumulation_steps,
            trainable / 1e6,
            frozen / 1e6,
            c.mixed_precision,
            "read from the cache" if c.cache else "encoded at each step",
        )

    def _log(self, window: "_Window", step: int, samples_per_step: int, progress) -> float:
        accelerator = self.accelerator
        loss = accelerator.reduce(window.mean_loss().to(self.device), "mean").item()
        elapsed = time.perf_counter() - window.start
        logs = {
            "loss": loss,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "samples_per_s": window.steps * samples_per_step / max(elapsed, 1e-9),
            "data_wait_fraction": window.data_time / max(elapsed, 1e-9),
            **peak_memory_gb(self.device),
        }
        accelerator.log(logs, step=step)
        # three significant digits: 0.04 samples/s on a CPU, hundreds on GPUs
        progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{logs['samples_per_s']:.3g}")
        memory = ", ".join(f"{k} {v:.2f}" for k, v in logs.items() if k.startswith("peak"))
        logger.info(
            "step %d: loss %.4f, lr %.3g, %.2f samples/s, data wait %.0f%%, %s",
            step,
            loss,
            logs["lr"],
            logs["samples_per_s"],
            100 * logs["data_wait_fraction"],
            memory,
        )
        return loss

    # ---- checkpoints, export, validation ------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """Write `checkpoint-{step}`: under a temporary name until every process has written its part.

        The main process then records the files in the state file (written last), renames the folder,
        and only then removes checkpoints beyond `checkpoints_total_limit`: at every moment of a crash
        the newest complete checkpoint is still there (`checkpoints.py`).
        """
        accelerator = self.accelerator
        final, partial = checkpoint_path(self.output_dir, step), partial_path(self.output_dir, step)
        if accelerator.is_main_process:
            if partial.exists():  # left by an interrupted save of the same step
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))  # every process: each saves its own random states
        # Files are flushed to a shared file system when closed, before this barrier; the main process
        # then fsyncs them all (on one machine the page cache is shared) before marking them complete.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_state(partial, {"step": step, "num_processes": accelerator.num_processes})
            remove_stale_temporaries(final)  # an earlier checkpoint-N moved aside when a crash came
            replace_path(partial, final)  # replaces a later checkpoint-N of a run resumed from an earlier one
            self._remove_old_checkpoints(final)
        accelerator.wait_for_everyone()
        logger.info("saved %s", final)
        return final

    def _remove_old_checkpoints(self, newest: Path) -> None:
        """After `newest` is complete: remove interrupted saves, and checkpoints beyond the limit."""
        for leftover in partial_checkpoints(self.output_dir):  # never resumable; can be large
            logger.info("removing %s (an interrupted save)", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        limit = self.config.checkpoints_total_limit
        if limit is not None:
            others = [p for p in list_checkpoints(self.output_dir) if p != newest]
            for old in others[: max(0, len(others) - limit + 1)]:
                logger.info("removing %s (checkpoints_total_limit=%d)", old, limit)
                shutil.rmtree(old)

    def _save_hook(self, models, weights, output_dir) -> None:
        output_dir = Path(output_dir)
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(models[0])
            self.export(output_dir)
            if self.ema is not None:
                _checkpoint(model).save(output_dir / TRAINABLE_DIR)
        # (the state file, which says the checkpoint is complete, is written by save_checkpoint, last)
        torch.save(self.generator.get_state(), output_dir / f"generator_{self.accelerator.process_index}.pt")
        weights.clear()  # the frozen UNet is not checkpointed: only the adapter (above) is

    def _load_hook(self, models, input_dir) -> None:
        from ..adapter import load_checkpoint
        from .models import load_adapter_weights

        input_dir = Path(input_dir)
        model = self.accelerator.unwrap_model(models.pop())
        source = input_dir / TRAINABLE_DIR if (input_dir / TRAINABLE_DIR).is_dir() else input_dir / ADAPTER_DIR
        load_adapter_weights(model, load_checkpoint(source))
        state = json.loads((input_dir / STATE_FILE).read_text())
        generator_file = input_dir / f"generator_{self.accelerator.process_index}.pt"
        if state["num_processes"] != self.accelerator.num_processes or not generator_file.is_file():
            logger.warning(
                "%s was written by %d process(es), this run has %d: training continues, but its random draws "
                "differ from an uninterrupted run's",
                input_dir,
                state["num_processes"],
                self.accelerator.num_processes,
            )
            self.generator.manual_seed(_process_seed(self.config.seed, self.accelerator.process_index) + state["step"])
        else:
            self.generator.set_state(torch.load(generator_file, weights_only=True))  # never runs pickled code

    def _resume(self) -> int:
        value = self.config.resume_from_checkpoint
        main = self.accelerator.is_main_process
        if value == "latest":
            complete, incomplete = find_checkpoints(self.output_dir)
            newest = checkpoint_step(complete[-1]) if complete else -1
            for skipped, why in incomplete:
                if main and checkpoint_step(skipped) > newest:
                    logger.warning("skipping %s: %s", skipped, why)
            if not complete:
                if main:
                    logger.info("no complete checkpoint in %s: starting a new run", self.output_dir)
                return 0
            path = complete[-1]
        else:
            path = check_checkpoint(value)  # a clear error for a missing or incomplete one
        self.accelerator.load_state(str(path))
        step = json.loads((path / STATE_FILE).read_text())["step"]
        logger.info("resumed from %s at step %d", path, step)
        return step

    def export(self, directory: Path) -> dict[str, Path]:
        """Write the adapter (EMA weights when on) in the project format and as the released `ms_adapter.bin`.

        Each is written under a temporary name and renamed when complete, so a crash never leaves a
        half-written adapter where a finished one is expected.
        """
        model = self.accelerator.unwrap_model(self.prepared_model)
        with self._ema_weights():
            checkpoint = _checkpoint(model)
        written = {}
        for key, name in (("adapter", ADAPTER_DIR), ("released_adapter", RELEASED_FILE)):
            with atomic_path(directory / name) as tmp:
                checkpoint.save(tmp)
            written[key] = directory / name
        return written

    def validate(self, step: int) -> None:
        if self.validator is not None and self.validator.entries:
            from .validation import log_images

            with self._ema_weights():
                images = self.validator.run(step, self.model.projection)
            log_images(self.accelerator, images, step)
            logger.info("validation images: %s", self.validator.out_dir / f"step-{step:06d}")
        self.accelerator.wait_for_everyone()

    def _ema_weights(self):
        import contextlib

        ema = self.ema
        if ema is None:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def swapped():
            ema.store(self.params)
            ema.copy_to(self.params)
            try:
                yield
            finally:
                ema.restore(self.params)

        return swapped()

    def _finish(self, step: int, loss: float | None, samples_per_s: float) -> dict[str, Any]:
        accelerator = self.accelerator
        fingerprints = accelerator.gather(weights_fingerprint(self.params)[None].to(self.device)).cpu()
        summary: dict[str, Any] = {
            "steps": step,
            "final_loss": loss,
            "samples_per_s": samples_per_s,
            **peak_memory_gb(self.device),
            "num_processes": accelerator.num_processes,
            "replica_fingerprints": fingerprints.tolist(),
            "replicas_in_sync": bool((fingerprints == fingerprints[0]).all()),
            "skipped_bad_samples": self.bad_samples,  # this process's
        }
        if not summary["replicas_in_sync"]:
            logger.warning("the processes' adapter weights differ: %s", fingerprints.tolist())
        if accelerator.is_main_process:
            summary.update({k: str(v) for k, v in self.export(self.output_dir).items()})
            write_text_atomic(self.output_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
            logger.info("adapter written: %s and %s", summary["adapter"], summary["released_adapter"])
        accelerator.wait_for_everyone()
        return summary


# ---- helpers --------------------------------------------------------------------------------------


class _Window:
    """Loss, steps and data-loading time since the last log line."""

    def __init__(self, start: float):
        self.start, self.data_time, self.steps = start, 0.0, 0
        self._loss_sum, self._count = torch.zeros(()), 0

    def add_loss(self, loss: torch.Tensor) -> None:
        self._loss_sum = self._loss_sum + loss.float()  # stays on the device: no sync per step
        self._count += 1

    def mean_loss(self) -> torch.Tensor:
        return self._loss_sum / max(self._count, 1)


# A SIGTERM this soon after the first is the same request delivered twice: Slurm signals every process of a
# job step, and `accelerate launch`, also signalled, forwards it to its processes.
SIGTERM_REPEAT_WINDOW_S = 3.0


class _StopRequest:
    """While active: SIGTERM (what schedulers send before preempting) asks the run to save a checkpoint at
    the end of the current step and stop; a second SIGTERM (more than `SIGTERM_REPEAT_WINDOW_S` later) stops
    at once. SIGINT (Ctrl-C) keeps Python's behaviour, an immediate KeyboardInterrupt. Signal handlers can
    only be set in the main thread; elsewhere SIGTERM keeps its default (the process ends at once)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._received_at = 0.0
        self._previous = None

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal_name is not None:
            if now - self._received_at < SIGTERM_REPEAT_WINDOW_S:
                return
            logger.warning("second SIGTERM: stopping at once, without saving")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.signal_name, self._received_at = "SIGTERM", now
        logger.warning(
            "SIGTERM received: saving a checkpoint at the end of this step, then stopping "
            "(another SIGTERM, or Ctrl-C, stops at once without saving)"
        )


def _process_seed(seed: int, process_index: int) -> int:
    return seed * 1_000_003 + process_index


def _checkpoint(model):
    from ..adapter import checkpoint_from_models

    return checkpoint_from_models(model.unet, model.projection)


def weights_fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """Three float64 numbers that differ when any weight differs (sum, sum of squares, position-weighted sum)."""
    flat = torch.cat([p.detach().double().flatten().cpu() for p in params])
    position = torch.arange(flat.numel(), dtype=torch.float64).remainder_(9973) + 1
    return torch.stack([flat.sum(), (flat * flat).sum(), (flat * position).sum()])


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory allocated by torch, and the process's peak resident host memory."""
    memory = {"peak_host_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if device.type == "cuda":
        memory["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return memory


def check_distributed_type(distributed_type) -> None:
    """DDP (one or many GPUs, one or many machines) is supported; sharded training is refused, clearly."""
    name = str(getattr(distributed_type, "value", distributed_type))
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            [
                f"distributed training: {name} is not supported: it shards the parameters, and this loop's checkpoints and "
                "adapter export read them whole. Launch with DDP (accelerate launch --multi_gpu ...); to save memory use "
                "mixed_precision bf16, gradient_checkpointing, optimizer adamw_8bit and a feature cache (docs/training.md)"
            ]
        )


def _optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
        eps=config.adam_epsilon,
    )
    if config.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError(
                ["optimizer: adamw_8bit needs bitsandbytes (pip install bitsandbytes; CUDA only)"]
            ) from None
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _check_tracker(report_to: str) -> None:
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError([f"report_to: {report_to} is not installed (pip install {package}), or use report_to: none"])


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """The config flattened to the scalar values trackers accept."""
    flat = {}
    for key, value in config.to_dict().items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat
