"""Tables (markdown + JSON) and image grids from a scored benchmark run.

Metrics per group (MS-Bench combination type, DreamBench live/object) and overall, averaged over images:
- `clip_t`, `clip_i`, `dino`: whole-image scores as in the paper;
- `detection_rate`: fraction of foreground subjects the detector found;
- `layout_iou`: IoU of each foreground subject's detection with its requested box (a miss counts 0);
- `subject_clip_i`, `subject_dino`: the detected crop against the subject's references (a miss counts 0).
Background subjects (boxes covering the whole image) count in the whole-image scores only.
A benchmark registered with its own report (the world's) writes that instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from ..atomic import atomic_path, write_text_atomic
from .definitions import DATA_DIR, REPORTERS, check_images, load_benchmark
from .runner import RUN_CONFIG, read_run_manifest, write_json_atomic
from .scoring import is_background

METRICS = {
    "clip_t": "CLIP-T",
    "clip_i": "CLIP-I",
    "dino": "DINO",
    "detection_rate": "detected",
    "layout_iou": "layout IoU",
    "subject_clip_i": "subject CLIP-I",
    "subject_dino": "subject DINO",
}
THUMBNAIL = 192
MAX_LISTED = 10  # missing references named in report.md


def read_scores(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "scores.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def image_metrics(score: dict) -> dict[str, float | None]:
    """One image's metrics; per-subject ones are None when the image has no foreground subject."""
    foreground = [s for s in score["subjects"] if not s["background"]]
    metrics: dict[str, float | None] = {"clip_t": score["clip_t"], "clip_i": score["clip_i"], "dino": score["dino"]}
    if foreground:
        metrics["detection_rate"] = sum(bool(s["detected"]) for s in foreground) / len(foreground)
        metrics["layout_iou"] = sum(s["iou"] for s in foreground) / len(foreground)
        metrics["subject_clip_i"] = sum(s["crop_clip_i"] or 0.0 for s in foreground) / len(foreground)
        metrics["subject_dino"] = sum(s["crop_dino"] or 0.0 for s in foreground) / len(foreground)
    else:
        metrics.update(detection_rate=None, layout_iou=None, subject_clip_i=None, subject_dino=None)
    return metrics


def aggregate(scores: list[dict]) -> dict:
    """Mean of each metric over the images that have it, per group and overall."""

    def mean_of(rows: list[dict]) -> dict:
        out: dict = {"images": len(rows)}
        for key in METRICS:
            values = [r[key] for r in rows if r[key] is not None]
            out[key] = sum(values) / len(values) if values else None
        return out

    per_image = [(score["group"], image_metrics(score)) for score in scores]
    groups = list(dict.fromkeys(group for group, _ in per_image))
    return {
        "groups": {group: mean_of([m for g, m in per_image if g == group]) for group in groups},
        "overall": mean_of([m for _, m in per_image]),
    }


def paper_figures(benchmark: str) -> dict | None:
    return json.loads((DATA_DIR / "paper_results.json").read_text()).get(benchmark)


def coverage(output_dir: Path, benchmark_key: str, scores: list[dict], images_dir: Path | None = None) -> dict:
    """How much of the benchmark this run covers, and why the rest may be missing."""
    benchmark = load_benchmark(benchmark_key)
    images_dir = Path(images_dir or json.loads((Path(output_dir) / RUN_CONFIG).read_text())["images_dir"])
    out = {
        "benchmark_samples": len(benchmark.samples),
        "scored_images": len(scores),
        "scored_samples": len({s["sample_id"] for s in scores}),
        "images_dir": str(images_dir),
    }
    if benchmark_key in REPORTERS:  # its references are rendered by `run`, never missing
        out["buildable_samples"] = len(benchmark.samples)
        out["missing_references"] = {}
    elif images_dir.is_dir():
        availability = check_images(benchmark.samples, images_dir)
        out["buildable_samples"] = len(availability.buildable)
        out["missing_references"] = {source: len(samples) for source, samples in availability.missing_sources.items()}
    return out


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(name: str, table: dict, cover: dict, paper: dict | None, config: dict) -> str:
    lines = [f"# {name} results", ""]
    lines.append(
        f"{cover['scored_images']} images of {cover['scored_samples']} samples scored; the full benchmark has "
        f"{cover['benchmark_samples']} samples."
    )
    if "buildable_samples" in cover:
        lines.append(f"{cover['buildable_samples']} of them can be built from `{cover['images_dir']}`.")
        missing = list(cover["missing_references"].items())
        for source, count in missing[:MAX_LISTED]:
            lines.append(f"- missing reference `{source}`: {count} samples cannot be built")
        if len(missing) > MAX_LISTED:
            lines.append(f"- and {len(missing) - MAX_LISTED} more missing references (all listed in report.json)")
    lines.append("")
    header = "| group | images | " + " | ".join(METRICS.values()) + " |"
    lines += [header, "|" + "---|" * (len(METRICS) + 2)]
    for group, row in table["groups"].items():
        lines.append(f"| {group} | {row['images']} | " + " | ".join(_fmt(row[k]) for k in METRICS) + " |")
    overall = table["overall"]
    lines.append(f"| **overall** | {overall['images']} | " + " | ".join(_fmt(overall[k]) for k in METRICS) + " |")
    if paper:
        lines.append(
            f"| paper: {paper['method']} | | " + " | ".join(_fmt(paper["metrics"].get(k)) for k in METRICS) + " |"
        )
    lines.append("")
    if paper:
        lines.append(f"Paper figures: {paper['source']}. They compare only with a full run at the paper's settings.")
    else:
        lines.append("No published figure for this benchmark could be verified, so no paper row is shown.")
    lines += [
        "",
        (
            "Overall values are means over images. Detection-based columns count foreground subjects only; a subject "
            "the detector did not find counts 0 in layout IoU and subject scores."
        ),
        "",
        "Scoring models: " + ", ".join(f"{k} `{v}`" for k, v in config.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _draw_boxes(image: PIL.Image.Image, boxes, colour: str) -> None:
    draw = PIL.ImageDraw.Draw(image)
    width, height = image.size
    for box in boxes:
        draw.rectangle(
            [box[0] * width, box[1] * height, box[2] * width - 1, box[3] * height - 1], outline=colour, width=3
        )


def grid(
    run_dir: Path, scores: list[dict], manifest: dict[str, dict], images_dir: Path | None = None
) -> PIL.Image.Image:
    """One row per image: its references, then the image with requested boxes (green) and detections (red)."""
    from msdiffusion.subjects import load_image

    columns = max(len(score["subjects"]) for score in scores) + 1
    canvas = PIL.Image.new("RGB", (columns * THUMBNAIL, len(scores) * THUMBNAIL), "white")
    for row, score in enumerate(scores):
        record = manifest[score["image"]]
        root = Path(images_dir or record["images_dir"])
        for column, subject in enumerate(record["subjects"]):
            reference = load_image(root / subject["reference"]).resize((THUMBNAIL, THUMBNAIL))
            canvas.paste(reference, (column * THUMBNAIL, row * THUMBNAIL))
        image = load_image(run_dir / score["image"]).resize((THUMBNAIL, THUMBNAIL))
        _draw_boxes(image, [s["box"] for s in score["subjects"] if not is_background(s["box"])], "lime")
        _draw_boxes(image, [s["detection"] for s in score["subjects"] if s.get("detection")], "red")
        canvas.paste(image, ((columns - 1) * THUMBNAIL, row * THUMBNAIL))
    return canvas


def write_report(output_dir: Path, grid_samples: int = 8, images_dir: Path | None = None) -> list[Path]:
    """Write report.md, report.json and grids/<group>.png into the run directory; returns their paths.
    `images_dir` replaces the subject photo directory recorded by the run (if it moved)."""
    output_dir = Path(output_dir)
    scores = read_scores(output_dir)
    if not scores:
        raise ValueError(f"{output_dir / 'scores.jsonl'} is empty: nothing was scored.")
    manifest = {record["image"]: record for record in read_run_manifest(output_dir)}
    benchmark_key = manifest[scores[0]["image"]]["benchmark"]
    benchmark = load_benchmark(benchmark_key)
    scores_config_path = output_dir / "scores_config.json"
    scoring_config = json.loads(scores_config_path.read_text()) if scores_config_path.is_file() else {}

    table = aggregate(scores)
    cover = coverage(output_dir, benchmark_key, scores, images_dir)
    paper = paper_figures(benchmark_key)
    # groups in the benchmark's own order
    order = {group: i for i, group in enumerate(benchmark.groups)}
    table["groups"] = dict(sorted(table["groups"].items(), key=lambda item: order.get(item[0], len(order))))

    paths = [output_dir / "report.json", output_dir / "report.md"]
    if benchmark_key in REPORTERS:
        metrics, tables_and_markdown = REPORTERS[benchmark_key]
        tables, text = tables_and_markdown(benchmark, scores, cover, scoring_config)
        report = {
            "benchmark": benchmark.name,
            "metrics": metrics,
            "coverage": cover,
            "scoring": scoring_config,
            **tables,
        }
        write_json_atomic(paths[0], report)
        write_text_atomic(paths[1], text)
    else:
        report = {
            "benchmark": benchmark.name,
            "metrics": METRICS,
            "coverage": cover,
            "scoring": scoring_config,
            **table,
        }
        if paper:
            report["paper"] = paper
        write_json_atomic(paths[0], report)
        write_text_atomic(paths[1], markdown(benchmark.name, table, cover, paper, scoring_config))

    if grid_samples:
        (output_dir / "grids").mkdir(exist_ok=True)
        for group in table["groups"]:
            chosen = [s for s in sorted(scores, key=lambda s: s["image"]) if s["group"] == group and s["index"] == 0]
            if chosen:
                path = output_dir / "grids" / f"{group}.png"
                with atomic_path(path) as tmp:
                    grid(output_dir, chosen[:grid_samples], manifest, images_dir).save(tmp)
                paths.append(path)
    return paths
