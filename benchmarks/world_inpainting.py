"""Subjects put into a picture, measured in the procedural world (issue 39).

Each sample is a background scene of the world (no subject in it) and two held-out subjects, with
their boxes from a real rendering. Every sample is generated four ways with the same seed: drawn
from noise (text-to-image) or repainted into the background (`inpaint: subjects`, the picture
pasted back outside the grown regions), each with the subjects' boxes or with ellipses inscribed
in those boxes as their masks (the resampler then reads the same box; only where the subject's
tokens act differs). A fifth run repaints without the paste (`keep_outside=False`), as diffusers'
inpainting returns it.

The world's evaluator scores every subject: found (its class, in its box), identity (colours and
pattern) and colours only. For the repainted runs, the mean absolute difference (0-255) between
the output and the background outside the repainted part says how much of the picture was kept;
the background's own VAE round trip is given beside it, for scale.

    python benchmarks/world_inpainting.py --count 200
    python benchmarks/world_inpainting.py --count 200 --json results.json --examples outputs/inpainting

`--examples FOLDER` also writes the first sample's background, references and a job file that
`msdiff generate FOLDER/job.yaml` runs (the README's picture comes from it; `--count 0` writes only those).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from msdiffusion.world.weights import MODELS_HELP

ELLIPSE_POINTS = 32


def ellipse(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The ellipse inscribed in a box, as a polygon of (x, y) fractions."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    angles = [2 * math.pi * k / ELLIPSE_POINTS for k in range(ELLIPSE_POINTS)]
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def score(evaluator, images: np.ndarray, samples: list[dict]) -> dict:
    """The evaluator's rates over every subject of `images` (N, H, W, 3 uint8), and the share inside the ellipse."""
    from msdiffusion.world.evaluate import AskedSubject, summarize

    maps = evaluator.class_maps(images)
    results = []
    for image, class_map, sample in zip(images, maps, samples):
        asked = [AskedSubject(x["cls"], x["identity"], x["box"]) for x in sample["subjects"]]
        results.append(evaluator.evaluate(image, asked, class_map))
    rates = summarize(results)["all"]
    keys = ("subjects", "found", "found_and_correct", "identity_correct", "colours_correct", "placed", "mean_iou")
    return {**{key: rates[key] for key in keys}, "inside_ellipse": inside_ellipse(maps, samples)}


def inside_ellipse(class_maps: np.ndarray, samples: list[dict]) -> float:
    """Of the pixels of each subject's class near its box (the box grown by a quarter), the share inside
    the ellipse inscribed in the box: near 1 when the drawing keeps to the ellipse, lower when it fills the box."""
    from msdiffusion.subjects import rasterise_polygon
    from msdiffusion.world.scenes import CLASSES

    inside = total = 0
    size = class_maps.shape[-1]
    for class_map, sample in zip(class_maps, samples):
        for subject in sample["subjects"]:
            x0, y0, x1, y1 = subject["box"]
            grow_x, grow_y = (x1 - x0) / 4, (y1 - y0) / 4
            near = np.zeros((size, size), dtype=bool)
            rows = slice(max(0, int((y0 - grow_y) * size)), int(np.ceil((y1 + grow_y) * size)))
            cols = slice(max(0, int((x0 - grow_x) * size)), int(np.ceil((x1 + grow_x) * size)))
            near[rows, cols] = True
            drawn = near & (class_map == 1 + CLASSES.index(subject["cls"]))
            region = rasterise_polygon(ellipse(subject["box"]), size, size).numpy()
            inside += int((drawn & region).sum())
            total += int(drawn.sum())
    return inside / max(total, 1)


def make_samples(count: int, seed: int) -> list[dict]:
    """Background pictures, two held-out subjects each (class, identity, box, reference), captions."""
    from msdiffusion.world.scenes import (
        BACKGROUNDS,
        caption_for,
        draw_background,
        random_subjects,
        render_reference,
        render_scene,
    )

    samples = []
    for i in range(count):
        rng = np.random.default_rng([seed, 39, i])
        kind = str(rng.choice(list(BACKGROUNDS)))
        scene = render_scene(rng, random_subjects(rng, 2, held_out=True), background=kind)
        background = draw_background(BACKGROUNDS[kind], np.random.default_rng([seed, 40, i])).round().astype(np.uint8)
        subjects = [
            {
                "cls": s.cls,
                "identity": s.identity,
                "box": tuple(float(v) for v in s.box),
                "reference": render_reference(rng, s.cls, s.identity)[0],
            }
            for s in scene.subjects
        ]
        caption = caption_for([s["cls"] for s in subjects], kind)
        samples.append(
            {
                "background": background,
                "subjects": subjects,
                "caption": caption,
                "seed": seed * 100_000 + i,
                "rendering": scene.image,
            }
        )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help=MODELS_HELP)
    parser.add_argument(
        "--count", type=int, default=200, help="samples (images per run); 0 with --examples: only those"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the table's figures here")
    parser.add_argument("--examples", type=Path, help="write the first sample's pictures and a job file here")
    args = parser.parse_args()

    import PIL.Image
    import torch

    from msdiffusion import MSDiffusionXLInpaintPipeline
    from msdiffusion.loading import WORLD, named_settings
    from msdiffusion.world.evaluate import WorldEvaluator, vae_round_trip
    from msdiffusion.world.weights import world_models, world_pipeline

    if args.examples:
        write_examples(make_samples(1, args.seed)[0], args.examples)
    if args.count == 0:
        return
    paths = world_models(args.models)
    evaluator = WorldEvaluator.from_file(paths["evaluator"])
    pipe = world_pipeline(paths)
    inpaint = MSDiffusionXLInpaintPipeline.from_pipe(pipe)
    for pipeline in (pipe, inpaint):
        pipeline.set_progress_bar_config(disable=True)
    settings = named_settings(WORLD).pipeline_arguments()
    samples = make_samples(args.count, args.seed)

    runs = {
        "text-to-image, boxes": (pipe, False, {}),
        "text-to-image, ellipse masks": (pipe, True, {}),
        "inpaint: subjects, boxes": (inpaint, False, {}),
        "inpaint: subjects, ellipse masks": (inpaint, True, {}),
        "inpaint: subjects, boxes, no paste": (inpaint, False, {"keep_outside": False}),
    }
    backgrounds = np.stack([s["background"] for s in samples])
    with torch.no_grad():
        pixels = torch.from_numpy(backgrounds).permute(0, 3, 1, 2).float() / 127.5 - 1
        round_trip = ((vae_round_trip(pipe.vae, pixels) + 1) * 127.5).clamp(0, 255).round()
    round_trip = round_trip.permute(0, 2, 3, 1).numpy()

    figures: dict[str, dict] = {}
    # The real renderings of the same scenes, scored the same way: what a perfect model would get.
    renderings = np.stack([s["rendering"] for s in samples])
    figures["real renderings (the ceiling)"] = score(evaluator, renderings, samples)
    print("real renderings", json.dumps(figures["real renderings (the ceiling)"]), flush=True)
    kept_regions = {}  # by region kind: where the paste keeps the picture, per sample
    for name, (pipeline, masks, extra) in runs.items():
        started = time.perf_counter()
        images, alphas = [], []
        for start in range(0, len(samples), args.batch):
            batch = samples[start : start + args.batch]
            arguments = dict(
                settings,
                prompt=[s["caption"] for s in batch],
                subject_images=[[PIL.Image.fromarray(x["reference"]) for x in s["subjects"]] for s in batch],
                subject_phrases=[[x["cls"] for x in s["subjects"]] for s in batch],
                subject_boxes=[[x["box"] for x in s["subjects"]] for s in batch],
                generator=[torch.Generator().manual_seed(s["seed"]) for s in batch],
                output_type="np",
                **extra,
            )
            if masks:
                arguments["subject_masks"] = [[ellipse(x["box"]) for x in s["subjects"]] for s in batch]
            if pipeline is inpaint:
                arguments["image"] = [PIL.Image.fromarray(s["background"]) for s in batch]
                del arguments["height"], arguments["width"]  # the picture's own size
            out = pipeline(**arguments)
            images.append((out.images * 255).round().astype(np.uint8))
            if out.repaint_masks is not None:
                alphas.append(out.repaint_masks[:, 0].numpy())
        images = np.concatenate(images)
        row = score(evaluator, images, samples)
        if pipeline is inpaint:
            if alphas:
                kept_regions[masks] = np.concatenate(alphas) == 0
            outside = kept_regions[masks]  # a run without the paste: the same region's outside
            difference = np.abs(images.astype(np.float32) - backgrounds.astype(np.float32)).mean(-1)
            row["kept_fraction"] = float(outside.mean())
            row["outside_mad"] = float(difference[outside].mean())
            row["outside_changed_pixels"] = int((difference[outside] > 0).sum())
            vae = np.abs(round_trip - backgrounds.astype(np.float32)).mean(-1)
            row["vae_round_trip_mad"] = float(vae[outside].mean())
        row["seconds"] = round(time.perf_counter() - started, 1)
        figures[name] = row
        print(name, json.dumps(row), flush=True)

    print()
    print(f"{args.count} samples of 2 held-out subjects (seed {args.seed}); per subject:")
    print(
        "| run | found | found, right identity | identity (pattern) | colours only | box IoU | inside the ellipse "
        "| outside: MAD vs picture | VAE round trip MAD |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in figures.items():
        outside = (
            f"{row['outside_mad']:.2f} ({row['outside_changed_pixels']} px changed)" if "outside_mad" in row else "-"
        )
        vae = f"{row['vae_round_trip_mad']:.2f}" if "vae_round_trip_mad" in row else "-"
        print(
            f"| {name} | {row['found']:.1%} | {row['found_and_correct']:.1%} | {row['identity_correct']:.1%} "
            f"| {row['colours_correct']:.1%} | {row['mean_iou']:.2f} | {row['inside_ellipse']:.1%} | {outside} | {vae} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"count": args.count, "seed": args.seed, "runs": figures}, indent=2) + "\n")


def write_examples(sample: dict, folder: Path) -> None:
    """The sample's background and references, and a job file repainting its subjects into it."""
    import PIL.Image
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(sample["background"]).save(folder / "background.png")
    subjects = []
    for j, subject in enumerate(sample["subjects"]):
        name = f"{subject['cls']}-{subject['identity']}.png"
        PIL.Image.fromarray(subject["reference"]).save(folder / name)
        polygon = [[round(x, 4), round(y, 4)] for x, y in ellipse(subject["box"])] if j == 1 else None
        entry = {"image": name, "phrase": subject["cls"], "box": [round(v, 4) for v in subject["box"]]}
        subjects.append({**entry, **({"mask": polygon} if polygon else {})})
    job = {
        "base": "msdiff-world",
        "adapter": "msdiff-world",
        "image_encoder": "msdiff-world",
        "prompt": sample["caption"],
        "init_image": "background.png",
        "inpaint": "subjects",
        "subjects": subjects,
        "seed": sample["seed"],
        "output": ".",
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False, default_flow_style=None, width=100))


if __name__ == "__main__":
    main()
