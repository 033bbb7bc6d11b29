"""`msdiff train` and `msdiff data cache`.

`msdiff train` runs in one process; for several GPUs or machines the same flags go to
`accelerate launch ... -m msdiffusion train` (docs/training.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msdiffusion.app.cli import DTYPE_CHOICES, dtype_name
from msdiffusion.train.config import add_config_arguments

# A run stopped by SIGTERM (after saving a checkpoint) exits with the status a shell gives a process that
# SIGTERM ended, so that scripts and schedulers see that it did not finish.
STOPPED_EXIT_STATUS = 128 + 15


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an MS-Diffusion adapter",
        description="Train the MS-Diffusion adapter (grounding resampler + to_k_ip/to_v_ip) on a frozen SDXL base. "
        "Settings come from --config (YAML/JSON) and flags (which override it); see docs/training.md. "
        "On several GPUs or machines use: accelerate launch [...] -m msdiffusion train --config FILE.",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run_train)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved, validated config as YAML and exit; alone, a commented template of every field",
    )


def run_train(args: argparse.Namespace) -> int:
    from msdiffusion.errors import UserInputError
    from msdiffusion.train.config import ConfigError, config_template, load_config_from_args, overrides_from_args

    if args.print_config and args.config is None and not overrides_from_args(args):
        print(config_template(), end="")
        return 0
    try:
        config = load_config_from_args(args)
    except ConfigError as error:
        raise UserInputError(str(error)) from None
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0

    from msdiffusion.adapter import AdapterMismatchError
    from msdiffusion.checks import check_locations
    from msdiffusion.data.dataset import SampleReadError
    from msdiffusion.data.manifest import ManifestError
    from msdiffusion.train.cache import CacheError
    from msdiffusion.train.loop import TrainingRun

    models = [
        (config.base, "base", "base"),
        (None if config.cache else config.image_encoder, "image_encoder", "image_encoder"),  # a cache replaces it
        (config.vae, "vae", "vae"),
        (config.init_adapter, "adapter", "init_adapter"),
    ]
    check_locations(models)  # before minutes of loading
    user_errors = (ConfigError, ManifestError, CacheError, AdapterMismatchError)
    try:
        run = TrainingRun(config)
    except OSError as error:  # a model or file that cannot be found or read
        raise UserInputError(f"cannot start training: {error}") from None
    except user_errors as error:
        raise UserInputError(str(error)) from None
    try:
        summary = run.train()
    except SampleReadError as error:
        # From a DataLoader worker the message carries the worker's traceback; its last line is the problem.
        problem = str(error).strip().splitlines()[-1].removeprefix("msdiffusion.data.dataset.SampleReadError: ")
        raise UserInputError(
            f"{problem} (training stopped; `bad_samples: skip` replaces unreadable samples instead)"
        ) from None
    except (*user_errors, FileNotFoundError) as error:
        raise UserInputError(str(error)) from None
    if "stopped_by" in summary:
        print(
            f"stopped by {summary['stopped_by']} at step {summary['steps']} of {summary['max_train_steps']}: "
            f"{summary['checkpoint']} holds everything to resume; run the same command with "
            "--resume-from-checkpoint latest to continue",
            file=sys.stderr,
        )
        return STOPPED_EXIT_STATUS
    if "adapter" in summary:  # the main process wrote it
        print(f"adapter: {summary['adapter']} (project format) and {summary['released_adapter']} (released format)")
    return 0


# --- msdiff data cache -----------------------------------------------------------------------------


def add_cache_parser(commands: argparse._SubParsersAction) -> None:
    """Adds `cache` to the `msdiff data` command group."""
    cache = commands.add_parser(
        "cache",
        help="precompute text and image encoder features for training",
        description="Encode every caption, phrase and reference image of a manifest once, so training reads "
        "features instead of running the text encoders and the image encoder (set `cache: OUT` in the training "
        "config). The settings must match the training run's: the same base, image encoder, reference size "
        "and masking. Running it again keeps the shards whose manifest lines did not change.",
    )
    cache.add_argument("manifest", type=Path, help="the manifest (.jsonl)")
    cache.add_argument("--out", type=Path, required=True, help="cache folder")
    cache.add_argument("--base", required=True, help="SDXL base (folder or hub id): its tokenizers and text encoders")
    cache.add_argument("--image-encoder", required=True, help="CLIP vision encoder (folder or hub id)")
    cache.add_argument("--variant", help="weight variant of the base's text encoders, e.g. fp16")
    cache.add_argument("--revision", help="hub revision of the base")
    cache.add_argument(
        "--reference-size",
        type=int,
        default=1024,
        help="square the references are squashed to: the training config's reference_size, or its resolution (default 1024)",
    )
    cache.add_argument("--no-mask-references", action="store_true", help="as mask_references: false in training")
    cache.add_argument(
        "--mask-color",
        choices=("black", "white"),
        default="black",
        help="background of masked references: the training config's mask_color (default black, as in the release)",
    )
    cache.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")
    cache.add_argument(
        "--dtype",
        type=dtype_name,
        choices=("auto", *DTYPE_CHOICES),
        default="auto",
        help="precision of the encoders and the stored features; auto: fp16 on CUDA, fp32 elsewhere",
    )
    cache.add_argument("--batch-size", type=int, default=16, help="samples per encoder batch (default 16)")
    cache.add_argument("--workers", type=int, default=4, help="processes reading the reference images (default 4)")
    cache.add_argument("--shard-size", type=int, default=256, help="samples per cache file (default 256)")
    cache.set_defaults(func=run_cache)


def run_cache(args: argparse.Namespace) -> int:
    from msdiffusion.errors import UserInputError

    for name in ("reference_size", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        raise UserInputError("--workers must be 0 or more")
    if not args.manifest.is_file():
        raise UserInputError(f"manifest not found: {args.manifest}")

    from msdiffusion.checks import check_locations

    check_locations(
        [(args.base, "base", "--base"), (args.image_encoder, "image_encoder", "--image-encoder")], device=args.device
    )

    import torch

    from msdiffusion.data.dataset import MASK_COLORS
    from msdiffusion.data.manifest import ManifestError
    from msdiffusion.loading import default_device
    from msdiffusion.train.cache import write_cache
    from msdiffusion.train.config import TrainConfig
    from msdiffusion.train.models import load_image_encoder, load_text_encoders

    device = args.device or default_device()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    models = TrainConfig(base=args.base, image_encoder=args.image_encoder, variant=args.variant, revision=args.revision)
    try:
        text_encoders = load_text_encoders(models).to(device, dtype)
        image_encoder, image_processor = load_image_encoder(models)
    except OSError as error:
        raise UserInputError(f"cannot load the models: {error}") from None
    image_encoder.to(device, dtype)

    print(f"caching {args.manifest} into {args.out} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    try:
        counts = write_cache(
            args.manifest,
            args.out,
            text_encoders,
            image_encoder,
            image_processor,
            settings={"base": args.base, "image_encoder": args.image_encoder},
            reference_size=args.reference_size,
            mask_references=not args.no_mask_references,
            mask_color=MASK_COLORS[args.mask_color],
            batch_size=args.batch_size,
            workers=args.workers,
            shard_size=args.shard_size,
            dtype=dtype,
            device=device,
            progress=lambda done, total: print(f"  {done}/{total}", file=sys.stderr, end="\r"),
        )
    except ManifestError as error:
        raise UserInputError(str(error)) from None
    print(file=sys.stderr)
    print(f"cache: {args.out} ({counts['written']} samples encoded, {counts['kept']} kept from an earlier run)")
    return 0
