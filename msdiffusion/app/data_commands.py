"""`msdiff data check` and `msdiff data build`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import Counter
from pathlib import Path

from msdiffusion.app.cli import DTYPE_CHOICES, dtype_name
from msdiffusion.data import DEFAULT_DETECTOR, DEFAULT_SEGMENTER

AREA_BINS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build, check and cache training data",
        description="Training data: build a manifest from captioned images, check one, or cache its encoder features (docs/data.md, docs/training.md).",
    )
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: _usage(parser))
    _add_check(commands)
    _add_build(commands)
    from msdiffusion.app.train_commands import (
        add_cache_parser,  # `msdiff data cache` lives with the training code that reads it
    )

    add_cache_parser(commands)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


# --- check -----------------------------------------------------------------------------------------


def _add_check(commands) -> None:
    check = commands.add_parser(
        "check",
        help="report a manifest's problems and statistics",
        description="Validate a JSON-lines manifest (line-numbered problems) and print statistics. Every image, "
        "reference and mask is decoded (in parallel, with a progress bar), so a truncated file is found here rather "
        "than hours into training. Exit code 1 when there are problems (an empty manifest is one).",
    )
    check.add_argument(
        "manifest",
        type=Path,
        help="the manifest (.jsonl), a sharded one's manifest-index.json, or the folder of either",
    )
    check.add_argument("--max-problems", type=int, default=50, help="problems to list (all are counted)")
    speed = check.add_mutually_exclusive_group()
    speed.add_argument(
        "--headers-only",
        action="store_true",
        help="open image headers instead of decoding every pixel (faster; misses truncated files)",
    )
    speed.add_argument(
        "--no-open",
        action="store_true",
        help="only check that files exist, without opening them (fastest; misses unreadable files)",
    )
    check.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads decoding images")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from msdiffusion.data.manifest import ManifestError, Problem, manifest_files, validate_manifest
    from msdiffusion.errors import UserInputError

    try:
        manifest_files(args.manifest)
    except (FileNotFoundError, ManifestError) as error:
        raise UserInputError(str(error)) from None
    if args.max_problems < 1:
        raise UserInputError("--max-problems must be at least 1")
    if args.workers < 1:
        raise UserInputError("--workers must be at least 1")
    bar = None
    if not args.no_open and not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(
            desc="decoding images" if not args.headers_only else "opening images", unit="sample", file=sys.stderr
        )

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    samples, problems, total = validate_manifest(
        args.manifest,
        check_files=True,
        open_images=not args.no_open,
        max_problems=args.max_problems,
        decode=not args.headers_only,
        workers=args.workers,
        progress=progress if bar is not None else None,
    )
    if bar is not None:
        bar.close()
    if not samples and not total:  # nothing to train on is not a pass
        problems = [Problem(0, "", "the manifest has no samples (no non-blank lines)", "empty")]
        total = 1
    for problem in problems:
        print(problem.format(args.manifest) if problem.line else f"{args.manifest}: {problem.message}")
    if total > len(problems):
        print(f"... and {total - len(problems)} more problems (raise --max-problems to list them)")
    print(format_statistics(samples, problems, total, args.manifest))
    return 1 if total else 0


def format_statistics(samples, problems, total: int, manifest: Path) -> str:
    import numpy as np

    lines = [f"manifest: {manifest}"]
    bad_lines = len({(p.file, p.line) for p in problems if p.line})
    more = "+" if total > len(problems) else ""
    lines.append(f"samples: {len(samples)} valid, {bad_lines}{more} line(s) with problems")
    per_sample = Counter(len(s.subjects) for s in samples)
    histogram = ", ".join(f"{k}: {per_sample[k]}" for k in sorted(per_sample)) or "none"
    subjects = [subject for sample in samples for subject in sample.subjects]
    lines.append(f"subjects: {len(subjects)}; subjects per sample: {histogram}")
    if subjects:
        areas = np.array([(b[2] - b[0]) * (b[3] - b[1]) for b in (s.box for s in subjects)])
        q = np.quantile(areas, [0.0, 0.1, 0.5, 0.9, 1.0])
        lines.append(
            "box area (fraction of the image): "
            f"min {q[0]:.3f}, 10% {q[1]:.3f}, median {q[2]:.3f}, 90% {q[3]:.3f}, max {q[4]:.3f}"
        )
        counts, _ = np.histogram(areas, bins=AREA_BINS)
        bins = ", ".join(f"{lo:g}-{hi:g}: {n}" for lo, hi, n in zip(AREA_BINS[:-1], AREA_BINS[1:], counts))
        lines.append(f"box area histogram: {bins}")
        masked = sum(s.reference.mask is not None for s in subjects)
        cropped = sum(s.reference.crop is not None for s in subjects)
        same = sum(s.reference.image == sample.image for sample in samples for s in sample.subjects)
        lines.append(
            f"references: {cropped} cropped, {masked} masked, {same} taken from the target image itself, "
            f"{len(subjects) - same} from other images"
        )
        phrases = Counter(s.phrase.lower() for s in subjects)
        lines.append("top phrases: " + ", ".join(f"{p} ({n})" for p, n in phrases.most_common(10)))
    kinds = Counter(p.kind for p in problems)
    if kinds["empty"]:
        lines.append("problems: 1 (the manifest is empty)")
        return "\n".join(lines)
    lines.append(
        f"problems: {total} (missing files: {kinds['missing']}{more}, unreadable images: {kinds['unreadable']}{more})"
        if total
        else "problems: none"
    )
    return "\n".join(lines)


# --- build -----------------------------------------------------------------------------------------


def _add_build(commands) -> None:
    build = commands.add_parser(
        "build",
        help="build a manifest from captioned images or video clips",
        description="Detect the caption's subjects in each image (open-vocabulary detector), optionally "
        "segment them (SAM), filter, and write OUT/manifest.jsonl, or a sharded manifest (manifest-NNNNN.jsonl "
        "and manifest-index.json) for tar shards, --shard-size or --engine ray (docs/data.md).",
    )
    build.add_argument(
        "source",
        help="folder of images with NAME.txt captions, a captions file (.jsonl/.json/.csv with image,caption), or "
        "WebDataset tar shards (a .tar, a {00000..00099}.tar range, a glob, or a folder of .tar; any fsspec URL)",
    )
    build.add_argument("--out", type=Path, required=True, help="output folder (manifest, masks/, crops/, images/)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing manifest in OUT")
    build.add_argument(
        "--video",
        action="store_true",
        help="sources are clips (folders of frames; in tar shards a video file or KEY.000.jpg... frames): "
        "target = middle frame, references from the first frame",
    )
    build.add_argument(
        "--caption-field",
        default="txt",
        help="tar shards: the caption is the KEY.txt member (txt, the default) or this field of KEY.json",
    )
    build.add_argument("--limit", type=int, help="process only the first N items, into one manifest.jsonl")
    build.add_argument(
        "--quiet", action="store_true", help="no progress line (shards and samples done, samples/s, time left)"
    )

    phrases = build.add_argument_group("subject phrases")
    phrases.add_argument(
        "--vocabulary",
        help="find these phrases in captions instead of extracting noun phrases: 'coco' (built-in) or a "
        "text file with one phrase a line",
    )
    phrases.add_argument("--max-phrase-words", type=int, default=2, help="words kept per noun phrase (default 2)")

    models = build.add_argument_group("models")
    models.add_argument(
        "--detector",
        default=DEFAULT_DETECTOR,
        help=f"OWLv2/OWL-ViT/Grounding DINO hub id or folder (default {DEFAULT_DETECTOR})",
    )
    models.add_argument(
        "--masks",
        action="store_true",
        help=f"segment subjects with SAM to mask the reference crops (default model {DEFAULT_SEGMENTER})",
    )
    models.add_argument("--segmenter", help="SAM hub id or folder (implies --masks)")
    models.add_argument(
        "--device", help="cuda, cuda:1, mps or cpu (default: the best available; with --engine ray, each worker's)"
    )
    models.add_argument(
        "--dtype",
        type=dtype_name,
        choices=("auto", *DTYPE_CHOICES),
        default="auto",
        help="model precision; auto: fp16 on CUDA, fp32 elsewhere",
    )
    models.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="images per detector pass; Grounding DINO: image-phrase pairs, one phrase per pass (default 8)",
    )

    filters = build.add_argument_group("filters")
    filters.add_argument(
        "--score-threshold",
        type=float,
        help="minimum detector score (default: 0.2 for OWLv2 and OWL-ViT, 0.35 for Grounding DINO)",
    )
    filters.add_argument(
        "--min-box-area", type=float, default=0.01, help="minimum box area, fraction of the image (default 0.01)"
    )
    filters.add_argument(
        "--max-box-area", type=float, default=0.9, help="maximum box area, fraction of the image (default 0.9)"
    )
    filters.add_argument(
        "--max-overlap", type=float, default=0.5, help="maximum IoU between two subjects' boxes (default 0.5)"
    )
    filters.add_argument("--max-subjects", type=int, default=4, help="subjects kept per image, best first (default 4)")
    filters.add_argument(
        "--min-subjects", type=int, default=1, help="images with fewer subjects are left out (default 1)"
    )

    output = build.add_argument_group("output")
    output.add_argument(
        "--save-crops",
        action="store_true",
        help="write reference crops to OUT/crops/ instead of pointing at the source image with a crop box",
    )
    output.add_argument(
        "--shard-size",
        type=int,
        help="write a sharded manifest of N items a shard (tar sources: one shard per tar; --engine ray: "
        f"default {DEFAULT_SHARD_SIZE}); a stopped build run again continues after its finished shards",
    )

    engine = build.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process, one device (default); ray: a Ray Data pipeline over the GPUs of this machine "
        'or a cluster (pip install "msdiffusion[scale]")',
    )
    engine.add_argument(
        "--ray-address", help="join this Ray cluster (e.g. auto, ray://head:10001); default: a local Ray"
    )
    engine.add_argument("--detector-workers", type=int, default=1, help="ray: detector actors (default 1)")
    engine.add_argument(
        "--segmenter-workers", type=int, help="ray: segmenter actors (default: as many as --detector-workers)"
    )
    engine.add_argument(
        "--gpus-per-worker",
        type=float,
        help="ray: GPUs per detector or segmenter actor, fractions allowed (default 1 where the cluster has GPUs, else 0)",
    )
    engine.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray: CPUs per actor (default 1)")
    build.set_defaults(func=run_build)


DEFAULT_SHARD_SIZE = 1000


def run_build(args: argparse.Namespace) -> int:
    from msdiffusion.errors import UserInputError

    for name in ("batch_size", "max_phrase_words", "min_subjects", "detector_workers"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("limit", "shard_size", "segmenter_workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0 or args.cpus_per_worker <= 0:
        raise UserInputError("--gpus-per-worker must be 0 or more and --cpus-per-worker more than 0")
    if args.engine != "ray":
        given = [f"--{n.replace('_', '-')}" for n in ("ray_address", "segmenter_workers", "gpus_per_worker")]
        given = [flag for flag in given if getattr(args, flag[2:].replace("-", "_")) is not None]
        if given or args.detector_workers != 1:
            raise UserInputError(f"{', '.join(given) or '--detector-workers'} need(s) --engine ray")
    if args.limit is not None and (args.engine == "ray" or args.shard_size):
        raise UserInputError(
            "--limit tries settings on a few items into one manifest.jsonl: drop --engine ray and --shard-size with it"
        )

    from msdiffusion.data.build import (
        MANIFEST_NAME,
        STATE_FOLDER,
        BuildProgress,
        ModelSpec,
        build_manifest,
        build_sharded,
        collect_items,
        make_phrase_finder,
        plan_shards,
        planned_samples,
        tar_items,
    )
    from msdiffusion.data.detection import SUBJECT_SCORE_THRESHOLDS, SubjectFilter, detector_family
    from msdiffusion.data.manifest import INDEX_NAME, validate_manifest
    from msdiffusion.data.phrases import load_vocabulary
    from msdiffusion.data.tars import is_tar_source

    tar_source = is_tar_source(args.source)
    sharded = args.limit is None and (args.engine == "ray" or args.shard_size is not None or tar_source)
    manifest = args.out / (INDEX_NAME if sharded else MANIFEST_NAME)
    _prepare_output(args.out, manifest, sharded, args.overwrite, STATE_FOLDER)

    try:
        rules = SubjectFilter(
            min_box_area=args.min_box_area,
            max_box_area=args.max_box_area,
            max_overlap=args.max_overlap,
            max_subjects=args.max_subjects,
        )
        vocabulary = load_vocabulary(args.vocabulary) if args.vocabulary else None
        if sharded:
            specs, skipped = plan_shards(
                args.source, args.video, args.caption_field, args.shard_size or DEFAULT_SHARD_SIZE
            )
            count = f"{len(specs)} shard(s)"
            empty = not specs
        elif tar_source:
            items, skipped = tar_items(args.source, args.video, args.caption_field, args.limit)
        else:
            items, skipped = collect_items(args.source, video=args.video)
            items = items[: args.limit] if args.limit is not None else items
        if not sharded:
            count, empty = f"{len(items)} items", not items
    except (ValueError, FileNotFoundError) as error:
        raise UserInputError(str(error)) from None
    if empty:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped.items()) or "no images found"
        raise UserInputError(f"no captioned items in {args.source} ({reasons}); see docs/data.md for the layouts")

    from msdiffusion.checks import check_locations

    segmenter_name = args.segmenter or (DEFAULT_SEGMENTER if args.masks else None)
    check_locations(
        [(args.detector, "transformers", "--detector"), (segmenter_name, "transformers", "--segmenter")],
        device=args.device,
    )
    try:
        family = detector_family(args.detector)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    score = SUBJECT_SCORE_THRESHOLDS[family] if args.score_threshold is None else args.score_threshold
    rules = dataclasses.replace(rules, score_threshold=score)
    detector = ModelSpec("detector", args.detector, args.device, args.dtype, args.batch_size)
    segmenter = ModelSpec("segmenter", segmenter_name, args.device, args.dtype) if segmenter_name else None
    find_phrases = make_phrase_finder(vocabulary, args.max_phrase_words)
    common = dict(
        segmenter=segmenter, batch_size=args.batch_size, min_subjects=args.min_subjects, save_crops=args.save_crops
    )

    if sharded:
        progress = BuildProgress(len(specs), planned_samples(specs), quiet=args.quiet)
    else:
        progress = BuildProgress(None, len(items), quiet=args.quiet)
    if args.engine == "ray":
        report = _build_on_ray(args, specs, detector, rules, find_phrases, common, progress)
    else:
        device = detector.resolved()[0]
        try:
            common["segmenter"] = segmenter() if segmenter else None
            loaded = detector()
        except ValueError as error:
            raise UserInputError(str(error)) from None
        print(
            f"{count} from {args.source} on {device}, detections scoring >= {rules.score_threshold}; writing {manifest}",
            file=sys.stderr,
        )
        if sharded:
            report = build_sharded(specs, args.out, loaded, rules, find_phrases, progress=progress, **common)
        else:
            report = build_manifest(items, args.out, loaded, rules, find_phrases, progress=progress, **common)
    report.skipped.update(skipped)
    report.items += sum(skipped.values())
    print(report.summary())
    _, problems, total = validate_manifest(manifest, check_files=True)
    if total:  # a bug, not a user mistake: the builder must write valid manifests
        for problem in problems:
            print(problem.format(manifest), file=sys.stderr)
        return 1
    print(f"manifest: {manifest} (check it with: msdiff data check {manifest})")
    return 0


def _prepare_output(out: Path, manifest: Path, sharded: bool, overwrite: bool, state_folder: str) -> None:
    """Refuse to replace a finished manifest without --overwrite; with it, remove the old manifest files.

    An unfinished sharded build (shards, no index) is left as it is: running the build again continues it.
    """
    import shutil

    from msdiffusion.errors import UserInputError

    if manifest.exists() and not overwrite:
        raise UserInputError(f"{manifest} exists; pass --overwrite to replace it or choose another --out")
    if overwrite:
        for old in [out / "manifest.jsonl", out / "manifest-index.json", *out.glob("manifest-*.jsonl")]:
            old.unlink(missing_ok=True)
        shutil.rmtree(out / state_folder, ignore_errors=True)
    elif sharded and (out / state_folder).is_dir():
        print(f"continuing the unfinished build in {out}: its finished shards are kept", file=sys.stderr)


def _build_on_ray(args, specs, detector, rules, find_phrases, common, progress):
    from msdiffusion.data.ray_engine import build_with_ray, ray_available
    from msdiffusion.errors import UserInputError

    if not ray_available():
        raise UserInputError(
            '--engine ray needs Ray Data: pip install -e ".[scale]" (or pip install "ray[data]"); '
            "or build with the local engine (the default)"
        )
    where = f"the Ray cluster at {args.ray_address}" if args.ray_address else "a local Ray"
    print(
        f"{len(specs)} shard(s) from {args.source} on {where}, {args.detector_workers} detector worker(s), "
        f"detections scoring >= {rules.score_threshold}; writing {args.out}",
        file=sys.stderr,
    )
    return build_with_ray(
        specs,
        args.out,
        detector,
        rules,
        find_phrases,
        address=args.ray_address,
        detector_workers=args.detector_workers,
        segmenter_workers=args.segmenter_workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        progress=progress,
        **common,
    )
