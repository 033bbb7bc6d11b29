"""`msdiff data check` and `msdiff data build`."""

from __future__ import annotations

import argparse
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
    check.add_argument("manifest", type=Path, help="the manifest (.jsonl)")
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
    from msdiffusion.data.manifest import Problem, validate_manifest
    from msdiffusion.errors import UserInputError

    if not args.manifest.is_file():
        raise UserInputError(f"manifest not found: {args.manifest}")
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
    bad_lines = len({p.line for p in problems if p.line})
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
        "segment them (SAM), filter, and write OUT/manifest.jsonl (docs/data.md).",
    )
    build.add_argument(
        "source",
        type=Path,
        help="folder of images with NAME.txt captions, or a captions file (.jsonl/.json/.csv with image,caption)",
    )
    build.add_argument("--out", type=Path, required=True, help="output folder (manifest.jsonl, masks/, crops/)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing OUT/manifest.jsonl")
    build.add_argument(
        "--video",
        action="store_true",
        help="sources are clips (folders of frames): target = middle frame, references from the first frame",
    )
    build.add_argument("--limit", type=int, help="process only the first N items")

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
    models.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")
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
    filters.add_argument("--score-threshold", type=float, default=0.2, help="minimum detector score (default 0.2)")
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
    build.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from msdiffusion.errors import UserInputError

    manifest = args.out / "manifest.jsonl"
    if manifest.exists() and not args.overwrite:
        raise UserInputError(f"{manifest} exists; pass --overwrite to replace it or choose another --out")
    for name in ("batch_size", "max_phrase_words", "min_subjects"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UserInputError("--limit must be at least 1")

    import torch

    from msdiffusion.data.build import build_manifest, collect_items, make_phrase_finder
    from msdiffusion.data.detection import BoxSegmenter, OpenVocabularyDetector, SubjectFilter
    from msdiffusion.data.manifest import validate_manifest
    from msdiffusion.data.phrases import load_vocabulary
    from msdiffusion.loading import default_device

    try:
        rules = SubjectFilter(
            args.score_threshold, args.min_box_area, args.max_box_area, args.max_overlap, args.max_subjects
        )
        vocabulary = load_vocabulary(args.vocabulary) if args.vocabulary else None
        items, skipped = collect_items(args.source, video=args.video)
    except (ValueError, FileNotFoundError) as error:
        raise UserInputError(str(error)) from None
    if args.limit is not None:
        items = items[: args.limit]
    if not items:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped.items()) or "no images found"
        raise UserInputError(f"no captioned items in {args.source} ({reasons}); see docs/data.md for the layouts")

    from msdiffusion.checks import check_locations

    segmenter_name = args.segmenter or (DEFAULT_SEGMENTER if args.masks else None)
    check_locations(
        [(args.detector, "transformers", "--detector"), (segmenter_name, "transformers", "--segmenter")],
        device=args.device,
    )
    device = args.device or default_device()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        detector = OpenVocabularyDetector(args.detector, device, dtype, batch_size=args.batch_size)
        segmenter = None
        if args.masks or args.segmenter:
            segmenter = BoxSegmenter(args.segmenter or DEFAULT_SEGMENTER, device, dtype)
    except ValueError as error:
        raise UserInputError(str(error)) from None

    print(f"{len(items)} items from {args.source} on {device}; writing {manifest}", file=sys.stderr)
    report = build_manifest(
        items,
        args.out,
        detector,
        rules,
        make_phrase_finder(vocabulary, args.max_phrase_words),
        segmenter=segmenter,
        batch_size=args.batch_size,
        min_subjects=args.min_subjects,
        save_crops=args.save_crops,
        progress=lambda done: print(f"  {done}/{len(items)}", file=sys.stderr, end="\r"),
    )
    print(file=sys.stderr)
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
