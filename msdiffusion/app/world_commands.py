"""`msdiff world build` and `msdiff world evaluate`: the procedural world's recipe and its scores."""

from __future__ import annotations

import json
import time
from pathlib import Path

from msdiffusion.errors import UserInputError
from msdiffusion.world.weights import MODELS_HELP


def register(subparsers) -> None:
    world = subparsers.add_parser(
        "world",
        help="the procedural world: rebuild its models, score them (docs/world.md)",
        description="The small procedural world in which this project trains a complete SDXL-architecture "
        "model and an MS-Diffusion adapter on a CPU (docs/world.md).",
    )
    commands = world.add_subparsers(dest="world_command", metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="rebuild data, base, image encoder, evaluator and adapter from scratch (resumable)",
        description="Run every unfinished stage of the world's recipe with fixed seeds, printing the time of "
        "each: data, vae, base, image_encoder, evaluator, adapter (msdiff train), export. Stopped runs "
        "resume from their last checkpoint when started again with the same --out.",
    )
    build.add_argument("--out", default="runs/world", help="working folder (default: runs/world)")
    build.add_argument("--stages", help="comma-separated subset of the stages (default: all)")
    build.add_argument(
        "--recipe",
        help="a recipe file (YAML): the data, base, image encoder, evaluator and adapter settings of a build, e.g. "
        "recipes/world/shipped.yaml (default: the recipe's defaults in msdiffusion/world/recipe.py)",
    )
    build.add_argument(
        "--init-base",
        help="a base snapshot (base-train/snapshots/step-N, written at each cycle's end) to start the base stage from: "
        "a warm restart of the recipe's next cycle with a fresh optimiser, for a recipe longer than one sitting",
    )
    build.add_argument(
        "--reuse",
        metavar="FOLDER",
        help="another build folder: link each stage finished there with this recipe's settings (and inputs "
        "linked from there too) instead of running it, so that a variant of one stage trains that stage alone; "
        "or an export (msdiffusion/world/weights, the shipped weights), which lends its VAE, base, image encoder "
        "and evaluator",
    )
    build.add_argument(
        "--export-to",
        help="where the export stage writes the weights (default: OUT/export); shipping them is "
        "--export-to msdiffusion/world/weights in a source checkout",
    )
    build.set_defaults(func=run_build)

    evaluate = commands.add_parser(
        "evaluate",
        help="generate held-out subjects and score them with the world's evaluator",
        description="Generate COUNT images of held-out identities (1 to 4 subjects, taking turns) and report, "
        "per subject count: found in its box (IoU >= 0.5), placed (a shape of any class there), mean IoU, identity correct, found and correct, "
        "and identity mixing; then each of the world's targets (docs/world.md) with its measured rate.",
    )
    evaluate.add_argument(
        "--models",
        help=MODELS_HELP,
    )
    evaluate.add_argument("--count", type=int, default=200, help="generations (default: 200)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the jobs and of the noise (default: 0)")
    evaluate.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    evaluate.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default: 5.0)")
    evaluate.add_argument("--scale", type=float, default=1.0, help="subject scale (default: 1.0)")
    evaluate.add_argument("--mask-threshold", type=float, help="auto layout threshold (default: off)")
    evaluate.add_argument("--start-step", type=int, default=5, help="auto layout start step (default: 5)")
    evaluate.add_argument(
        "--boxes",
        choices=("given", "none", "whole"),
        default="given",
        help="the boxes the pipeline gets: the samples' (default), none (all zeros) or the whole image each; "
        "subjects are always scored against the samples' boxes",
    )
    evaluate.add_argument("--drop-grounding", action="store_true", help="learned grounding tokens (no phrase/box)")
    evaluate.add_argument(
        "--output",
        type=Path,
        help="keep the run here (images, references, manifest: a bench run folder, resumed when run again with the "
        "same settings; a larger --count adds to it); default: a temporary folder, removed afterwards",
    )
    evaluate.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default: 8)")
    evaluate.add_argument(
        "--by",
        action="append",
        choices=("pattern", "class", "size"),
        default=[],
        help="also report the rates by the identities' pattern kind, by class, or by the box's longer side "
        "(6 px groups) (repeatable)",
    )
    evaluate.add_argument(
        "--json",
        help="also write the summary, its breakdowns by pattern, class and size, the targets and every subject's result to this file",
    )
    evaluate.set_defaults(func=run_evaluate)
    world.set_defaults(func=lambda args: world.print_help() or 2)


def run_build(args) -> int:
    from dataclasses import replace

    from msdiffusion.world.base import snapshot_record
    from msdiffusion.world.recipe import STAGES, RecipeMismatchError, WorldRecipe, build, read_recipe

    stages = STAGES
    if args.stages:
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise UserInputError(f"--stages: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)}).")
    start = time.perf_counter()
    try:
        recipe = read_recipe(args.recipe) if args.recipe else WorldRecipe()
    except (OSError, ValueError, TypeError) as error:
        raise UserInputError(f"--recipe: {error}") from None
    if args.init_base:
        recipe = replace(recipe, base=replace(recipe.base, init_from=args.init_base))
        try:  # found here, not after the data and VAE stages
            snapshot_record(recipe.base)
        except (FileNotFoundError, ValueError) as error:
            raise UserInputError(f"--init-base: {error}") from None
    try:
        timings = build(args.out, recipe, stages=stages, export_to=args.export_to, reuse=args.reuse)
    except RecipeMismatchError as error:
        raise UserInputError(str(error)) from None
    print(
        "stage times (this run): "
        + (", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) or "none, every stage was done already")
    )
    print(f"total {time.perf_counter() - start:.0f} s; all sittings: {Path(args.out) / 'timings.json'}")
    return 0


def run_evaluate(args) -> int:
    import tempfile

    from msdiffusion.bench.runner import BenchSettings
    from msdiffusion.loading import WORLD, named_settings
    from msdiffusion.world.bench import WorldScorer, held_out_samples, run_world_samples, subject_results
    from msdiffusion.world.evaluate import BREAKDOWNS, against_targets, breakdown, summarize
    from msdiffusion.world.weights import world_models, world_pipeline

    if args.count < 1:
        raise UserInputError("--count must be a positive number of generations.")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {args.batch_size}.")
    try:
        paths = world_models(args.models)
    except FileNotFoundError as error:
        raise UserInputError(str(error)) from None
    generation = dict(
        steps=args.steps,
        guidance=args.guidance,
        scale=args.scale,
        mask_threshold=args.mask_threshold,
        start_step=args.start_step,
        drop_grounding=args.drop_grounding,
    )
    models = {part: WORLD if not args.models else paths[part] for part in ("base", "adapter", "image_encoder")}
    settings = BenchSettings(
        **models, **vars(named_settings(WORLD, **generation)), dtype="fp32", seed=args.seed, boxes=args.boxes
    )
    if args.json:  # before minutes of generation, not after
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    samples = held_out_samples(args.count, args.seed)
    scorer = WorldScorer(paths["evaluator"], paths["image_encoder"])
    with tempfile.TemporaryDirectory(prefix="msdiff-world-evaluate-") as scratch:
        try:
            scores = run_world_samples(
                samples,
                args.output or scratch,
                settings,
                lambda: world_pipeline(paths),
                scorer,
                batch_size=args.batch_size,
            )
        except ValueError as error:  # a kept run made with other settings
            raise UserInputError(str(error)) from None
    results = subject_results(scores)
    summary = summarize(results)
    print(
        f"{args.count} held-out generations in {time.perf_counter() - start:.0f} s ({generation}, boxes {args.boxes})"
    )
    print(format_summary(summary))
    breakdowns = {by: breakdown(results, by) for by in BREAKDOWNS}
    for by in dict.fromkeys(args.by):
        print("\n" + format_summary(breakdowns[by], first_column=by))
    targets = against_targets(results)
    print("\n" + format_targets(targets))
    if args.count < 200:
        print(f"(the targets are asked over at least 200 generations; this run made {args.count})")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "settings": {**generation, "boxes": args.boxes, "seed": args.seed},
                    "summary": summary,
                    "by_pattern": breakdowns["pattern"],
                    "by_class": breakdowns["class"],
                    "by_size": breakdowns["size"],
                    "targets": targets,
                    "results": [[r.to_dict() for r in image] for image in results],
                },
                indent=1,
            )
        )
    return 0


def format_summary(summary: dict, first_column: str = "subjects per image") -> str:
    rows = [
        f"| {first_column} | subjects | found (IoU>=0.5) | placed (any shape) | mean IoU | identity correct "
        "| colours only | found and correct | mixing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in summary.items():
        rows.append(
            f"| {name} | {r['subjects']} | {r['found']:.1%} | {r['placed']:.1%} | {r['mean_iou']:.3f} | {r['identity_correct']:.1%} | "
            f"{r['colours_correct']:.1%} | {r['found_and_correct']:.1%} | {r['mixing']:.3f} |"
        )
    return "\n".join(rows)


def format_targets(targets: list[dict]) -> str:
    rows = ["| target | measured | asked | subjects | met |", "| --- | --- | --- | --- | --- |"]
    for t in targets:
        if not t["subjects"]:
            rows.append(f"| {t['target']} | - | {t['asked']:.0%} | 0 | no subjects of this kind were generated |")
            continue
        short = "" if t["met"] else f" ({(t['asked'] - t['measured']) * 100:.1f} points short)"
        rows.append(
            f"| {t['target']} | {t['measured']:.1%} | {t['asked']:.0%} | {t['subjects']} | {'yes' if t['met'] else 'no' + short} |"
        )
    return "\n".join(rows)
