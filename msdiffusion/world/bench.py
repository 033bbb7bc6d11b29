"""The world bench: MS-Bench's runner, scoring and report on the procedural world, where the truth is known.

- `expand_world`: the definition (`bench.json`) expanded to samples of held-out identities,
  1 to 4 subjects, with boxes apart, touching or overlapping; `held_out_samples`: samples laid out
  as the training scenes are (`msdiff world evaluate`'s).
- `run_world_samples`: any such samples generated through the bench runner and scored: the one
  path by which the world's images are made and judged.
- `render_references`: the subjects' reference images, rendered deterministically into the run's
  references folder (they are data of the world, not photos anyone has to fetch).
- `WorldScorer` / `score_world_records`: the world's evaluator (found in its box, IoU, identity,
  mixing) and CLIP-I / DINO-style cosines computed with the world's own image encoder.
- `world_tables` / `world_markdown`: the report's rows, per group, per subject count and overall.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image

from msdiffusion.bench.definitions import BenchSample, BenchSubject, register_benchmark

if TYPE_CHECKING:
    import torch

BENCH = "world"
HELD_OUT = "world-held-out"  # `msdiff world evaluate`'s samples (`held_out_samples`)
LAYOUTS = ("apart", "touching", "overlapping")
GAP = 2 / 64  # `apart` boxes keep at least 2 px between them
OVERLAP = 0.3  # `overlapping`: the second box covers this share of the narrower box's extent
WORLD_METRICS = {
    "found": "found (IoU >= 0.5)",
    "placed": "placed (any shape)",
    "mean_iou": "mean IoU",
    "identity_correct": "identity correct",
    "colours_correct": "colours only",
    "found_and_correct": "found and correct",
    "mixing": "mixing",
    "clip_i": "CLIP-I",
    "dino": "DINO",
    "subject_clip_i": "subject CLIP-I",
    "subject_dino": "subject DINO",
}


def _stable_seed(text: str) -> int:
    """A seed from a name (not from its position in the file, so adding a group changes no other group)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def _shape_extent(cls: str, size: float, angle: float) -> tuple[float, float]:
    """Width and height (fractions of the image) of the tight box of a shape drawn alone: the pixels
    `scenes.draw_subject` would mark (2x2 supersampled coverage >= 0.5), without painting them."""
    from msdiffusion.world.scenes import SIZE, mask_box, shape_mask

    half = size / 2
    # only the window the rotated shape can reach (local coordinates within [-1, 1]: radius half * sqrt 2)
    reach = min(SIZE // 2, int(np.ceil(half * 1.42)) + 1)
    ss, side = 2, 2 * reach
    ys, xs = np.mgrid[0 : side * ss, 0 : side * ss].astype(np.float32)
    xs, ys = (xs + 0.5) / ss - reach, (ys + 0.5) / ss - reach
    cos, sin = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    inside = shape_mask(cls, (cos * xs + sin * ys) / half, (-sin * xs + cos * ys) / half)
    mask = inside.reshape(side, ss, side, ss).mean(axis=(1, 3)) >= 0.5
    x0, y0, x1, y1 = mask_box(mask)
    return (x1 - x0) * side / SIZE, (y1 - y0) * side / SIZE


def _separated(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _apart(rng: np.random.Generator, extents: list[tuple[float, float]]) -> list[tuple[float, ...]] | None:
    """Boxes placed one by one at random, none within `GAP` of another (None if they do not fit)."""
    for _ in range(50):
        boxes: list[tuple[float, ...]] = []
        for w, h in extents:
            for _ in range(200):
                x, y = float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h))
                box = (x, y, x + w, y + h)
                if all(_separated(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(extents):
            return boxes
    return None


def _pair(
    rng: np.random.Generator, extents: list[tuple[float, float]], overlap: float
) -> list[tuple[float, ...]] | None:
    """Two boxes side by side (left-right or top-bottom), sharing an edge, or overlapping by `overlap`."""
    (wa, ha), (wb, hb) = extents
    horizontal = bool(rng.random() < 0.5)
    # "along": the axis the pair lines up on; "across": the other one
    along_a, across_a, along_b, across_b = (wa, ha, wb, hb) if horizontal else (ha, wa, hb, wb)
    total = along_a + along_b - overlap * min(along_a, along_b)
    if total > 1:
        return None
    start = float(rng.uniform(0, 1 - total))
    centre_a = float(rng.uniform(across_a / 2, 1 - across_a / 2))
    # the second box's centre near the first's, so that they share most of the touching edge
    centre_b = centre_a + float(rng.uniform(-0.25, 0.25)) * min(across_a, across_b)
    centre_b = min(max(centre_b, across_b / 2), 1 - across_b / 2)
    b_start = start + along_a - overlap * min(along_a, along_b)
    a = (start, centre_a - across_a / 2, start + along_a, centre_a + across_a / 2)
    b = (b_start, centre_b - across_b / 2, b_start + along_b, centre_b + across_b / 2)
    if not horizontal:
        a, b = (a[1], a[0], a[3], a[2]), (b[1], b[0], b[3], b[2])
    return [a, b]


def expand_world(definition: dict) -> list[BenchSample]:
    """Samples of every group: classes, held-out identities, background and boxes drawn from the seed."""
    from msdiffusion.world.scenes import (
        BACKGROUNDS,
        CLASSES,
        MAX_SUBJECTS,
        NUM_IDENTITIES,
        SUBJECT_SIZES,
        caption_for,
        is_held_out,
    )

    held_out = [i for i in range(NUM_IDENTITIES) if is_held_out(i)]
    samples = []
    for group, spec in definition["groups"].items():
        n, layout = int(spec["subjects"]), spec["layout"]
        if not 1 <= n <= MAX_SUBJECTS:
            raise ValueError(f"world bench group {group!r}: subjects must be 1 to {MAX_SUBJECTS}, got {n}.")
        if layout not in LAYOUTS or (layout != "apart" and n != 2):
            raise ValueError(
                f"world bench group {group!r}: layout {layout!r} with {n} subjects; layouts are "
                f"{', '.join(LAYOUTS)} (touching and overlapping take 2 subjects)."
            )
        for k in range(int(spec["samples"])):
            rng = np.random.default_rng([int(definition["seed"]), _stable_seed(group), k])
            identities = [int(i) for i in rng.choice(held_out, size=n, replace=False)]
            if spec.get("same_class"):
                classes = [str(rng.choice(CLASSES))] * n
            else:
                classes = [str(c) for c in rng.choice(CLASSES, size=n, replace=False)]
            background = str(rng.choice(list(BACKGROUNDS)))
            boxes = None
            while boxes is None:  # sizes that do not fit the layout are drawn again
                sizes = rng.uniform(*SUBJECT_SIZES[n], n)  # the training scenes' sizes
                angles = rng.uniform(-15, 15, n)
                extents = [_shape_extent(c, s, a) for c, s, a in zip(classes, sizes, angles)]
                if layout == "apart":
                    boxes = _apart(rng, extents)
                else:
                    boxes = _pair(rng, extents, OVERLAP if layout == "overlapping" else 0.0)
            subjects = tuple(
                BenchSubject(f"{c}-{i}", c, f"{c}-{i}", tuple(round(min(max(v, 0.0), 1.0), 4) for v in box), i)
                for c, i, box in zip(classes, identities, boxes)
            )
            samples.append(BenchSample(BENCH, f"{group}.{k:03d}", group, caption_for(classes, background), subjects))
    return samples


def held_out_samples(count: int, seed: int = 0, subject_counts: Sequence[int] = (1, 2, 3, 4)) -> list[BenchSample]:
    """`count` samples of held-out identities laid out as the training scenes are (`msdiff world
    evaluate`'s), the subject counts taking turns.

    Boxes are the tight boxes of a real rendering of the scene (so they have the shapes' true
    proportions and the training scenes' placement); references are rendered by `render_references`.
    """
    from msdiffusion.world.scenes import BACKGROUNDS, caption_for, random_subjects, render_scene

    samples = []
    for i in range(count):
        rng = np.random.default_rng([seed, 5, i])
        n = subject_counts[i % len(subject_counts)]
        scene = render_scene(rng, random_subjects(rng, n, held_out=True), background=str(rng.choice(list(BACKGROUNDS))))
        subjects = tuple(
            BenchSubject(f"{s.cls}-{s.identity}", s.cls, f"{s.cls}-{s.identity}", tuple(map(float, s.box)), s.identity)
            for s in scene.subjects
        )
        caption = caption_for([s.cls for s in scene.subjects], scene.background)
        samples.append(BenchSample(HELD_OUT, f"{i:04d}", f"{len(subjects)} subjects", caption, subjects))
    return samples


def run_world_samples(
    samples: Sequence[BenchSample],
    output_dir: str | os.PathLike,
    settings,
    pipeline_factory: Callable[[], object],
    scorer: "WorldScorer",
    images_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Generate world samples through the bench runner (resumable in `output_dir`) and score them.

    `settings` is a `BenchSettings`; references missing from `images_dir` (default
    `output_dir/references`) are rendered first. Returns `score_world_records`'s scores, in the
    samples' order.
    """
    from msdiffusion.bench.runner import (
        RUN_CONFIG,
        check_run_config,
        generate_items,
        read_run_manifest,
        work_items,
        write_json_atomic,
        write_manifest,
    )

    output_dir = Path(output_dir)
    images_dir = Path(images_dir) if images_dir is not None else output_dir / "references"
    render_references(samples, images_dir, settings.references, settings.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    benchmark = samples[0].benchmark if samples else HELD_OUT
    write_json_atomic(output_dir / RUN_CONFIG, check_run_config(output_dir, benchmark, settings, images_dir))
    items = work_items(samples, settings.images_per_sample)
    generate_items(items, output_dir, images_dir, settings, pipeline_factory, batch_size, progress)
    write_manifest(output_dir, items, settings, images_dir)
    records = {r["image"]: r for r in read_run_manifest(output_dir)}
    return score_world_records([records[item.image] for item in items], output_dir, scorer, images_dir)


def layout_checks(samples: Sequence[BenchSample]) -> dict[str, int]:
    """How many samples of each layout kind really are apart / touching / overlapping (for tests and `list`)."""
    counts = {"apart": 0, "touching": 0, "overlapping": 0}
    for sample in samples:
        pairs = list(combinations([s.box for s in sample.subjects], 2))
        if not pairs:
            continue
        for a, b in pairs:
            ix = min(a[2], b[2]) - max(a[0], b[0])
            iy = min(a[3], b[3]) - max(a[1], b[1])
            if ix > 1e-6 and iy > 1e-6:
                counts["overlapping"] += 1
                break
            if (abs(ix) <= 1e-6 and iy > 0) or (abs(iy) <= 1e-6 and ix > 0):
                counts["touching"] += 1
                break
        else:
            counts["apart"] += 1
    return counts


# --- references -----------------------------------------------------------------------------------


def render_references(samples: Sequence[BenchSample], directory: Path, per_subject: int, seed: int) -> int:
    """Render the references of `samples` missing from `directory` (`<class>-<identity>/<k>.png`).

    Each is a function of (seed, class, identity, k) alone, so every run, shard and machine renders
    the same pixels. Returns how many files were written."""
    from msdiffusion.world.scenes import CLASSES, render_reference

    directory = Path(directory)
    subjects = {s.source: s for sample in samples for s in sample.subjects}
    written = 0
    for source, subject in subjects.items():
        if subject.identity is None:
            raise ValueError(f"{source}: a world subject needs its identity.")
        folder = directory / source
        for k in range(per_subject):
            path = folder / f"{k}.png"
            if path.is_file():
                continue
            rng = np.random.default_rng([seed, CLASSES.index(subject.phrase), subject.identity, k])
            image, _ = render_reference(rng, subject.phrase, subject.identity)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{k}.{os.getpid()}.tmp"
            PIL.Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, path)  # never a half-written reference
            written += 1
    return written


# --- models ---------------------------------------------------------------------------------------


def scoring_models(run_settings: dict, models: str | os.PathLike | None = None) -> dict[str, str]:
    """The evaluator and image encoder to score a run with: `models` if given, else those the run used."""
    from msdiffusion.loading import WORLD, world_model_paths
    from msdiffusion.world.weights import world_models_folder

    if models is not None:
        return world_models_folder(models)
    if run_settings["image_encoder"] == WORLD:
        return world_model_paths()
    encoder = Path(run_settings["image_encoder"])
    return world_models_folder(encoder.parent)  # a run made with --models: the evaluator sits beside the encoder


def _digest(paths: Sequence[Path]) -> str:
    sha = hashlib.sha256()
    for path in sorted(paths):
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def world_scoring_config(evaluator: str | os.PathLike, image_encoder: str | os.PathLike) -> dict:
    """What scores are computed with: the models' paths and a digest of their contents."""
    encoder_files = [p for p in Path(image_encoder).iterdir() if p.suffix in (".safetensors", ".bin")]
    return {
        "scorer": "world",
        "evaluator": str(Path(evaluator).resolve()),
        "evaluator_sha256": _digest([Path(evaluator)]),
        "image_encoder": str(Path(image_encoder).resolve()),
        "image_encoder_sha256": _digest(encoder_files),
    }


class WorldScorer:
    """The world's evaluator and image encoder, loaded once."""

    def __init__(
        self, evaluator: str | os.PathLike, image_encoder: str | os.PathLike, device: str = "cpu", batch_size: int = 32
    ):
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from msdiffusion.world.evaluate import WorldEvaluator

        self.evaluator = WorldEvaluator.from_file(evaluator)  # a few thousand weights: the CPU is fine
        self.encoder = (
            CLIPVisionModelWithProjection.from_pretrained(image_encoder, dtype=torch.float32).to(device).eval()
        )
        self.processor = CLIPImageProcessor.from_pretrained(image_encoder)
        self.device, self.batch_size = device, batch_size
        self.config = world_scoring_config(evaluator, image_encoder)

    def embed(self, images: Sequence[PIL.Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (projected embedding, final CLS token) of `images`, preprocessed as the pipeline
        preprocesses references (squashed to a square, then the encoder's own processor)."""
        import torch

        from msdiffusion.subjects import prepare_reference_pixels

        clips, dinos = [], []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = prepare_reference_pixels(images[start : start + self.batch_size], self.processor)
                output = self.encoder(pixel_values=pixels.to(self.device))
                clips.append(output.image_embeds.float().cpu())
                dinos.append(output.last_hidden_state[:, 0].float().cpu())
        normalize = torch.nn.functional.normalize
        return normalize(torch.cat(clips), dim=-1), normalize(torch.cat(dinos), dim=-1)


def score_world_records(
    records: Sequence[dict],
    run_dir: Path,
    scorer: WorldScorer,
    images_dir: Path | None = None,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Score world manifest records: the evaluator per subject, cosines per image and per found subject."""
    from msdiffusion.bench.scoring import _load_rgb, _reference_paths, crop, mean_cosine
    from msdiffusion.world.evaluate import AskedSubject

    run_dir = Path(run_dir)
    cache: dict[Path, tuple] = {}
    results = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        for record in chunk:
            if any(s.get("identity") is None for s in record["subjects"]):
                raise ValueError(
                    f"{record['image']}: the manifest gives no identity for its subjects; is it a world run?"
                )
        images = [_load_rgb(run_dir / record["image"]) for record in chunk]
        refs = [_reference_paths(record, images_dir) for record in chunk]
        new = [p for p in dict.fromkeys(p for r in refs for paths in r for p in paths) if p not in cache]
        if new:
            clip, dino = scorer.embed([_load_rgb(p) for p in new])
            cache.update({p: (c, d) for p, c, d in zip(new, clip, dino)})

        sizes = {image.size for image in images}
        arrays = [np.asarray(image) for image in images]
        maps = scorer.evaluator.class_maps(np.stack(arrays)) if len(sizes) == 1 else [None] * len(arrays)
        asked = [[AskedSubject(s["phrase"], s["identity"], tuple(s["box"])) for s in r["subjects"]] for r in chunk]
        evaluated = [scorer.evaluator.evaluate(array, a, m) for array, a, m in zip(arrays, asked, maps)]
        crops, owners = [], []
        for i, results_i in enumerate(evaluated):
            for j, result in enumerate(results_i):
                if result.found_box is not None:
                    crops.append(crop(images[i], result.found_box))
                    owners.append((i, j))
        image_clip, image_dino = scorer.embed(images)
        crop_clip, crop_dino = scorer.embed(crops) if crops else (None, None)
        crop_index = {owner: k for k, owner in enumerate(owners)}

        for i, record in enumerate(chunk):
            subjects = []
            for j, (subject, result) in enumerate(zip(record["subjects"], evaluated[i])):
                clip_refs = [cache[p][0] for p in refs[i][j]]
                dino_refs = [cache[p][1] for p in refs[i][j]]
                entry = {
                    "name": subject["name"],
                    "phrase": subject["phrase"],
                    "identity": subject["identity"],
                    "box": subject["box"],
                    "background": False,
                    "clip_i": mean_cosine(image_clip[i], clip_refs),
                    "dino": mean_cosine(image_dino[i], dino_refs),
                    # the generic columns: "detected" = a region of the class overlaps the box at all
                    "detected": result.found_box is not None,
                    "detection": None if result.found_box is None else [round(v, 4) for v in result.found_box],
                    "iou": result.iou,
                    "found": result.found,
                    "placed": result.placed,
                    "identity_correct": result.identity_correct,
                    "colours_correct": result.colours_correct,
                    "mixing": result.mixing,
                    "crop_clip_i": None,
                    "crop_dino": None,
                }
                if (i, j) in crop_index:
                    k = crop_index[(i, j)]
                    entry["crop_clip_i"] = mean_cosine(crop_clip[k], clip_refs)
                    entry["crop_dino"] = mean_cosine(crop_dino[k], dino_refs)
                subjects.append(entry)
            results.append(
                {
                    "image": record["image"],
                    "sample_id": record["sample_id"],
                    "group": record["group"],
                    "index": record["index"],
                    "clip_t": None,  # the world has no text-image model to measure it with
                    "clip_i": sum(s["clip_i"] for s in subjects) / len(subjects),
                    "dino": sum(s["dino"] for s in subjects) / len(subjects),
                    "subjects": subjects,
                }
            )
        if progress:
            progress(len(chunk))
    return results


# --- the report -----------------------------------------------------------------------------------


def subject_results(scores: Sequence[dict]) -> list[list]:
    """The evaluator's `SubjectResult`s of scored images (`score_world_records`), one list per image."""
    from msdiffusion.world.evaluate import SubjectResult

    if any("placed" not in s for score in scores for s in score["subjects"]):
        raise ValueError("these scores predate the `placed` measure: rescore with `msdiff bench score --overwrite`.")
    if any("colours_correct" not in s for score in scores for s in score["subjects"]):
        raise ValueError(
            "these scores predate the pattern-aware identity judgement: rescore with `msdiff bench score --overwrite`."
        )
    return [
        [
            SubjectResult(
                s["phrase"],
                s["identity"],
                tuple(s["box"]),
                s["found"],
                s["iou"],
                s["identity_correct"],
                s["mixing"],
                None if s["detection"] is None else tuple(s["detection"]),
                s["placed"],
                s["colours_correct"],
            )
            for s in score["subjects"]
        ]
        for score in scores
    ]


def _row(scores: list[dict]) -> dict:
    """The evaluator's rates over subjects (its own `summarize`), cosines: means over images / subjects."""
    from msdiffusion.world.evaluate import summarize

    results = subject_results(scores)
    rates = summarize(results)["all"]
    subjects = [s for score in scores for s in score["subjects"]]
    return {
        "images": len(scores),
        "subjects": rates["subjects"],
        **{
            key: rates[key]
            for key in (
                "found",
                "placed",
                "mean_iou",
                "identity_correct",
                "colours_correct",
                "found_and_correct",
                "mixing",
            )
        },
        "clip_i": float(np.mean([s["clip_i"] for s in scores])),
        "dino": float(np.mean([s["dino"] for s in scores])),
        # a subject the evaluator did not find counts 0, as in MS-Bench's per-subject columns
        "subject_clip_i": float(np.mean([s["crop_clip_i"] or 0.0 for s in subjects])),
        "subject_dino": float(np.mean([s["crop_dino"] or 0.0 for s in subjects])),
    }


def world_tables(scores: list[dict], group_order: Sequence[str]) -> dict:
    """Rows per group (in the definition's order), per number of subjects, and overall."""
    groups = [g for g in group_order if any(s["group"] == g for s in scores)]
    groups += sorted({s["group"] for s in scores} - set(groups))
    counts = sorted({len(s["subjects"]) for s in scores})
    return {
        "groups": {g: _row([s for s in scores if s["group"] == g]) for g in groups},
        "subject_counts": {
            f"{n} subject{'s' if n > 1 else ''}": _row([s for s in scores if len(s["subjects"]) == n]) for n in counts
        },
        "overall": _row(scores),
    }


def _cell(key: str, value: float) -> str:
    if key in ("found", "placed", "identity_correct", "colours_correct", "found_and_correct"):
        return f"{value:.1%}"
    return f"{value:.3f}"


def world_markdown(name: str, tables: dict, cover: dict, config: dict) -> str:
    lines = [
        f"# {name} results",
        "",
        f"{cover['scored_images']} images of {cover['scored_samples']} samples scored; the full benchmark has "
        f"{cover['benchmark_samples']} samples.",
        "",
    ]
    header = "| {} | images | subjects | " + " | ".join(WORLD_METRICS.values()) + " |"
    rule = "|" + "---|" * (len(WORLD_METRICS) + 3)
    for title, rows in (("group", tables["groups"]), ("subjects per image", tables["subject_counts"])):
        lines += [header.format(title), rule]
        for label, row in rows.items():
            cells = " | ".join(_cell(k, row[k]) for k in WORLD_METRICS)
            lines.append(f"| {label} | {row['images']} | {row['subjects']} | {cells} |")
        overall = tables["overall"]
        cells = " | ".join(_cell(k, overall[k]) for k in WORLD_METRICS)
        lines += [f"| **overall** | {overall['images']} | {overall['subjects']} | {cells} |", ""]
    lines += [
        "The evaluator's columns are rates over subjects: found = a region of the subject's class whose box has "
        "IoU >= 0.5 with the box asked for; placed = the same for a region of shapes of any class (the layout obeyed, the shape right or not); identity correct = its colours and pattern are nearer the subject's "
        "identity than every other subject's of the image, a fixed set of training identities and every identity "
        "with the same two colours (other patterns, orientations, the colours swapped); colours only = its colour "
        "histogram alone is nearer the subject's than those of other colours (the pattern may be wrong); mixing = the "
        "share of its pixels in another subject's colours. CLIP-I and DINO are cosines of the world's image "
        "encoder's projected embedding and final CLS token (whole image against each subject's references, "
        "averaged over the image's subjects, then over images); subject CLIP-I / DINO use the found region's "
        "crop (a subject not found counts 0). There is no CLIP-T: the world has no text-image model.",
        "",
        "Scoring models: " + ", ".join(f"{k} `{v}`" for k, v in config.items()) + ".",
        "",
    ]
    return "\n".join(lines)


# --- untrained models, for checking the plumbing -------------------------------------------------


def save_untrained_models(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Random world models in the shipped weights' layout (base/, adapter/, image_encoder/,
    evaluator.safetensors): `--models` for trying the bench's commands before any training.
    Their images are noise and their scores mean nothing."""
    import tempfile

    import torch
    from diffusers import StableDiffusionXLPipeline

    from msdiffusion.adapter import initial_checkpoint
    from msdiffusion.world import models
    from msdiffusion.world.evaluate import Segmenter, save_segmenter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:  # the pipeline saves its own copies of the tokenizers
        tokenizer, tokenizer_2 = models.tokenizers(scratch)
    text_encoder, text_encoder_2 = models.text_encoders(tokenizer)
    unet = models.unet()
    StableDiffusionXLPipeline(
        vae=models.vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=models.scheduler(),
        force_zeros_for_empty_prompt=False,
    ).save_pretrained(directory / "base")
    initial_checkpoint(unet, models.RESAMPLER).save(directory / "adapter")
    torch.manual_seed(seed + 3)  # the recipe's image encoder (random and frozen, seeded as `world build` seeds it)
    models.image_encoder().save_pretrained(directory / "image_encoder")
    models.image_processor().save_pretrained(directory / "image_encoder")
    save_segmenter(Segmenter(), directory / "evaluator.safetensors")
    return directory


def _report(benchmark, scores: list[dict], cover: dict, config: dict) -> tuple[dict, str]:
    tables = world_tables(scores, benchmark.groups)
    return tables, world_markdown(benchmark.name, tables, cover, config)


register_benchmark(BENCH, Path(__file__).with_name("bench.json"), expand_world, WORLD_METRICS, _report)
