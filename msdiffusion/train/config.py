"""Training configuration: one dataclass, loaded from YAML/JSON, overridden by command-line flags.

Every field has a flag (`learning_rate` -> `--learning-rate`); the nested ones (`resampler`,
`validation`) take YAML text, e.g. `--resampler "{depth: 2}"`. `TrainConfig.validate()` reports every problem at once, each naming its
field, what was given and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import did_you_mean
from ..loading import NAMED_MODELS, TINY, WORLD, part_location


class ConfigError(ValueError):
    """A training configuration with problems; the message lists each one by field."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        super().__init__(
            f"{len(problems)} problem(s) in the training config{where}:\n" + "\n".join(f"  {p}" for p in problems)
        )


def option(default: Any, help: str, group: str, choices: tuple | None = None):
    """A config field with its help text (shown by `--help` and listed in docs/training.md)."""
    metadata = {"help": help, "group": group, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw_8bit")
PREDICTION_TYPES = ("epsilon", "v_prediction")
REPORT_TO = ("tensorboard", "wandb", "none")
CROP_MODES = ("random", "center")
MASK_COLOR_NAMES = ("black", "white")  # msdiffusion.data.dataset.MASK_COLORS
BAD_SAMPLES = ("stop", "skip")
# Architecture fields of the resampler that follow from the models, not from the user.
INFERRED_RESAMPLER_FIELDS = ("embedding_dim", "output_dim", "phrase_dim")


@dataclass
class TrainConfig:
    # --- models -----------------------------------------------------------------------------------
    base: str | None = option(
        None, f"SDXL-architecture base model: a diffusers folder, hub id or {WORLD} (required)", "models"
    )
    image_encoder: str | None = option(
        None,
        f"CLIP vision encoder: folder, hub id or {WORLD}, e.g. laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (required)",
        "models",
    )
    vae: str | None = option(
        None, "another VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix for fp16", "models"
    )
    variant: str | None = option(None, "weight variant of the base's files, e.g. fp16", "models")
    revision: str | None = option(None, "hub revision of the base", "models")
    init_adapter: str | None = option(
        None,
        f"start from this adapter (ms_adapter.bin, project folder, hub id or {WORLD}) instead of a new one",
        "models",
    )
    resampler: dict = option(
        {},
        "resampler architecture overrides (dim, depth, heads, dim_head, num_queries, ff_mult, num_freqs, "
        "grounding_hidden_dim); released sizes by default",
        "models",
    )
    num_dummy_tokens: int = option(4, "dummy image tokens (4 in the release)", "models")

    # --- data -------------------------------------------------------------------------------------
    manifest: str | None = option(None, "training manifest (.jsonl, docs/data.md) (required)", "data")
    cache: str | None = option(
        None, "feature cache written by `msdiff data cache`: text and image encoders are then not loaded", "data"
    )
    resolution: int = option(1024, "training size in pixels (square), or the bucket size with --buckets", "data")
    buckets: bool = option(False, "aspect-ratio buckets of about resolution^2 pixels instead of square crops", "data")
    max_subjects: int = option(4, "subject slots per sample (padded; the release used 4)", "data")
    crop: str = option("random", "crop of the target after resizing", "data", CROP_MODES)
    min_visible_fraction: float = option(0.3, "drop a subject keeping less of its box inside the crop", "data")
    mask_references: bool = option(True, "blank reference backgrounds where the manifest gives a mask", "data")
    mask_color: str = option(
        "black",
        "colour of blanked reference backgrounds: black (the release multiplies by the mask) or white",
        "data",
        MASK_COLOR_NAMES,
    )
    reference_size: int | None = option(
        None, "square the references are squashed to before CLIP (default: the training size's larger side)", "data"
    )
    bad_samples: str = option(
        "stop",
        "a sample whose image cannot be read: stop (every image is decoded before the first step, and the run "
        "stops naming the manifest line) or skip (replaced by the next sample, counted and logged; no check up front)",
        "data",
        BAD_SAMPLES,
    )
    dataloader_workers: int = option(4, "DataLoader worker processes", "data")
    pin_memory: bool = option(True, "pinned host memory for batches (faster copies to the GPU)", "data")
    persistent_workers: bool = option(True, "keep DataLoader workers alive between epochs", "data")

    # --- recipe -----------------------------------------------------------------------------------
    drop_image: float = option(0.05, "probability that a sample's references are replaced by all-zero pixels", "recipe")
    drop_text: float = option(0.05, "probability that a sample's caption is emptied", "recipe")
    drop_both: float = option(0.05, "probability of both drops at once", "recipe")
    drop_grounding: float = option(
        0.1, "probability that a sample's grounding tokens are the learned latents", "recipe"
    )
    ms_scale: float = option(1.0, "image-branch scale during training (1.0 in the release)", "recipe")
    noise_offset: float = option(0.0, "offset noise strength (0 = off; ~0.05 helps very dark/bright images)", "recipe")
    snr_gamma: float | None = option(None, "min-SNR loss weighting gamma (e.g. 5.0); off by default", "recipe")
    subject_loss_weight: float = option(
        0.0, "weight the loss on latent cells inside subjects' boxes by 1 + this (0: the plain mean)", "recipe"
    )
    high_noise_share: float = option(
        0.0,
        "share of timesteps drawn from the noisier half of the schedule only (0: uniform, as diffusers' scripts)",
        "recipe",
    )
    prediction_type: str | None = option(
        None, "epsilon or v_prediction (default: the base's scheduler)", "recipe", PREDICTION_TYPES
    )

    # --- optimisation -----------------------------------------------------------------------------
    learning_rate: float = option(1e-4, "AdamW learning rate", "optimisation")
    weight_decay: float = option(0.01, "AdamW weight decay", "optimisation")
    adam_beta1: float = option(0.9, "AdamW beta1", "optimisation")
    adam_beta2: float = option(0.999, "AdamW beta2", "optimisation")
    adam_epsilon: float = option(1e-8, "AdamW epsilon", "optimisation")
    optimizer: str = option("adamw", "adamw, or adamw_8bit (needs bitsandbytes)", "optimisation", OPTIMIZERS)
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (none = off)", "optimisation")
    lr_scheduler: str = option(
        "constant",
        "learning-rate schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial",
        "optimisation",
    )
    lr_warmup_steps: int = option(0, "warm-up steps of the schedule", "optimisation")
    train_batch_size: int = option(8, "samples per process and micro-batch", "optimisation")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimiser step", "optimisation")
    max_train_steps: int | None = option(
        None, "optimiser steps to train (default: num_train_epochs epochs)", "optimisation"
    )
    num_train_epochs: int = option(1, "epochs, when max_train_steps is not set", "optimisation")
    seed: int = option(0, "seed of the adapter's initialisation, the data order and the training draws", "optimisation")

    # --- performance ------------------------------------------------------------------------------
    mixed_precision: str = option(
        "no", "no, fp16 or bf16: frozen models in that dtype, trainable weights in fp32", "performance", MIXED_PRECISION
    )
    gradient_checkpointing: bool = option(
        False, "recompute UNet activations in the backward pass (less memory)", "performance"
    )
    allow_tf32: bool = option(True, "TF32 matmuls on Ampere and newer GPUs", "performance")
    ema: bool = option(
        False, "keep an exponential moving average of the trainable weights (exported instead)", "performance"
    )
    ema_decay: float = option(0.9999, "EMA decay", "performance")

    # --- output -----------------------------------------------------------------------------------
    output_dir: str = option(
        "runs/ms-adapter", "where checkpoints, logs, validation images and the adapter go", "output"
    )
    checkpointing_steps: int = option(
        500, "save a resumable checkpoint (and the adapter) every N steps; 0 = only at the end", "output"
    )
    checkpoints_total_limit: int | None = option(None, "keep at most this many checkpoints (oldest removed)", "output")
    resume_from_checkpoint: str | None = option(
        None, "a checkpoint folder, or 'latest' (in output_dir) to resume", "output"
    )
    log_every: int = option(10, "steps between progress lines (loss, lr, samples/s, memory)", "output")
    report_to: str = option("tensorboard", "tracker for the logs", "output", REPORT_TO)
    tracker_project_name: str = option("msdiffusion", "project name for the tracker", "output")

    # --- validation -------------------------------------------------------------------------------
    validation_steps: int = option(500, "generate validation images every N steps (0 = off)", "validation")
    validation_samples: int = option(2, "without `validation` entries: this many samples of the manifest", "validation")
    validation: list = option(
        [], "validation entries: [{prompt, subjects: [{image, phrase, box}], negative_prompt?}]", "validation"
    )
    validation_settings: dict = option(
        {},
        "generation settings of validation images in job-file names, e.g. {steps: 30, guidance: 7.5, scale: 0.6, "
        "negative_prompt: ...} (default: a job file's defaults; the size is `resolution`)",
        "validation",
    )
    validation_seed: int = option(0, "seed of validation images", "validation")

    # ---------------------------------------------------------------------------------------------
    @property
    def weight_dtype_name(self) -> str:
        return {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}[self.mixed_precision]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> "TrainConfig":
        """Raise `ConfigError` listing every problem; return self when there is none."""
        problems = [
            p for f in dataclasses.fields(self) for p in _check_type(f.name, getattr(self, f.name), _hints()[f.name])
        ]
        if problems:  # value checks below assume the types are right
            raise ConfigError(problems)
        problems = _check_values(self)
        if problems:
            raise ConfigError(problems)
        return self


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(hint) -> tuple[type, bool]:
    """(type, optional) of a field's annotation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], type(None) in typing.get_args(hint)
    return (typing.get_origin(hint) or hint), False


def _type_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
    }[kind]


def _check_type(name: str, value: Any, hint) -> list[str]:
    kind, optional = _base_type(hint)
    if value is None:
        return [] if optional else [f"{name}: must be set ({_type_name(kind)})"]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        list: isinstance(value, list),
    }[kind]
    if not ok:
        return [f"{name}: expected {_type_name(kind)}{' or null' if optional else ''}, got {value!r}"]
    if kind is float and not math.isfinite(value):
        return [f"{name}: must be a finite number, got {value!r}"]
    return []


def _check_values(c: TrainConfig) -> list[str]:
    problems: list[str] = []

    def need(condition: bool, name: str, rule: str) -> None:
        if not condition:
            problems.append(f"{name}: {rule}, got {getattr(c, name)!r}")

    for name in ("base", "image_encoder", "manifest"):
        if not getattr(c, name):
            problems.append(f"{name}: required (give it in the config file or as --{name.replace('_', '-')})")
    for f in dataclasses.fields(c):
        choices = f.metadata.get("choices")
        value = getattr(c, f.name)
        if choices and value is not None and value not in choices:
            problems.append(
                f"{f.name}: must be one of {', '.join(choices)}, got {value!r}{did_you_mean(value, choices)}"
            )

    need(
        c.resolution > 0 and c.resolution % 8 == 0, "resolution", "must be a positive multiple of 8 (the VAE's factor)"
    )
    if c.buckets:
        need(c.resolution % 64 == 0, "resolution", "must be a multiple of 64 with buckets")
    need(c.max_subjects >= 1, "max_subjects", "must be at least 1")
    need(0 <= c.min_visible_fraction <= 1, "min_visible_fraction", "must be in [0, 1]")
    need(c.reference_size is None or c.reference_size >= 1, "reference_size", "must be a positive number of pixels")
    need(c.dataloader_workers >= 0, "dataloader_workers", "must be 0 or more")
    need(c.num_dummy_tokens >= 1, "num_dummy_tokens", "must be at least 1")
    for name in ("drop_image", "drop_text", "drop_both", "drop_grounding"):
        need(0 <= getattr(c, name) <= 1, name, "must be a probability in [0, 1]")
    if c.drop_image + c.drop_text + c.drop_both > 1:
        problems.append(
            f"drop_image + drop_text + drop_both: must be at most 1 (they are exclusive outcomes of one draw), "
            f"got {c.drop_image + c.drop_text + c.drop_both:g}"
        )
    need(c.noise_offset >= 0, "noise_offset", "must be 0 or more")
    need(c.snr_gamma is None or c.snr_gamma > 0, "snr_gamma", "must be positive (or null for off)")
    need(c.subject_loss_weight >= 0, "subject_loss_weight", "must be 0 (off) or more")
    need(0 <= c.high_noise_share <= 1, "high_noise_share", "must be a probability in [0, 1]")
    need(c.learning_rate > 0, "learning_rate", "must be positive")
    need(c.weight_decay >= 0, "weight_decay", "must be 0 or more")
    for name in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(c, name) < 1, name, "must be in [0, 1)")
    need(c.adam_epsilon > 0, "adam_epsilon", "must be positive")
    need(c.max_grad_norm is None or c.max_grad_norm > 0, "max_grad_norm", "must be positive (or null for no clipping)")
    schedules = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
    if c.lr_scheduler not in schedules:
        problems.append(f"lr_scheduler: must be one of {', '.join(schedules)}, got {c.lr_scheduler!r}")
    need(c.lr_warmup_steps >= 0, "lr_warmup_steps", "must be 0 or more")
    need(c.train_batch_size >= 1, "train_batch_size", "must be at least 1")
    need(c.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be at least 1")
    need(
        c.max_train_steps is None or c.max_train_steps >= 1,
        "max_train_steps",
        "must be at least 1 (or null: use num_train_epochs)",
    )
    need(c.num_train_epochs >= 1, "num_train_epochs", "must be at least 1")
    need(0 < c.ema_decay < 1, "ema_decay", "must be in (0, 1)")
    need(bool(c.output_dir), "output_dir", "must be a folder path")
    need(c.checkpointing_steps >= 0, "checkpointing_steps", "must be 0 (only at the end) or more")
    need(
        c.checkpoints_total_limit is None or c.checkpoints_total_limit >= 1,
        "checkpoints_total_limit",
        "must be at least 1 (or null: keep all)",
    )
    need(c.log_every >= 1, "log_every", "must be at least 1")
    need(c.validation_steps >= 0, "validation_steps", "must be 0 (off) or more")
    need(c.validation_samples >= 0, "validation_samples", "must be 0 or more")
    problems.extend(_check_validation_settings(c.validation_settings))

    if c.resampler and c.init_adapter:
        problems.append("resampler: cannot be set with init_adapter (the adapter's checkpoint fixes the architecture)")
    from ..resampler import ResamplerConfig

    allowed = [f.name for f in dataclasses.fields(ResamplerConfig) if f.name not in INFERRED_RESAMPLER_FIELDS]
    for key, value in c.resampler.items():
        if key in INFERRED_RESAMPLER_FIELDS:
            problems.append(
                f"resampler.{key}: follows from the models (image encoder, UNet, text encoder); do not set it"
            )
        elif key not in allowed:
            problems.append(
                f"resampler.{key}: unknown field{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}"
            )
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"resampler.{key}: expected a positive integer, got {value!r}")
    if c.cache and c.buckets and c.reference_size is None:
        problems.append(
            "reference_size: required with both cache and buckets (cached references have one size; "
            "set it to the --reference-size given to `msdiff data cache`)"
        )
    for k, entry in enumerate(c.validation):
        problems.extend(_check_validation_entry(entry, f"validation[{k}]"))
    return problems


def _check_validation_settings(values: Any) -> list[str]:
    from ..settings import GENERATION_FIELDS, SettingsError, check_generation_values, check_types

    if not isinstance(values, dict):
        return [f"validation_settings: expected a mapping of generation settings, got {values!r}"]
    problems = []
    for name in values:
        if name not in GENERATION_FIELDS or name == "size":
            allowed = [n for n in GENERATION_FIELDS if n != "size"]
            problems.append(
                f"validation_settings.{name}: unknown field{did_you_mean(name, allowed)}; allowed: {', '.join(allowed)} "
                "(the size is `resolution`)"
            )
    try:
        check_types(values, GENERATION_FIELDS, "validation_settings")
        check_generation_values(values, "validation_settings")
    except SettingsError as error:
        problems.append(str(error))
    return problems


def _check_validation_entry(entry: Any, where: str) -> list[str]:
    from ..subjects import check_box

    if not isinstance(entry, dict):
        return [f"{where}: expected a mapping with prompt and subjects, got {entry!r}"]
    problems = []
    for key in entry:
        if key not in ("prompt", "negative_prompt", "subjects"):
            problems.append(f"{where}.{key}: unknown key (allowed: prompt, negative_prompt, subjects)")
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        problems.append(f"{where}.prompt: required, a non-empty string")
    subjects = entry.get("subjects")
    if not isinstance(subjects, list) or not subjects:
        return problems + [f"{where}.subjects: required, a non-empty list of {{image, phrase, box}}"]
    for j, subject in enumerate(subjects):
        label = f"{where}.subjects[{j}]"
        if not isinstance(subject, dict):
            problems.append(f"{label}: expected a mapping with image, phrase and box, got {subject!r}")
            continue
        for key in subject:
            if key not in ("image", "phrase", "box"):
                problems.append(f"{label}.{key}: unknown key (allowed: image, phrase, box)")
        if not isinstance(subject.get("image"), str) or not os.path.isfile(subject["image"]):
            problems.append(f"{label}.image: must be an existing image file, got {subject.get('image')!r}")
        if not isinstance(subject.get("phrase"), str) or not subject["phrase"].strip():
            problems.append(f"{label}.phrase: required, the words naming the subject in the prompt")
        try:
            check_box(subject.get("box"), f"{label}.box")
        except (TypeError, ValueError) as error:
            problems.append(str(error))
    return problems


# --- loading ---------------------------------------------------------------------------------------


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML or JSON config file (unknown keys are reported by `config_from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # yaml and json raise different types
        raise ConfigError([f"cannot parse {path}: {error}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of field: value at the top level, got {type(data).__name__}"])
    return data


def config_from_dict(values: dict[str, Any], source: str | None = None) -> TrainConfig:
    """A validated config from a mapping; unknown keys are errors with a did-you-mean hint."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    problems = []
    for key in values:
        if key not in names:
            problems.append(f"{key}: unknown field{did_you_mean(key, names)}; see docs/training.md for the fields")
    values, named_problems = _named_models_to_folders(values)
    problems.extend(named_problems)
    config = TrainConfig(**{k: v for k, v in values.items() if k in names})
    try:
        config.validate()
    except ConfigError as error:
        problems.extend(error.problems)
    if problems:
        raise ConfigError(problems, source)
    return config


# The config fields that name a model, and the part of a named set each stands for.
NAMED_MODEL_FIELDS = {"base": "base", "image_encoder": "image_encoder", "init_adapter": "adapter"}


def _named_models_to_folders(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Named sets as generation takes them: the world's parts become the shipped folders.

    Training reads files, so `tiny-random` (built in memory) is refused with the way to write it.
    """
    values, problems = dict(values), []
    for name, part in NAMED_MODEL_FIELDS.items():
        value = values.get(name)
        if not isinstance(value, str):  # the type check reports it
            continue
        if value == WORLD:
            values[name] = part_location(value, part)
        elif value == TINY:
            problems.append(
                f"{name}: {TINY!r} is built in memory for generation, and training reads files: write the set with "
                f"`msdiff tiny-models FOLDER` and give FOLDER/{part}"
            )
        elif value in NAMED_MODELS:  # a named set added later without a rule here
            problems.append(f"{name}: the named set {value!r} cannot be trained from; give its folder")
    return values, problems


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read `path` (if any), apply `overrides` (field -> value), validate.

    Paths inside the file are relative to the working directory, like the flags'.
    """
    values = read_config_file(path) if path else {}
    values.update(overrides or {})
    return config_from_dict(values, str(path) if path else None)


def config_template() -> str:
    """Every field with its default and help as a commented YAML config (`msdiff train --print-config`)."""
    import yaml

    lines = ["# msdiff train config: every field with its default (docs/training.md). Fill in the required ones."]
    group = None
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines += ["", f"# --- {group} " + "-" * (60 - len(group))]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = (
            yaml.safe_dump({f.name: default}, default_flow_style=True, width=10**6)
            .strip()
            .removeprefix("{")
            .removesuffix("}")
        )
        choices = f.metadata.get("choices")
        lines.append(f"# {f.metadata['help']}" + (f" ({' | '.join(choices)})" if choices else ""))
        lines.append(value)
    return "\n".join(lines) + "\n"


# --- command-line flags ----------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` plus one flag per field; flags override the file."""
    parser.add_argument("--config", type=Path, help="YAML or JSON config file (docs/training.md); flags override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = _hints()
    for f in dataclasses.fields(TrainConfig):
        group_name = f.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        kind, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "YAML" if kind in (dict, list) else f.name.upper()
            group.add_argument(
                flag, dest=f.name, default=None, metavar=metavar, help=help_text, type=_flag_parser(kind, optional)
            )


def _flag_parser(kind: type, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return _NULL
        if kind in (dict, list):
            import yaml

            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise argparse.ArgumentTypeError(f"expected YAML ({_type_name(kind)}), got {text!r}") from None
            if not isinstance(value, kind):
                raise argparse.ArgumentTypeError(f"expected {_type_name(kind)} in YAML, got {text!r}")
            return value
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_type_name(kind)}, got {text!r}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


class _Null:
    """A flag given as `none`/`null`: sets the field to None (plain None means "not given")."""


_NULL = _Null()


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Field -> value for each flag given on the command line."""
    overrides = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is _NULL:
            overrides[f.name] = None
        elif value is not None:
            overrides[f.name] = value
    return overrides


def load_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return load_config(args.config, overrides_from_args(args))
