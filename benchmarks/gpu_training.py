"""Training measured: `msdiff train` on SDXL's real architecture, batch 1, 4 and 8, with and without
activation checkpointing and the feature cache.

The models are SDXL's and ViT-bigG's architectures with random weights (`sdxl_architecture.py`),
saved to folders once (`--work`), as a user's would be found; the data is `--samples` generated
pictures of two subjects each, at the training resolution, with a manifest and (for the cached
variants) a feature cache made by `msdiff data cache`. Each variant is one `msdiff train` process of
`--steps` steps, logged twice: the second half's log line (after the first steps' warm-up) gives
samples/s, the data-loading wait and peak memory. Printed per variant: samples/s, seconds per step,
the part of a step the GPU works (the step less the wait for data), peak GPU memory next to the
static estimate of `train_memory.py`, and what the paper's run (120k steps at batch 8) would take.

Variants are named `b<batch>[-ckpt][-cache]`: `b8-ckpt-cache` is batch 8 with activation
checkpointing, reading the feature cache.

    python benchmarks/gpu_training.py --shared ../shared --work /tmp/train-bench           # 1024 px, bf16, on the GPU
    python benchmarks/gpu_training.py --models tiny --device cpu --resolution 64 --steps 2 \\
        --variants b1,b2-ckpt-cache                                                        # a dry run of the script
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

HERE = Path(__file__).resolve().parent
DEFAULT_VARIANTS = "b1,b1-ckpt,b4,b4-ckpt,b8-ckpt,b1-cache,b4-ckpt-cache,b8-ckpt-cache,b8-cache"
VARIANT = re.compile(r"b(?P<batch>\d+)(?P<ckpt>-ckpt)?(?P<cache>-cache)?")
# The loop's log line (train/loop.py `_log`).
LOG_LINE = re.compile(
    r"step (?P<step>\d+): loss \S+, lr \S+, (?P<rate>[\d.]+) samples/s, data wait (?P<wait>\d+)%, (?P<memory>.*)"
)
PAPER_STEPS, PAPER_BATCH = 120_000, 8


def save_models(args, folder: Path) -> dict[str, Path]:
    """The base (a diffusers folder) and the image encoder (a transformers folder), written once."""
    paths = {"base": folder / "base", "image_encoder": folder / "image_encoder"}
    if all((path / "done").is_file() for path in paths.values()):
        return paths
    if args.models == "tiny":
        from msdiffusion.tiny import save_tiny_models

        saved = save_tiny_models(folder)
        paths = {name: saved[name] for name in paths}
    else:
        import torch
        from diffusers import StableDiffusionXLPipeline

        sys.path.insert(0, str(HERE))
        from sdxl_architecture import build_sdxl

        started = time.perf_counter()
        pipe, _, image_encoder = build_sdxl(args.width_divisor, args.device, torch.bfloat16, shared=args.shared)
        names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
        components = {name: getattr(pipe, name) for name in names}  # SDXL's own folder, without the adapter
        StableDiffusionXLPipeline(**components).save_pretrained(paths["base"])
        image_encoder.save_pretrained(paths["image_encoder"])
        del pipe, image_encoder
        print(f"models made and saved in {time.perf_counter() - started:.0f} s", flush=True)
    for path in paths.values():
        (path / "done").write_text("")
    return paths


def write_data(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` JPEG pictures of a dog and a cat (coloured shapes on a noisy ground) and their manifest;
    the references are crops of the pictures themselves."""
    manifest = folder / "manifest.jsonl"
    if manifest.is_file() and len(manifest.read_text().splitlines()) == count:
        return manifest
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(count):
        ground = rng.integers(40, 200, (size // 8, size // 8, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(ground).resize((size, size), PIL.Image.BILINEAR)
        draw = PIL.ImageDraw.Draw(image)
        subjects = []
        for j, phrase in enumerate(("dog", "cat")):
            x0, x1 = (0.05 + 0.5 * j + rng.uniform(0, 0.05)), (0.45 + 0.5 * j - rng.uniform(0, 0.05))
            y0, y1 = rng.uniform(0.1, 0.3), rng.uniform(0.7, 0.9)
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            draw.ellipse([x0 * size, y0 * size, x1 * size, y1 * size], fill=colour)
            box = [round(v, 4) for v in (x0, y0, x1, y1)]
            subjects.append({"phrase": phrase, "box": box, "reference": {"image": f"images/{k:04d}.jpg", "crop": box}})
        image.save(folder / "images" / f"{k:04d}.jpg", quality=90)
        lines.append(json.dumps({"image": f"images/{k:04d}.jpg", "caption": "a dog and a cat on the grass", "subjects": subjects}))  # fmt: skip
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run(command: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """Run `command`, its output to `log`; (exit status or None on timeout, the output)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = None
        output = "".join(
            part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
            for part in (expired.stdout, expired.stderr)
        )
    log.write_text(output)
    return status, output


def measure(args, name: str, models: dict[str, Path], manifest: Path, cache: Path | None) -> dict:
    """One variant, one `msdiff train` process; its last log line's figures."""
    match = VARIANT.fullmatch(name)
    batch, checkpointing = int(match["batch"]), bool(match["ckpt"])
    output_dir = args.work / "runs" / name
    shutil.rmtree(output_dir, ignore_errors=True)  # a measurement, not a run to continue: start it afresh
    command = [
        sys.executable, "-m", "msdiffusion", "train",
        "--base", str(models["base"]), "--image-encoder", str(models["image_encoder"]),
        "--manifest", str(manifest), "--resolution", str(args.resolution), "--no-buckets",
        "--train-batch-size", str(batch), "--max-train-steps", str(args.steps),
        "--log-every", str(max(1, args.steps // 2)), "--mixed-precision", args.mixed_precision,
        "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing",
        "--dataloader-workers", str(args.workers), "--checkpointing-steps", "0", "--validation-steps", "0",
        "--report-to", "none", "--output-dir", str(output_dir),
    ]  # fmt: skip
    if cache is not None:
        command += ["--cache", str(cache)]
    started = time.perf_counter()
    status, output = run(command, args.variant_timeout, args.work / f"{name}.log")
    row = {"variant": name, "batch": batch, "checkpointing": checkpointing, "cache": cache is not None}
    row["wall_s"] = round(time.perf_counter() - started, 1)
    if status != 0:
        out_of_memory = "out of memory" in output.lower()
        row["error"] = "out of memory" if out_of_memory else ("timed out" if status is None else f"exit {status}")
        if not out_of_memory:
            print("\n".join(output.splitlines()[-15:]), file=sys.stderr)
        return row
    lines = [m for m in map(LOG_LINE.search, output.splitlines()) if m]
    if not lines:
        row["error"] = "no log line"
        return row
    last = lines[-1]
    rate, wait = float(last["rate"]), int(last["wait"]) / 100
    memory = dict(re.findall(r"(peak_\w+_gb) ([\d.]+)", last["memory"]))
    step_s = batch / rate
    row.update(
        samples_per_s=rate,
        step_s=step_s,
        working_s=step_s * (1 - wait),  # the step less the wait for data
        data_wait=wait,
        peak_gpu_gb=float(memory["peak_gpu_memory_gb"]) if "peak_gpu_memory_gb" in memory else None,
        peak_host_gb=float(memory["peak_host_memory_gb"]),
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=HERE.parents[1] / "shared")
    parser.add_argument("--work", type=Path, default=Path("train-bench"), help="models, data, runs and logs")
    parser.add_argument("--models", choices=("sdxl", "tiny"), default="sdxl")
    parser.add_argument("--width-divisor", type=int, default=1, help="SDXL's widths divided by this (1: the real one)")
    parser.add_argument("--device", default="cuda", help="where the models are made before saving")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--mixed-precision", default="bf16")
    parser.add_argument("--steps", type=int, default=12, help="per variant; the second half is measured")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--variant-timeout", type=float, default=240)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.variants.split(",")
    for name in names:
        if not VARIANT.fullmatch(name):
            parser.error(f"--variants: {name!r} is not b<batch>[-ckpt][-cache] (e.g. b8-ckpt-cache)")
    args.work.mkdir(parents=True, exist_ok=True)

    models = save_models(args, args.work / "models")
    manifest = write_data(args.work / "data", args.samples, args.resolution)
    cache = None
    if any(VARIANT.fullmatch(n)["cache"] for n in names):
        cache = args.work / "cache"
        command = [
            sys.executable, "-m", "msdiffusion", "data", "cache", str(manifest), "--out", str(cache),
            "--base", str(models["base"]), "--image-encoder", str(models["image_encoder"]),
            "--reference-size", str(args.resolution), "--device", args.device,
        ]  # fmt: skip
        started = time.perf_counter()
        status, output = run(command, args.variant_timeout, args.work / "cache.log")
        if status != 0:
            print("\n".join(output.splitlines()[-15:]), file=sys.stderr)
            return 1
        print(f"feature cache of {args.samples} samples made in {time.perf_counter() - started:.0f} s", flush=True)

    estimate = None
    if args.models == "sdxl" and args.width_divisor == 1:
        sys.path.insert(0, str(HERE))
        from train_memory import static_memory

        estimate = static_memory(args.shared)
    rows = []
    print(
        "| variant | samples/s | s/step | working s/step | data wait | peak GPU GiB | static estimate GiB | peak host GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        row = measure(args, name, models, manifest, cache if VARIANT.fullmatch(name)["cache"] else None)
        if estimate is not None:
            row["static_estimate_gb"] = estimate["cached" if row["cache"] else "default"] / 1024**3
        rows.append(row)
        if "error" in row:
            print(f"| {name} | {row['error']} ({row['wall_s']} s) | | | | | | |", flush=True)
            continue
        gpu = "-" if row["peak_gpu_gb"] is None else f"{row['peak_gpu_gb']:.1f}"
        static = f"{row['static_estimate_gb']:.1f}" if "static_estimate_gb" in row else "-"
        print(
            f"| {name} | {row['samples_per_s']:.3g} | {row['step_s']:.3g} | {row['working_s']:.3g} | "
            f"{100 * row['data_wait']:.0f}% | {gpu} | {static} | {row['peak_host_gb']:.1f} |",
            flush=True,
        )
    for row in rows:
        if row["batch"] == PAPER_BATCH and "error" not in row:
            hours = PAPER_STEPS * row["step_s"] / 3600
            print(
                f"{row['variant']}: the paper's {PAPER_STEPS:,} steps at batch {PAPER_BATCH} per GPU take {hours:.0f} h at "
                f"this rate; on 16 GPUs (DDP, batch {PAPER_BATCH} each) about as long per GPU plus the gradient "
                "all-reduce of the trainable weights, not measured on one GPU."
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all("error" not in row or row["error"] == "out of memory" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
