"""`msdiff bench list | run | score | report`."""

from __future__ import annotations

import os
from pathlib import Path

from msdiffusion.cli import DTYPE_CHOICES, UserInputError, deprecated_option, dtype_name, torch_dtype_name

from .definitions import BENCHMARKS, check_images, load_benchmark, select_samples
from .runner import RELEASE_NEGATIVE_PROMPT

SCORES = "scores.jsonl"
SCORES_CONFIG = "scores_config.json"
SCORES_SAVE_INTERVAL_S = 60.0  # `bench score` saves its progress this often


def register(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="MS-Bench / DreamBench: list samples, generate, score, report",
        description="Reproduce the paper's evaluation: `list` the samples, `run` the generation "
        "(accelerate launch shards it), `score` the images, `report` the tables. See docs/benchmark.md.",
    )
    bench.set_defaults(func=lambda args: bench.print_help() or 2)
    actions = bench.add_subparsers(dest="bench_command", metavar="ACTION")

    listing = actions.add_parser("list", help="count the samples; with --photos, what can be built from a directory")
    _add_benchmark_args(listing)
    _add_photos_arg(listing, "directory of subject photos to check")
    listing.add_argument("--samples", action="store_true", help="print every sample id with its prompt")
    listing.set_defaults(func=_list)

    run = actions.add_parser("run", help="generate the benchmark's images (resumable; shard with accelerate launch)")
    _add_benchmark_args(run)
    _add_selection_args(run)
    _add_photos_arg(run, "directory of subject photos, e.g. ../shared/msbench (required)")
    run.add_argument("--output", type=Path, required=True, help="run directory: images, manifest.jsonl, run_config.json")
    run.add_argument("--base", required=True, help="SDXL pipeline: folder, hub id or single file")
    run.add_argument("--adapter", required=True, help="MS-Diffusion adapter: ms_adapter.bin, project folder or hub id")
    run.add_argument("--adapter-weight-name", help="file inside a hub adapter repo, e.g. ms_adapter.bin")
    deprecated_option(run, "--weight-name", "--adapter-weight-name", "adapter_weight_name")
    run.add_argument("--image-encoder", required=True, help="CLIP ViT-bigG/14 vision encoder: folder or hub id")
    run.add_argument("--seed", type=int, default=0, help="base seed; each image's seed derives from it and its sample id")
    run.add_argument("--images-per-sample", type=int, help="images per sample (default: the benchmark's own)")
    run.add_argument("--steps", type=int, default=30, help="denoising steps")
    run.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance")
    deprecated_option(run, "--guidance-scale", "--guidance", "guidance", type=float)
    run.add_argument("--scale", type=float, default=0.6, help="subject strength")
    deprecated_option(run, "--ms-scale", "--scale", "scale", type=float)
    run.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT, or one number for a square")
    deprecated_option(run, "--height", "--size WIDTHxHEIGHT", "height", type=int)
    deprecated_option(run, "--width", "--size WIDTHxHEIGHT", "width", type=int)
    run.add_argument("--negative-prompt", default=RELEASE_NEGATIVE_PROMPT, help="the released evaluation's negative prompt by default")
    run.add_argument("--prompt-prefix", default="", help="text put before every prompt, e.g. 'best quality, high quality, '")
    run.add_argument("--mask-threshold", type=float, help="turn on auto layout guidance with this threshold (default: off)")
    run.add_argument("--start-step", type=int, default=5, help="step at which auto layout takes over")
    run.add_argument(
        "--phrase-matching", choices=["tokens", "release"], default="tokens",
        help="where auto layout finds repeated phrases: tokens or the released code's positions",
    )  # fmt: skip
    run.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call on each process")
    run.add_argument("--dtype", type=dtype_name, choices=("auto", *DTYPE_CHOICES), default="auto",
                     help="weights' precision; auto: fp16 on a GPU, fp32 on the CPU")  # fmt: skip
    run.add_argument("--require-all", action="store_true", help="fail if any selected sample cannot be built")
    run.set_defaults(func=_run)

    score = actions.add_parser("score", help="CLIP-T, CLIP-I, DINO and per-subject detection scores of a run")
    from .scoring import DEFAULT_CLIP_MODEL, DEFAULT_DETECTOR, DEFAULT_DINO_MODEL, DINO_PREPROCESSING

    score.add_argument("--output", type=Path, required=True, help="the run directory of `msdiff bench run`")
    _add_photos_arg(score, "subject photos (default: the directory the run used)")
    score.add_argument(
        "--clip-model", default=DEFAULT_CLIP_MODEL, help="CLIP model for CLIP-T and CLIP-I (ViT-B/32, as DreamBooth's protocol)"
    )  # fmt: skip
    score.add_argument("--dino-model", default=DEFAULT_DINO_MODEL, help="DINO ViT for the DINO score (ViT-S/16, as DreamBooth's protocol)")
    score.add_argument(
        "--dino-preprocessing", choices=DINO_PREPROCESSING, default="resize-crop",
        help="resize-crop (short side 256, centre crop 224, as DINO and DreamBooth) or squash (to 224 x 224)",
    )  # fmt: skip
    score.add_argument("--detector", default=DEFAULT_DETECTOR, help="OWL-ViT, OWLv2 or Grounding DINO folder or hub id")
    score.add_argument("--detection-threshold", type=float, help="minimum detection score (default: the detector family's own)")
    score.add_argument("--batch-size", type=int, default=16, help="images per model batch")
    score.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    score.add_argument("--overwrite", action="store_true", help="rescore every image (needed after changing models)")
    score.set_defaults(func=_score)

    report = actions.add_parser("report", help="tables (markdown + JSON) and image grids from a scored run")
    report.add_argument("--output", type=Path, required=True, help="the run directory")
    _add_photos_arg(report, "subject photos (default: the directory the run used)")
    report.add_argument("--grid-samples", type=int, default=8, help="samples per grid (one grid per group)")
    report.set_defaults(func=_report)


def _add_benchmark_args(parser) -> None:
    parser.add_argument("--bench", choices=list(BENCHMARKS), default="msbench", help="which benchmark")


def _add_photos_arg(parser, help_text: str) -> None:
    # `--images` is a count in `msdiff generate` (as in job files); the photo folder is `--photos`.
    parser.add_argument("--photos", type=Path, help=help_text)
    deprecated_option(parser, "--images", "--photos", "photos", type=Path)


def _add_selection_args(parser) -> None:
    parser.add_argument("--only", nargs="+", metavar="GROUP_OR_PATTERN",
                        help="keep samples of these groups (combination types) or sample-id glob patterns")  # fmt: skip
    parser.add_argument("--fraction", type=float, help="a random fraction of the (selected) samples, e.g. 0.1")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the --fraction draw")


def _selected(args):
    benchmark = load_benchmark(args.bench)
    try:
        return benchmark, select_samples(benchmark, args.only, args.fraction, args.subset_seed)
    except ValueError as error:
        raise UserInputError(str(error)) from None


def _size(args) -> tuple[int, int]:
    """(width, height) from --size, or from the deprecated --width/--height."""
    from msdiffusion.jobs import parse_size

    width, height = parse_size(args.size, "--size")
    width, height = parse_size([getattr(args, "width", width), getattr(args, "height", height)], "--size")
    return width, height


def _existing_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserInputError(f"{what} {path} is not a directory.")
    return path


# --- list -----------------------------------------------------------------------------------------


def _list(args) -> int:
    if args.photos is not None:
        _existing_dir(args.photos, "--photos")
    benchmark = load_benchmark(args.bench)
    print(benchmark.summary())
    width = max(map(len, benchmark.groups))
    unit = "subjects" if benchmark.key == "dreambench" else "combinations"
    for group in benchmark.groups:
        samples = [s for s in benchmark.samples if s.group == group]
        combinations = len({s.combination for s in samples})
        print(f"  {group:<{width}}  {combinations:>4} {unit}  {len(samples):>5} samples")
    if args.photos is not None:
        availability = check_images(benchmark.samples, args.photos)
        for line in availability.describe(args.photos, len(benchmark.samples)):
            print(line)
    if args.samples:
        for sample in benchmark.samples:
            print(f"{sample.sample_id}\t{sample.prompt}")
    return 0


# --- run ------------------------------------------------------------------------------------------


def process_state():
    """accelerate's PartialState; a multi-process launch on a machine without CUDA runs on the CPU with gloo
    (PartialState only recognises one when asked for the CPU)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (multi_process and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _run(args) -> int:
    from tqdm.auto import tqdm

    from .runner import (
        RUN_CONFIG,
        GenerationSettings,
        check_run_config,
        generate_items,
        load_pipeline,
        shard,
        work_items,
        write_json_atomic,
        write_manifest,
    )

    benchmark, samples = _selected(args)
    if args.photos is None:
        raise UserInputError("--photos: required (the directory of subject photos).")
    images_dir = _existing_dir(args.photos, "--photos")
    width, height = _size(args)
    positive = {"--steps": args.steps, "--batch-size": args.batch_size}
    for name, value in positive.items():
        if value < 1:
            raise UserInputError(f"{name} must be at least 1, got {value}.")
    if args.images_per_sample is not None and args.images_per_sample < 1:
        raise UserInputError(f"--images-per-sample must be at least 1, got {args.images_per_sample}.")
    if args.mask_threshold is not None and not 0 <= args.mask_threshold < 1:
        raise UserInputError(f"--mask-threshold must be in [0, 1), got {args.mask_threshold}.")
    if args.start_step < 1:
        raise UserInputError(f"--start-step must be at least 1, got {args.start_step}.")

    from msdiffusion.checks import check_locations

    models = [(args.base, "base", "--base"), (args.adapter, "adapter", "--adapter"), (args.image_encoder, "image_encoder", "--image-encoder")]
    check_locations(models, adapter_weight_name=args.adapter_weight_name)  # before minutes of loading
    state = process_state()
    log = print if state.is_main_process else (lambda *a, **k: None)
    availability = check_images(samples, images_dir)
    log(f"{benchmark.name}: {len(samples)} samples selected")
    if availability.missing_sources:
        for line in availability.describe(images_dir, len(samples)):
            log(line)
        if args.require_all:
            raise UserInputError(
                "some selected samples cannot be built (see above); add the missing images or drop --require-all."
            )
        log(f"generating the {len(availability.buildable)} samples that can be built")

    dtype = args.dtype
    if dtype == "auto":
        dtype = "fp16" if state.device.type == "cuda" else "fp32"
    settings = GenerationSettings(  # its field names are those of run_config.json files already written
        base=args.base, adapter=args.adapter, image_encoder=args.image_encoder, weight_name=args.adapter_weight_name,
        seed=args.seed, images_per_sample=args.images_per_sample or benchmark.images_per_sample, steps=args.steps,
        guidance_scale=args.guidance, ms_scale=args.scale, height=height, width=width,
        negative_prompt=args.negative_prompt, prompt_prefix=args.prompt_prefix, mask_threshold=args.mask_threshold,
        start_step=args.start_step, phrase_matching=args.phrase_matching, dtype=torch_dtype_name(dtype),
    )  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    try:
        config = check_run_config(args.output, benchmark.key, settings, images_dir)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    state.wait_for_everyone()  # every process has checked the old config before the main one replaces it
    if state.is_main_process:
        write_json_atomic(args.output / RUN_CONFIG, config)

    items = work_items(availability.buildable, settings.images_per_sample)
    mine = shard(items, state.process_index, state.num_processes)
    bar = tqdm(total=len(mine), desc=f"generating (process {state.process_index})", disable=not state.is_main_process)

    def pipeline():
        try:
            return load_pipeline(settings, state.device)
        except (OSError, ValueError) as error:  # a wrong path or id, an adapter that does not fit the base
            raise UserInputError(f"cannot load the models: {error}") from None

    result = generate_items(mine, args.output, images_dir, settings, pipeline, args.batch_size, bar.update)
    bar.close()
    print(
        f"[process {state.process_index}/{state.num_processes}] generated {result.generated}, "
        f"{result.skipped} already on disk, of {result.assigned} images",
        flush=True,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        total = write_manifest(args.output, items, settings, images_dir)
        print(f"manifest: {total} images in {args.output / 'manifest.jsonl'}")
    return 0


# --- score ----------------------------------------------------------------------------------------


def _score(args) -> int:
    import json
    import time

    from tqdm.auto import tqdm

    from .runner import read_manifest, write_json_atomic
    from .scoring import Scorers, ScoringConfig, score_records

    output = _existing_dir(args.output, "--output")
    try:
        records = read_manifest(output)
    except FileNotFoundError as error:
        raise UserInputError(str(error)) from None
    if args.photos is not None:
        _existing_dir(args.photos, "--photos")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {args.batch_size}.")

    requested = ScoringConfig(
        args.clip_model, args.dino_model, args.detector, args.detection_threshold, args.dino_preprocessing
    )  # fmt: skip
    scores_path, config_path = output / SCORES, output / SCORES_CONFIG
    existing: dict[str, dict] = {}
    if scores_path.is_file() and not args.overwrite:
        previous = json.loads(config_path.read_text()) if config_path.is_file() else {}
        wanted = requested.to_dict()
        differing = [k for k, v in wanted.items() if v is not None and previous.get(k) != v]
        if differing:
            raise UserInputError(
                f"{scores_path} was computed with other models or preprocessing ({', '.join(f'{k}={previous.get(k)!r}' for k in differing)}); "
                "pass --overwrite to rescore every image with the new ones."
            )
        existing = {r["image"]: r for r in (json.loads(line) for line in scores_path.read_text().splitlines() if line.strip())}
    todo = [r for r in records if r["image"] not in existing]
    gone = [r["image"] for r in todo if not (output / r["image"]).is_file()]
    if gone:
        raise UserInputError(
            f"{len(gone)} images of the manifest are not on disk (e.g. {gone[0]}); run `msdiff bench run` again "
            "with the same arguments to regenerate them."
        )
    print(f"{len(records)} images in the manifest, {len(existing)} already scored, {len(todo)} to score")
    manifest_images = {r["image"] for r in records}

    def save(scores: dict[str, dict]) -> list[dict]:
        kept = [scores[key] for key in sorted(scores) if key in manifest_images]
        write_json_atomic(scores_path, kept, lines=True)
        return kept

    if todo:
        from msdiffusion.checks import check_locations

        models = [(args.clip_model, "transformers", "--clip-model"), (args.dino_model, "transformers", "--dino-model"), (args.detector, "transformers", "--detector")]
        check_locations(models, device=args.device)
        scorers = Scorers.load(requested, args.device, args.batch_size)
        if not existing:
            # A fresh start (first scoring, or --overwrite): remove the old scores before recording the new
            # models, so that scores.jsonl never holds scores of models other than scores_config.json's.
            scores_path.unlink(missing_ok=True)
        write_json_atomic(config_path, scorers.config.to_dict())
        last_save = time.monotonic()

        def save_progress(new: list[dict]) -> None:  # a killed run keeps what it scored (minus the last minute)
            nonlocal last_save
            if time.monotonic() - last_save >= SCORES_SAVE_INTERVAL_S:
                save({**existing, **{record["image"]: record for record in new}})
                last_save = time.monotonic()

        bar = tqdm(total=len(todo), desc="scoring")
        try:
            new = score_records(todo, output, scorers, args.photos, args.batch_size, bar.update, save_progress)
        except FileNotFoundError as error:
            raise UserInputError(str(error)) from None
        bar.close()
        for record in new:
            existing[record["image"]] = record
    kept = save(existing)
    print(f"scores: {len(kept)} images in {scores_path}")
    return 0


# --- report ---------------------------------------------------------------------------------------


def _report(args) -> int:
    from .report import write_report

    output = _existing_dir(args.output, "--output")
    if not (output / SCORES).is_file():
        raise UserInputError(f"No {SCORES} in {output}: run `msdiff bench score --output {output}` first.")
    if args.grid_samples < 0:
        raise UserInputError(f"--grid-samples must be 0 or more, got {args.grid_samples}.")
    if args.photos is not None:
        _existing_dir(args.photos, "--photos")
    paths = write_report(output, grid_samples=args.grid_samples, images_dir=args.photos)
    for path in paths:
        print(path)
    return 0
