"""The paper's design choices measured in the world: one `msdiff bench run --bench world` per ablation.

    python benchmarks/world_ablations.py --out runs/ablations            # every ablation (about 3 min each on 2 cores)
    python benchmarks/world_ablations.py --out runs/ablations --only full no_grounding

Each ablation is an ordinary bench run (144 samples x 2 seeds = 288 generations of held-out
subjects) with the shipped world models, scored by the world's evaluator; runs resume, so the
script can be stopped and started again. It prints one markdown table (docs/world.md keeps it) and
writes it, with the numbers behind it, to OUT/ablations.md and OUT/ablations.json after each run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# name -> (what it is, extra `msdiff bench run` flags)
ABLATIONS = {
    "full": ("the full method: boxes, scale 1.0 (the world's default)", []),
    "base_alone": ("the base alone, text only (scale 0: the image branch adds nothing)", ["--scale", "0"]),
    "no_boxes": ("no boxes, no auto layout (all-zero boxes)", ["--boxes", "none"]),
    "auto_layout_0.3": ("no boxes, auto layout only, threshold 0.3", ["--boxes", "none", "--mask-threshold", "0.3"]),
    "auto_layout_0.5": ("no boxes, auto layout only, threshold 0.5", ["--boxes", "none", "--mask-threshold", "0.5"]),
    "whole_image_boxes": ("every box the whole image (IP-Adapter-like, no layout)", ["--boxes", "whole"]),
    "no_grounding": ("drop_grounding: the resampler without phrase and box", ["--drop-grounding"]),
    "scale_0.4": ("scale 0.4", ["--scale", "0.4"]),
    "scale_0.6": ("scale 0.6 (the release's default)", ["--scale", "0.6"]),
    "first_subject_0.4": ("per-subject scales: the first subject 0.4, the others 1.0", ["--subject-scales", "0.4"]),
    "refs_3_concat": (
        "3 references per subject, tokens from all together (the default)",
        ["--references", "3", "--reference-combine", "concat"],
    ),
    "refs_3_mean": (
        "3 references per subject, each resampled, tokens averaged",
        ["--references", "3", "--reference-combine", "mean"],
    ),
}
COLUMNS = (
    "found",
    "placed",
    "identity_correct",
    "colours_correct",
    "found_and_correct",
    "mixing",
    "mean_iou",
    "subject_clip_i",
)
RATES = ("found", "placed", "identity_correct", "colours_correct", "found_and_correct")


def run(name: str, out: Path, models: str | None) -> dict:
    from msdiffusion.app.bench_commands import SCORES
    from msdiffusion.app.cli import main
    from msdiffusion.bench.definitions import load_benchmark
    from msdiffusion.world.bench import world_tables

    output = out / name
    models_args = ["--models", models] if models else []
    run_args = [
        "bench",
        "run",
        "--bench",
        "world",
        "--output",
        str(output),
        "--photos",
        str(out / "references"),
        "--batch-size",
        "8",
        *models_args,
        *ABLATIONS[name][1],
    ]
    if main(run_args) != 0:
        raise SystemExit(f"{name}: bench run failed")
    if main(["bench", "score", "--output", str(output), *models_args]) != 0:
        raise SystemExit(f"{name}: bench score failed")
    scores = [json.loads(line) for line in (output / SCORES).read_text().splitlines() if line.strip()]
    return world_tables(scores, load_benchmark("world").groups)


def table(results: dict[str, dict]) -> str:
    head = "| ablation | images | found (IoU>=0.5) | placed (any shape) | identity correct | colours only | found and correct | mixing | mean IoU | subject CLIP-I | found, 4 subjects |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, tables in results.items():
        row = tables["overall"]
        four = tables["subject_counts"].get("4 subjects", {}).get("found", float("nan"))
        cells = [f"{row[k]:.1%}" if k in RATES else f"{row[k]:.3f}" for k in COLUMNS]
        lines.append(f"| {name}: {ABLATIONS[name][0]} | {row['images']} | " + " | ".join(cells) + f" | {four:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"), help="one bench run folder per ablation")
    parser.add_argument("--only", nargs="+", choices=list(ABLATIONS), help="a subset of the ablations")
    parser.add_argument("--models", help="a folder laid out as the shipped world weights (default: the shipped ones)")
    args = parser.parse_args()
    results = {}
    for name in args.only or ABLATIONS:
        results[name] = run(name, args.out, args.models)
        # after every run, so that a stopped script leaves the table of what it finished
        (args.out / "ablations.json").write_text(json.dumps(results, indent=1))
        (args.out / "ablations.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
