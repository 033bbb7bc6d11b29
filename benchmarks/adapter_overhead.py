"""Cost of the MS-Diffusion adapter over bare SDXL, measured in one run.

Times whole generations (text encoding, subject encoding, denoising, VAE decode) on SDXL's real
architecture with random weights (see `sdxl_architecture.py`), interleaving the variants so that
machine noise hits them alike:

- `bare`:  SDXL alone (plain attention processors);
- `ours`:  MS-Diffusion with 2 subjects in boxes (this project's processors);
- `auto`:  `ours` with auto layout (`mask_threshold=0.5, start_step=5`), with `--auto-layout`;
- `prepared`: `ours` with the subjects encoded once beforehand (`pipe.prepare_subjects`, as
           `msdiff generate --images N` does), with `--prepared`: a generation that reuses them;
- `naive`: the same computation written the straightforward way (materialised image-branch
           probabilities, the CFG negative half computed too, masks and image keys/values rebuilt
           at every layer call), a model of the released implementation's structure.

Prints medians and the ratios to bare. `--profile` then profiles one generation per variant
(torch.profiler) and prints host time, GPU kernel time, the attention kernels used, the host time
and operator count per cross-attention call, and the top kernels. `--compile` runs the UNet
through `torch.compile`; `--sync-check` (CUDA) lists the host-device synchronisations inside UNet
calls. Each variant has its own copy of the UNet, set up once (see `pipeline_with`). On CUDA the
CUDA graphs recorded during each timed generation are counted (`--compile-mode reduce-overhead`).
`--breakdown` times the work a generation of ours does outside the denoising loop, part by part,
then profiles the host side of a 1-step generation of bare and ours (cProfile).

    python benchmarks/adapter_overhead.py                       # CPU, fp32, 512 px, quarter width
    python benchmarks/adapter_overhead.py --device cuda --dtype fp16 --size 1024 --width-divisor 1
    python benchmarks/adapter_overhead.py --device cuda --dtype fp16 --size 1024 --width-divisor 1 \
        --steps 30 --repeats 5 --skip-naive --auto-layout --output-type latent --profile
    python benchmarks/adapter_overhead.py --task inpainting --skip-naive      # against diffusers' inpainting
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdxl_architecture import build_sdxl  # noqa: E402

from msdiffusion import MSDiffusionXLPipeline  # noqa: E402
from msdiffusion.attention import MSAttnProcessor, _heads  # noqa: E402
from msdiffusion.layout import box_regions, regions_to_bias  # noqa: E402


class NaiveMSProcessor(MSAttnProcessor):
    """Same weights and result as `MSAttnProcessor`, computed without its shortcuts."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        layout = self.state.layout
        batch, cells, _ = hidden_states.shape
        n_img = layout.num_image_tokens
        text, image = encoder_hidden_states[:, :-n_img], encoder_hidden_states[:, -n_img:]
        q = _heads(attn.to_q(hidden_states), attn.heads)
        out = F.scaled_dot_product_attention(
            q, _heads(attn.to_k(text), attn.heads), _heads(attn.to_v(text), attn.heads)
        )
        boxes = layout.boxes
        if batch == 2 * layout.batch_size:
            boxes = torch.cat([torch.zeros_like(boxes), boxes])
        h, w = self.state.grid(cells)
        bias, inside = regions_to_bias(
            box_regions(boxes, h, w), layout.tokens_per_subject, layout.num_dummy_tokens, q.dtype
        )
        k_ip, v_ip = _heads(self.to_k_ip(image), attn.heads), _heads(self.to_v_ip(image), attn.heads)
        probs = torch.softmax(q @ k_ip.transpose(-1, -2) * attn.scale + bias.to(q.device), dim=-1)
        probs = probs * inside.to(q.device)[:, None]
        out = out + layout.scale * (probs @ v_ip)
        out = out.transpose(1, 2).reshape(batch, cells, -1)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def set_processors(unet, cls):
    processors = {}
    for name, p in unet.attn_processors.items():
        if isinstance(p, MSAttnProcessor):
            twin = cls(p.hidden_size, p.cross_attention_dim, p.state)
            twin.load_state_dict(p.state_dict())
            p = twin.to(p.to_k_ip.weight.device, p.to_k_ip.weight.dtype)
        processors[name] = p
    unet.set_attn_processor(processors)


def cross_attention_hooks(unet) -> list:
    """Mark every `attn2` call as a profiler range named "attn2" (for bare and ours alike)."""
    handles = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            ranges = []

            def enter(module, args, ranges=ranges):
                ranges.append(torch.profiler.record_function("attn2"))
                ranges[-1].__enter__()

            def leave(module, args, output, ranges=ranges):
                ranges.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def profile_generation(name: str, run, unet, device: str, top: int) -> dict:
    """Profile one generation of `run`, print where its host and GPU time goes; returns
    {operator or kernel: (count, host self time s, GPU self time s)} for `compare_profiles`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    handles = cross_attention_hooks(unet)
    try:
        with profile(activities=activities) as prof:
            run()
    finally:
        for handle in handles:
            handle.remove()
    events = prof.events()
    host = sum(e.self_cpu_time_total for e in events) / 1e6
    # device-side events, without the "attn2" ranges, whose device time is that of the kernels inside them
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "attn2"]
    gpu = sum(e.self_device_time_total for e in kernels) / 1e6

    # Operators dispatched from inside cross-attention calls: top-level aten ops under an "attn2" range.
    calls = [e for e in events if e.name == "attn2"]
    ops = 0
    for e in events:
        parent = e.cpu_parent
        if e.name.startswith("aten::") and parent is not None and parent.name == "attn2":
            ops += 1
    attention = {}
    for e in events:
        if "scaled_dot_product" in e.name and e.name.startswith("aten::_"):
            attention[e.name] = attention.get(e.name, 0) + 1
    print(f"  {name}: host (CPU) self time {host:.3f} s" + (f", GPU kernel time {gpu:.3f} s" if kernels else ""))
    if calls:
        per_call = sum(e.cpu_time_total for e in calls) / len(calls)
        print(
            f"    attn2 calls: {len(calls)}, host time {per_call:.0f} us per call, {ops / len(calls):.1f} aten ops per call"
        )
    print("    attention kernels: " + ", ".join(f"{k} x{v}" for k, v in sorted(attention.items())))
    sort = "self_cuda_time_total" if kernels else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=top, max_name_column_width=70)
    print("    " + table.replace("\n", "\n    "))
    return {a.key: (a.count, a.self_cpu_time_total / 1e6, a.self_device_time_total / 1e6) for a in averages}


def compare_profiles(name: str, bare: dict, other: dict, top: int) -> None:
    """The operators and kernels whose host or GPU time differs most between bare and `name`: where
    the variant's extra time goes (the whole-generation totals alone do not say)."""
    rows = []
    for key in bare.keys() | other.keys():
        (nb, hb, gb), (no, ho, go) = bare.get(key, (0, 0.0, 0.0)), other.get(key, (0, 0.0, 0.0))
        rows.append((max(abs(ho - hb), abs(go - gb)), key, nb, no, hb, ho, gb, go))
    rows.sort(reverse=True)
    print(f"  {name} against bare, largest differences (count, host self s, GPU self s; bare -> {name}):")
    for _, key, nb, no, hb, ho, gb, go in rows[:top]:
        print(f"    {key[:60]:60s} {nb:6d} -> {no:6d}   host {hb:7.3f} -> {ho:7.3f}   gpu {gb:7.3f} -> {go:7.3f}")


def sync_check(name: str, run, unet) -> None:
    """Run one generation with CUDA's sync debug mode on during UNet calls; print the synchronising lines."""
    import warnings
    from collections import Counter

    def enter(module, args):
        torch.cuda.set_sync_debug_mode("warn")

    def leave(module, args, output):
        torch.cuda.set_sync_debug_mode("default")

    handles = [unet.register_forward_pre_hook(enter), unet.register_forward_hook(leave)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for handle in handles:
            handle.remove()
    syncs = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    print(
        f"  {name}: {sum(syncs.values())} synchronisations"
        + "".join(f"\n    {n} x {where}" for where, n in syncs.most_common())
    )


def elapsed(fn, synchronize) -> float:
    """Wall-clock seconds of `fn()`, the device's queued work included."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def generation_breakdown(
    pipe, bare, prompt: str, images, phrases, boxes, size: int, synchronize, repeats: int = 10
) -> None:
    """Median time of each part of a generation of ours outside the denoising loop (a fixed cost
    per generation, which CUDA graphs do not remove), then of a whole 1-step generation."""
    from msdiffusion.adapter import ms_attention_state

    device, state = pipe._execution_device, ms_attention_state(pipe.unet)
    prepared = pipe.prepare_subjects(images, phrases, boxes)
    subjects, tokens = prepared.subjects, prepared.tokens.to(pipe.unet.dtype)
    layout = pipe.subject_layout([prompt], subjects, size, size, 0.6, None, 5)

    def activate():
        with state.activate(layout, image_tokens=tokens, tokens_in_hidden_states=False):
            pass

    def one_step(target, **subject_args):
        return lambda: target(
            prompt=prompt, num_inference_steps=1, height=size, width=size, output_type="latent", **subject_args
        )

    parts = {
        "encode_prompt (bare does it too)": lambda: pipe.encode_prompt(
            prompt=[prompt], device=device, do_classifier_free_guidance=True
        ),
        "encode_subjects (references, image encoder, phrases, resampler)": lambda: pipe.encode_subjects(
            subjects, device
        ),
        "subject_layout": lambda: pipe.subject_layout([prompt], subjects, size, size, 0.6, None, 5),
        "state.activate (masks, every layer's keys/values)": activate,
        "a whole 1-step generation, bare": one_step(bare),
        "a whole 1-step generation, ours": one_step(
            pipe, subject_images=images, subject_phrases=phrases, subject_boxes=boxes
        ),
    }
    print(f"outside the denoising loop, median of {repeats} (ms):")
    for name, fn in parts.items():
        fn()
        runs = [elapsed(fn, synchronize) for _ in range(repeats)]
        print(f"  {name:66s} {statistics.median(runs) * 1e3:9.2f}")
    for name in ("bare", "ours"):
        host_profile(f"a 1-step generation, {name}", parts[f"a whole 1-step generation, {name}"], synchronize)


def host_profile(name: str, fn, synchronize, top: int = 25) -> None:
    """cProfile of `fn()`: the Python functions with the most cumulative host time (where a
    generation's fixed cost goes that no single part above names)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    synchronize()
    profiler.enable()
    fn()
    synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    lines = [line for line in text.getvalue().splitlines() if line.strip()][2:]  # from the totals line on
    print(f"host profile of {name} (cProfile, top {top} by cumulative time):\n    " + "\n    ".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="1 or less: no negative branch (few-step LoRAs are run so)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width-divisor", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--skip-naive", action="store_true", help="time only bare and ours (and auto)")
    parser.add_argument("--auto-layout", action="store_true", help="also time ours with auto layout (0.5, step 5)")
    parser.add_argument(
        "--prepared", action="store_true", help="also time ours with the subjects prepared once (pipe.prepare_subjects)"
    )
    parser.add_argument("--profile", action="store_true", help="profile one generation per variant after timing")
    parser.add_argument("--top", type=int, default=12, help="rows of the profiler's kernel table")
    parser.add_argument("--compile", action="store_true", help="pipe.unet = torch.compile(pipe.unet)")
    parser.add_argument("--compile-mode", default=None, help='torch.compile mode, e.g. "max-autotune-no-cudagraphs"')
    parser.add_argument(
        "--sync-check", action="store_true", help="count host-device synchronisations in UNet calls (CUDA)"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="time the parts of a generation outside the denoising loop"
    )
    parser.add_argument("--output-type", choices=["np", "latent"], default="np", help="latent: skip the VAE decode")
    parser.add_argument("--shared", type=Path, default=None, help="folder with sdxl-base/ and the image encoder config")
    parser.add_argument(
        "--task",
        choices=["text-to-image", "image-to-image", "inpainting"],
        default="text-to-image",
        help="image-to-image (strength 0.7) or inpainting (the right half repainted, strength 1) of a random picture: "
        "bare is then diffusers' own image-to-image or inpainting pipeline on the same models",
    )
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    start = time.perf_counter()
    shared = {"shared": args.shared} if args.shared else {}
    pipe, checkpoint, image_encoder = build_sdxl(args.width_divisor, args.device, dtype, **shared)
    print(f"built the models on {args.device} in {time.perf_counter() - start:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(2)]
    common = dict(
        prompt="a dog and a cat on the beach",
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.size,
        width=args.size,
        output_type=args.output_type,
    )
    subjects = dict(
        subject_images=images,
        subject_phrases=["dog", "cat"],
        subject_boxes=[[0.0, 0.25, 0.5, 0.75], [0.5, 0.25, 1.0, 0.75]],
    )

    # One pipeline per kind of processor, each with its own copy of the same UNet weights, set up once:
    # swapping processors between timed runs would make a compiled UNet recompile every time.
    def pipeline_with(processors: type | None) -> MSDiffusionXLPipeline:
        twin = MSDiffusionXLPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
        twin.set_progress_bar_config(disable=True)
        if processors is not None:
            twin.load_ms_adapter(checkpoint, image_encoder=image_encoder)
            if processors is not MSAttnProcessor:
                set_processors(twin.unet, processors)
        return twin

    pipes = {"bare": pipe, "ours": pipeline_with(MSAttnProcessor)}
    pipes["auto"] = pipes["prepared"] = pipes["ours"]
    settings = {
        "bare": {},
        "ours": subjects,
        "auto": {**subjects, "mask_threshold": 0.5, "start_step": 5},
        "naive": subjects,
    }
    if args.prepared:  # encoded once, outside the timed generations
        settings["prepared"] = {"prepared_subjects": pipes["ours"].prepare_subjects(**subjects)}
    variants = ["bare", "ours"] + ["auto"] * args.auto_layout + ["prepared"] * args.prepared
    if not args.skip_naive:
        pipes["naive"] = pipeline_with(NaiveMSProcessor)
        variants.append("naive")
    if args.task != "text-to-image":
        # The task's pipeline on the same models (from_pipe loads nothing); without subjects it is diffusers' own.
        from msdiffusion.loading import pipeline_class

        task_class = pipeline_class(args.task)
        converted = {id(twin): task_class.from_pipe(twin) for twin in pipes.values()}
        pipes = {name: converted[id(twin)] for name, twin in pipes.items()}
        for twin in pipes.values():
            twin.set_progress_bar_config(disable=True)
        picture = PIL.Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8))
        del common["height"], common["width"]  # the picture's own size
        common.update(image=picture, strength=0.7 if args.task == "image-to-image" else 1.0)
        if args.task == "inpainting":
            half = np.zeros((args.size, args.size), dtype=np.uint8)
            half[:, args.size // 2 :] = 255
            common["mask_image"] = PIL.Image.fromarray(half)
    unets = {name: pipes[name].unet for name in variants}  # eager modules, for hooks
    if args.compile:
        for twin in dict.fromkeys(pipes.values()):
            twin.unet = torch.compile(twin.unet, mode=args.compile_mode)

    def synchronize():
        if args.device == "cuda":
            torch.cuda.synchronize()

    recorded = [0]  # CUDA graphs captured so far (torch.compile's "reduce-overhead" records them)
    if args.device == "cuda":
        capture_begin = torch.cuda.CUDAGraph.capture_begin

        def counted_capture_begin(graph, *a, **k):
            recorded[0] += 1
            return capture_begin(graph, *a, **k)

        torch.cuda.CUDAGraph.capture_begin = counted_capture_begin

    def timed(fn, name: str) -> float:
        before = recorded[0]
        seconds = elapsed(fn, synchronize)
        recordings[name].append(recorded[0] - before)
        return seconds

    def generation(name: str):
        return lambda: pipes[name](generator=torch.Generator().manual_seed(0), **common, **settings[name])

    for name in variants:  # warm-up (allocator, kernels, lazy inits, compilation)
        start = time.perf_counter()
        generation(name)()
        synchronize()
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    recordings: dict[str, list[int]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(timed(generation(name), name))

    median = {name: statistics.median(t) for name, t in times.items()}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    compiled = f", torch.compile({args.compile_mode or 'default'})" if args.compile else ""
    print(
        f"{args.task}, SDXL architecture at 1/{args.width_divisor} width, {args.size}x{args.size}, {args.steps} steps, "
        f"{'CFG' if args.guidance > 1 else 'no CFG'}, {args.dtype}, output {args.output_type}{compiled}, {device}, torch {torch.__version__}; {args.repeats} interleaved repeats"
    )
    for name, t in times.items():
        print(f"  {name:8s} median {median[name]:8.3f} s   runs: " + ", ".join(f"{x:.3f}" for x in t))
    for name in median:
        if name != "bare":
            print(f"{name} / bare = {median[name] / median['bare']:.4f}")
    if recorded[0]:
        print(
            "CUDA graphs recorded during each timed generation: " + ", ".join(f"{n} {r}" for n, r in recordings.items())
        )
    if args.compile:
        from torch._dynamo.utils import counters

        print(f"dynamo: {dict(counters['stats'])}, graph breaks: {sum(counters['graph_break'].values())}")
    if args.breakdown:
        generation_breakdown(
            pipes["ours"],
            pipes["bare"],
            common["prompt"],
            images,
            subjects["subject_phrases"],
            subjects["subject_boxes"],
            args.size,
            synchronize,
        )
    if args.sync_check:
        print("host-device synchronisations inside UNet calls, one generation per variant:")
        for name in variants:
            sync_check(name, generation(name), unets[name])
    if args.profile:
        print("profile of one generation per variant:")
        profiles = {
            name: profile_generation(name, generation(name), unets[name], args.device, args.top) for name in variants
        }
        for name in variants[1:]:
            compare_profiles(name, profiles["bare"], profiles[name], args.top)


if __name__ == "__main__":
    main()
