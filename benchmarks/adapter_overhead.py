"""Cost of the MS-Diffusion adapter over bare SDXL, measured in one run.

Times whole generations (text encoding, subject encoding, denoising, VAE decode) on SDXL's real
architecture with random weights (see `sdxl_architecture.py`), interleaving three variants so that
machine noise hits them alike:

- `bare`:  SDXL alone (plain attention processors);
- `ours`:  MS-Diffusion with 2 subjects in boxes (this project's processors);
- `naive`: the same computation written the straightforward way (materialised image-branch
           probabilities, the CFG negative half computed too, masks and image keys/values rebuilt
           at every layer call), a model of the released implementation's structure.

Prints medians and the ratios ours/bare (target <= 1.03) and naive/ours.

    python benchmarks/adapter_overhead.py                       # CPU, fp32, 512 px, quarter width
    python benchmarks/adapter_overhead.py --device cuda --dtype fp16 --size 1024 --width-divisor 1
"""

from __future__ import annotations

import argparse
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
        out = F.scaled_dot_product_attention(q, _heads(attn.to_k(text), attn.heads), _heads(attn.to_v(text), attn.heads))
        boxes = layout.boxes
        if batch == 2 * layout.batch_size:
            boxes = torch.cat([torch.zeros_like(boxes), boxes])
        h, w = self.state.grid(cells)
        bias, inside = regions_to_bias(box_regions(boxes, h, w), layout.tokens_per_subject, layout.num_dummy_tokens, q.dtype)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width-divisor", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--skip-naive", action="store_true", help="time only bare and ours")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    pipe, checkpoint, image_encoder = build_sdxl(args.width_divisor, args.device, dtype)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(2)]
    common = dict(prompt="a dog and a cat on the beach", num_inference_steps=args.steps, guidance_scale=7.5,
                  height=args.size, width=args.size, output_type="np")  # fmt: skip
    subjects = dict(subject_images=images, subject_phrases=["dog", "cat"],
                    subject_boxes=[[0.0, 0.25, 0.5, 0.75], [0.5, 0.25, 1.0, 0.75]])  # fmt: skip

    def timed(fn) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def bare():
        pipe.unload_ms_adapter()
        return timed(lambda: pipe(generator=torch.Generator().manual_seed(0), **common))

    def ours():
        pipe.load_ms_adapter(checkpoint, image_encoder=image_encoder)
        return timed(lambda: pipe(generator=torch.Generator().manual_seed(0), **common, **subjects))

    def naive():
        pipe.load_ms_adapter(checkpoint, image_encoder=image_encoder)
        set_processors(pipe.unet, NaiveMSProcessor)
        return timed(lambda: pipe(generator=torch.Generator().manual_seed(0), **common, **subjects))

    variants = {"bare": bare, "ours": ours} if args.skip_naive else {"bare": bare, "ours": ours, "naive": naive}
    for fn in variants.values():  # warm-up (allocator, kernels, lazy inits)
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(fn())

    median = {name: statistics.median(t) for name, t in times.items()}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"SDXL architecture at 1/{args.width_divisor} width, {args.size}x{args.size}, {args.steps} steps, "
          f"CFG, {args.dtype}, {device}; {args.repeats} interleaved repeats")  # fmt: skip
    for name, t in times.items():
        print(f"  {name:6s} median {median[name]:8.3f} s   runs: " + ", ".join(f"{x:.3f}" for x in t))
    print(f"ours / bare  = {median['ours'] / median['bare']:.4f}   (adapter overhead; target <= 1.03)")
    if "naive" in median:
        print(f"naive / ours = {median['naive'] / median['ours']:.4f}   (speed-up over the straightforward computation)")


if __name__ == "__main__":
    main()
