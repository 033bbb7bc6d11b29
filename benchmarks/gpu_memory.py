"""Peak GPU memory (and time) of a generation: bare SDXL against MS-Diffusion, each variant alone.

Every variant runs in a process of its own, so that no other variant's models sit on the GPU, on
SDXL's real architecture with random weights (`sdxl_architecture.py`): 2 subjects in boxes, CFG,
the given size and steps. For each it reports what the models hold once loaded
(`torch.cuda.memory_allocated`), the peak over a whole generation and the peak while denoising
(`torch.cuda.max_memory_allocated`, its counter reset after the first step and read at the last),
and the median time of `--repeats` generations:

- `bare`: SDXL alone;
- `ours`: MS-Diffusion, everything on the GPU;
- `auto`: `ours` with auto layout (0.5 from step 5);
- `encoder-offload`: `ours` with `pipe.enable_image_encoder_offload()` (job field `image_encoder_offload`);
- `cpu-offload`: `ours` with `pipe.enable_model_cpu_offload()` (job field `cpu_offload`, the "small GPU" setting);
- `bare-cpu-offload`: `bare` with `enable_model_cpu_offload()`.

    python benchmarks/gpu_memory.py --shared ../shared                    # 1024 px, fp16, 30 steps
    python benchmarks/gpu_memory.py --device cpu --width-divisor 8 --size 256 --steps 2   # a dry run

On the CPU (a dry run of the script) no memory is measured, only times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("bare", "ours", "auto", "encoder-offload", "cpu-offload", "bare-cpu-offload")


def run_variant(args) -> dict:
    """One variant, measured in this process."""
    import numpy as np
    import PIL.Image
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sdxl_architecture import build_sdxl

    cuda = args.device.startswith("cuda")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    offload = args.variant in ("cpu-offload", "bare-cpu-offload")
    shared = {"shared": args.shared} if args.shared else {}
    # Built on the CPU when offloaded (the offload hooks then move each model when it runs).
    pipe, checkpoint, image_encoder = build_sdxl(args.width_divisor, "cpu" if offload else args.device, dtype, **shared)
    if not args.variant.startswith("bare"):
        pipe.load_ms_adapter(checkpoint, image_encoder=image_encoder)
    if offload:
        pipe.enable_model_cpu_offload(device=args.device)
    elif args.variant == "encoder-offload":
        pipe.enable_image_encoder_offload()
    pipe.set_progress_bar_config(disable=True)
    loaded = torch.cuda.memory_allocated() if cuda else None

    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(2)]
    arguments = dict(
        prompt="a dog and a cat on the beach",
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        height=args.size,
        width=args.size,
        output_type=args.output_type,
    )
    if not args.variant.startswith("bare"):
        arguments.update(
            subject_images=images,
            subject_phrases=["dog", "cat"],
            subject_boxes=[[0.0, 0.25, 0.5, 0.75], [0.5, 0.25, 1.0, 0.75]],
        )
    if args.variant == "auto":
        arguments.update(mask_threshold=0.5, start_step=min(5, args.steps - 1))
    denoising = {}

    def on_step_end(pipeline, step, timestep, tensors):
        if cuda and step == 0:
            torch.cuda.reset_peak_memory_stats()
        if cuda and step == args.steps - 1:
            denoising["peak"] = torch.cuda.max_memory_allocated()
        return tensors

    def generate():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end, **arguments)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else None

    generate()  # warm-up
    runs = [generate() for _ in range(args.repeats)]
    gib = 1024**3
    return {
        "variant": args.variant,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "loaded_gib": None if loaded is None else loaded / gib,
        "peak_gib": None if runs[-1][1] is None else runs[-1][1] / gib,
        "denoising_peak_gib": denoising["peak"] / gib if "peak" in denoising else None,
        "seconds": statistics.median(t for t, _ in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="measure this one variant here (the script's own use)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--width-divisor", type=int, default=1)
    parser.add_argument("--output-type", choices=["np", "latent"], default="np")
    parser.add_argument("--shared", type=Path, default=None, help="folder with sdxl-base/ and the image encoder config")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)), flush=True)
        return

    rows = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--variant", variant]
        for name in ("device", "dtype", "size", "steps", "repeats", "width_divisor", "output_type", "shared"):
            value = getattr(args, name)
            if value is not None:
                command += [f"--{name.replace('_', '-')}", str(value)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"{variant}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", flush=True)
            continue
        rows.append(json.loads(lines[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if not rows:
        return
    print(
        f"\n{rows[0]['device']}, torch {rows[0]['torch']}, CUDA {rows[0]['cuda']}; SDXL architecture at 1/{args.width_divisor} "
        f"width, {args.size}x{args.size}, {args.steps} steps, CFG, {args.dtype}, 2 subjects, output {args.output_type}"
    )
    bare = {row["variant"]: row for row in rows}.get("bare")

    def gib(value):
        return "-" if value is None else f"{value:.2f}"

    print(
        "| variant | loaded (GiB) | peak (GiB) | peak while denoising (GiB) | over bare while denoising | time (s) | time / bare |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        over = "-"
        if bare and row["denoising_peak_gib"] is not None and bare["denoising_peak_gib"] is not None:
            over = f"{row['denoising_peak_gib'] - bare['denoising_peak_gib']:+.2f}"
        ratio = f"{row['seconds'] / bare['seconds']:.3f}" if bare else "-"
        print(
            f"| {row['variant']} | {gib(row['loaded_gib'])} | {gib(row['peak_gib'])} | {gib(row['denoising_peak_gib'])} "
            f"| {over} | {row['seconds']:.2f} | {ratio} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
