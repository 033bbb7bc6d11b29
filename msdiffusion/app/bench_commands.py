"""`msdiff bench list | run | score | report`."""

from __future__ import annotations

import os
from pathlib import Path

import msdiffusion.world.bench  # noqa: F401  (registers the world bench with msdiffusion.bench)
from msdiffusion.app.cli import DTYPE_CHOICES, UserInputError, dtype_name
from msdiffusion.bench.definitions import BENCHMARKS, check_images, load_benchmark, select_samples
from msdiffusion.bench.runner import BOX_SETTINGS
from msdiffusion.loading import NAMED_MODELS, WORLD, world_model_paths
from msdiffusion.release import REFERENCE_COMBINE, RELEASE_NEGATIVE_PROMPT

SCORES = "scores.jsonl"
SCORES_CONFIG = "scores_config.json"
SCORES_SAVE_INTERVAL_S = 60.0  # `bench score` saves its progress this often


def register(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="MS-Bench / DreamBench / the world bench: list samples, generate, score, report",
        description="Reproduce the paper's evaluation: `list` the samples, `run` the generation "
        "(accelerate launch shards it), `score` the images, `report` the tables. `--bench world` runs the same "
        "steps on the procedural world's held-out subjects, on the CPU. See docs/benchmark.md.",
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
    _add_photos_arg(
        run,
        "directory of subject photos, e.g. ../shared/msbench (required but for --bench world, which renders its "
        "references there; default OUTPUT/references)",
    )
    run.add_argument(
        "--output", type=Path, required=True, help="run directory: images, manifest.jsonl, run_config.json"
    )
    run.add_argument(
        "--base",
        help=f"SDXL pipeline: folder, hub id or single file ({WORLD!r}: the world's, the default for --bench world)",
    )
    run.add_argument("--adapter", help=f"MS-Diffusion adapter: ms_adapter.bin, project folder or hub id (or {WORLD!r})")
    run.add_argument("--adapter-weight-name", help="file inside a hub adapter repo, e.g. ms_adapter.bin")
    run.add_argument("--image-encoder", help=f"CLIP ViT-bigG/14 vision encoder: folder or hub id (or {WORLD!r})")
    run.add_argument(
        "--models",
        type=Path,
        help="--bench world: a folder of world models laid out as the shipped weights (base/, adapter/, image_encoder/, "
        "evaluator.safetensors), or a finished `msdiff world build --out` folder, instead of the shipped ones",
    )
    run.add_argument(
        "--seed", type=int, default=0, help="base seed; each image's seed derives from it and its sample id"
    )
    run.add_argument("--images-per-sample", type=int, help="images per sample (default: the benchmark's own)")
    # defaults: the released inference settings; --bench world: the world's (msdiff demo's)
    run.add_argument("--steps", type=int, help="denoising steps (default: 30; world: 25)")
    run.add_argument("--guidance", type=float, help="classifier-free guidance (default: 7.5; world: 5.0)")
    run.add_argument("--scale", type=float, help="subject strength (default: 0.6; world: 1.0)")
    run.add_argument("--size", help="WIDTHxHEIGHT, or one number for a square (default: 1024x1024; world: 64x64)")
    run.add_argument("--negative-prompt", help="default: the released evaluation's negative prompt (world: empty)")
    run.add_argument(
        "--prompt-prefix", default="", help="text put before every prompt, e.g. 'best quality, high quality, '"
    )
    run.add_argument(
        "--mask-threshold", type=float, help="turn on auto layout guidance with this threshold (default: off)"
    )
    run.add_argument("--start-step", type=int, default=5, help="step at which auto layout takes over")
    run.add_argument(
        "--phrase-matching",
        choices=["tokens", "release"],
        default="tokens",
        help="where auto layout finds repeated phrases: tokens or the released code's positions",
    )
    ablation = run.add_argument_group("ablations (docs/world.md)")
    ablation.add_argument(
        "--boxes",
        choices=BOX_SETTINGS,
        default="given",
        help="given: the samples' boxes; none: all zeros (the image branch acts only through --mask-threshold); "
        "whole: every box the whole image (no layout)",
    )
    ablation.add_argument(
        "--drop-grounding", action="store_true", help="the resampler's learned grounding tokens (no phrase, no box)"
    )
    ablation.add_argument(
        "--subject-scales", help="comma-separated strengths by subject position, e.g. 1.0,0.4 (the rest keep --scale)"
    )
    ablation.add_argument(
        "--references", type=int, default=1, help="reference images per subject (the first of its folder)"
    )
    ablation.add_argument(
        "--reference-combine",
        choices=REFERENCE_COMBINE,
        default=None,
        help="several references: concat (resampled together; MS-Bench's default, the pipelines') or mean "
        "(each resampled, tokens averaged)",
    )
    run.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call on each process")
    run.add_argument(
        "--dtype",
        type=dtype_name,
        choices=("auto", *DTYPE_CHOICES),
        default="auto",
        help="weights' precision; auto: fp16 on a GPU, fp32 on the CPU",
    )
    run.add_argument("--require-all", action="store_true", help="fail if any selected sample cannot be built")
    run.set_defaults(func=_run)

    score = actions.add_parser("score", help="CLIP-T, CLIP-I, DINO and per-subject detection scores of a run")
    from msdiffusion.bench.scoring import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, DINO_PREPROCESSING
    from msdiffusion.data import DEFAULT_DETECTOR

    score.add_argument("--output", type=Path, required=True, help="the run directory of `msdiff bench run`")
    _add_photos_arg(score, "subject photos (default: the directory the run used)")
    score.add_argument(
        "--clip-model",
        help=f"CLIP model for CLIP-T and CLIP-I (default: {DEFAULT_CLIP_MODEL}, as DreamBooth's protocol)",
    )
    score.add_argument(
        "--dino-model", help=f"DINO ViT for the DINO score (default: {DEFAULT_DINO_MODEL}, as DreamBooth's protocol)"
    )
    score.add_argument(
        "--dino-preprocessing",
        choices=DINO_PREPROCESSING,
        help="resize-crop (default: short side 256, centre crop 224, as DINO and DreamBooth) or squash (to 224 x 224)",
    )
    score.add_argument(
        "--detector", help=f"OWL-ViT, OWLv2 or Grounding DINO folder or hub id (default: {DEFAULT_DETECTOR})"
    )
    score.add_argument(
        "--models",
        type=Path,
        help="world runs: the folder of world models whose evaluator and image encoder score it "
        "(default: the models the run used)",
    )
    score.add_argument(
        "--detection-threshold", type=float, help="minimum detection score (default: the detector family's own)"
    )
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


def _add_selection_args(parser) -> None:
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="GROUP_OR_PATTERN",
        help="keep samples of these groups (combination types) or sample-id glob patterns",
    )
    parser.add_argument("--fraction", type=float, help="a random fraction of the (selected) samples, e.g. 0.1")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the --fraction draw")


def _selected(args):
    benchmark = load_benchmark(args.bench)
    try:
        return benchmark, select_samples(benchmark, args.only, args.fraction, args.subset_seed)
    except ValueError as error:
        raise UserInputError(str(error)) from None


def _resolve_models(args, world: bool) -> None:
    """--models (a folder of world models) or --base/--adapter/--image-encoder; the world bench defaults
    to the shipped world models."""
    given = {"--base": args.base, "--adapter": args.adapter, "--image-encoder": args.image_encoder}
    if args.models is not None:
        if not world:
            raise UserInputError("--models is a folder of world models: it applies to --bench world only.")
        if any(given.values()):
            raise UserInputError("give either --models or --base/--adapter/--image-encoder, not both.")
        from msdiffusion.world.weights import world_models_folder

        try:
            paths = world_models_folder(args.models)
        except FileNotFoundError as error:
            raise UserInputError(str(error)) from None
        args.base, args.adapter, args.image_encoder = paths["base"], paths["adapter"], paths["image_encoder"]
        return
    if world and not any(given.values()):
        args.base = args.adapter = args.image_encoder = WORLD
        given = dict.fromkeys(given, WORLD)
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise UserInputError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (folders or hub ids)."
        )
    if WORLD in given.values():  # before anything is rendered or generated
        try:
            world_model_paths()
        except UserInputError as error:
            raise UserInputError(f"{error} Or give other world models with --models.") from None


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

    from msdiffusion.bench.runner import (
        RUN_CONFIG,
        BenchSettings,
        check_run_config,
        generate_items,
        shard,
        work_items,
        write_json_atomic,
        write_manifest,
    )

    benchmark, samples = _selected(args)
    world = benchmark.key == "world"
    _resolve_models(args, world)
    defaults = {
        "steps": 30,
        "guidance": 7.5,
        "scale": 0.6,
        "size": "1024x1024",
        "negative_prompt": RELEASE_NEGATIVE_PROMPT,
        "reference_combine": "concat",
    }
    named = NAMED_MODELS.get(args.base) or (NAMED_MODELS[WORLD] if world else None)
    if named is not None:  # a named set's own settings (the world's, for the world bench and --models)
        defaults |= named.defaults
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.photos is None:
        if not world:
            raise UserInputError("--photos: required (the directory of subject photos).")
        args.photos = args.output / "references"
    elif not world:
        _existing_dir(args.photos, "--photos")
    from msdiffusion.settings import parse_size

    size = parse_size(args.size, "--size")
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

    if args.base != WORLD:  # the world's models were checked by _resolve_models
        models = [
            (args.base, "base", "--base"),
            (args.adapter, "adapter", "--adapter"),
            (args.image_encoder, "image_encoder", "--image-encoder"),
        ]
        check_locations(models, adapter_weight_name=args.adapter_weight_name)  # before minutes of loading
    state = process_state()
    log = print if state.is_main_process else (lambda *a, **k: None)
    if world:  # the world's references are data: rendered (deterministically) where the run looks for them
        from msdiffusion.world.bench import render_references

        # every process renders what it does not find (the same pixels, written atomically), so none
        # depends on another's progress
        definition = benchmark.definition
        written = render_references(
            samples, args.photos, int(definition["references_per_subject"]), int(definition["seed"])
        )
        log(f"references: {written} rendered into {args.photos}" if written else f"references: all in {args.photos}")
    images_dir = _existing_dir(args.photos, "--photos")
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

    subject_scales = None
    if args.subject_scales:
        try:
            subject_scales = [float(v) for v in args.subject_scales.split(",")]
        except ValueError:
            raise UserInputError(
                f"--subject-scales: give numbers separated by commas, e.g. 1.0,0.4 (got {args.subject_scales!r})."
            ) from None
    if args.references < 1:
        raise UserInputError(f"--references must be at least 1, got {args.references}.")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "fp16" if state.device.type == "cuda" else "fp32"
    settings = BenchSettings(  # in the job file's words, as run_config.json records them
        base=args.base,
        adapter=args.adapter,
        image_encoder=args.image_encoder,
        adapter_weight_name=args.adapter_weight_name,
        dtype=dtype,
        seed=args.seed,
        images_per_sample=args.images_per_sample or benchmark.images_per_sample,
        steps=args.steps,
        guidance=args.guidance,
        scale=args.scale,
        size=size,
        negative_prompt=args.negative_prompt or None,
        prompt_prefix=args.prompt_prefix,
        mask_threshold=args.mask_threshold,
        start_step=args.start_step,
        phrase_matching=args.phrase_matching,
        boxes=args.boxes,
        drop_grounding=args.drop_grounding,
        subject_scales=subject_scales,
        references=args.references,
        reference_combine=args.reference_combine,
    )
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
        from msdiffusion.loading import load_pipeline

        try:
            return load_pipeline(settings.model_settings(), device=str(state.device))
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

    from msdiffusion.bench.runner import read_run_manifest, write_json_atomic

    output = _existing_dir(args.output, "--output")
    try:
        records = read_run_manifest(output)
    except FileNotFoundError as error:
        raise UserInputError(str(error)) from None
    if args.photos is not None:
        _existing_dir(args.photos, "--photos")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {args.batch_size}.")

    world = bool(records) and records[0].get("benchmark") == "world"
    wanted, load_scorer = (_world_scorer if world else _standard_scorer)(args, output)
    scores_path, config_path = output / SCORES, output / SCORES_CONFIG
    existing: dict[str, dict] = {}
    if scores_path.is_file() and not args.overwrite:
        previous = json.loads(config_path.read_text()) if config_path.is_file() else {}
        differing = [k for k, v in wanted.items() if v is not None and previous.get(k) != v]
        if differing:
            raise UserInputError(
                f"{scores_path} was computed with other models or preprocessing ({', '.join(f'{k}={previous.get(k)!r}' for k in differing)}); "
                "pass --overwrite to rescore every image with the new ones."
            )
        existing = {
            r["image"]: r for r in (json.loads(line) for line in scores_path.read_text().splitlines() if line.strip())
        }
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
        score, used = load_scorer()
        if not existing:
            # A fresh start (first scoring, or --overwrite): remove the old scores before recording the new
            # models, so that scores.jsonl never holds scores of models other than scores_config.json's.
            scores_path.unlink(missing_ok=True)
        write_json_atomic(config_path, used)
        last_save = time.monotonic()

        def save_progress(new: list[dict]) -> None:  # a killed run keeps what it scored (minus the last minute)
            nonlocal last_save
            if time.monotonic() - last_save >= SCORES_SAVE_INTERVAL_S:
                save({**existing, **{record["image"]: record for record in new}})
                last_save = time.monotonic()

        bar = tqdm(total=len(todo), desc="scoring")
        try:
            new = score(todo, bar.update, save_progress)
        except (FileNotFoundError, ValueError) as error:  # a missing reference; a manifest that is not a world run
            raise UserInputError(str(error)) from None
        bar.close()
        for record in new:
            existing[record["image"]] = record
    kept = save(existing)
    print(f"scores: {len(kept)} images in {scores_path}")
    return 0


def _standard_scorer(args, output: Path):
    """CLIP, DINO and a detector: the config to compare with earlier scores, and a loader."""
    from msdiffusion.bench.scoring import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, Scorers, ScoringConfig, score_records
    from msdiffusion.data import DEFAULT_DETECTOR

    if args.models is not None:
        raise UserInputError("--models (world models) applies to runs of --bench world only.")
    requested = ScoringConfig(
        args.clip_model or DEFAULT_CLIP_MODEL,
        args.dino_model or DEFAULT_DINO_MODEL,
        args.detector or DEFAULT_DETECTOR,
        args.detection_threshold,
        args.dino_preprocessing or "resize-crop",
    )

    def load():
        from msdiffusion.checks import check_locations

        models = [
            (requested.clip_model, "transformers", "--clip-model"),
            (requested.dino_model, "transformers", "--dino-model"),
            (requested.detector, "transformers", "--detector"),
        ]
        check_locations(models, device=args.device)
        try:
            scorers = Scorers.load(requested, args.device, args.batch_size)
        except ValueError as error:  # a model that does not load, or a detector of no supported family
            raise UserInputError(str(error)) from None

        def score(todo, progress, save_progress):
            return score_records(todo, output, scorers, args.photos, args.batch_size, progress, save_progress)

        return score, scorers.config.to_dict()

    return requested.to_dict(), load


def _world_scorer(args, output: Path):
    """The world's evaluator and image encoder (those the run used, or --models)."""
    import json

    from msdiffusion.bench.runner import RUN_CONFIG
    from msdiffusion.world.bench import WorldScorer, score_world_records, scoring_models, world_scoring_config

    foreign = [
        flag
        for flag, value in (
            ("--clip-model", args.clip_model),
            ("--dino-model", args.dino_model),
            ("--detector", args.detector),
            ("--detection-threshold", args.detection_threshold),
            ("--dino-preprocessing", args.dino_preprocessing),
        )
        if value is not None
    ]
    if foreign:
        raise UserInputError(
            f"{', '.join(foreign)}: a world run is scored by the world's evaluator and image encoder, not by "
            "CLIP, DINO or a detector; choose those with --models."
        )
    if not (output / RUN_CONFIG).is_file():
        raise UserInputError(f"No {RUN_CONFIG} in {output}: it is not the run directory of `msdiff bench run`.")
    settings = json.loads((output / RUN_CONFIG).read_text())["settings"]
    try:
        paths = scoring_models(settings, args.models)
    except FileNotFoundError as error:
        raise UserInputError(str(error)) from None
    config = world_scoring_config(paths["evaluator"], paths["image_encoder"])
    # the models' contents decide whether old scores can stay, not where the files are
    wanted = {
        key: value for key, value in config.items() if key in ("scorer", "evaluator_sha256", "image_encoder_sha256")
    }

    def load():
        from msdiffusion.loading import default_device

        device = args.device or default_device()
        scorer = WorldScorer(paths["evaluator"], paths["image_encoder"], device, args.batch_size)

        def score(todo, progress, save_progress):  # world runs score in minutes: saved at the end only
            return score_world_records(todo, output, scorer, args.photos, args.batch_size, progress)

        return score, scorer.config

    return wanted, load


# --- report ---------------------------------------------------------------------------------------


def _report(args) -> int:
    from msdiffusion.bench.report import write_report

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
