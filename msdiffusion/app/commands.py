"""`msdiff generate`, `demo`, `convert` and `inspect`: the commands around the pipeline."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from msdiffusion.app.cli import DTYPE_CHOICES, UserInputError, dtype_name
from msdiffusion.loading import NAMED_MODELS, TINY, WORLD
from msdiffusion.release import REFERENCE_COMBINE, RELEASE_NEGATIVE_PROMPT
from msdiffusion.settings import DEFAULT_IMAGE_ENCODER, parse_size

DEMO_PROMPT = "a dog and a cat on the beach"
DEMO_BOXES = ([0.05, 0.35, 0.47, 0.95], [0.53, 0.35, 0.95, 0.95])
# The world demo: two held-out identities (no training scene shows them or a look-alike), each in its
# box: the smallest-numbered held-out gradient (red to green, left to right) on a ring, and blue with
# pink dots on a heart. Both are found in their boxes for 8 seeds of 8 (benchmarks/world_demo_seeds.py);
# the ring's identity is accepted for 3 of them, the heart's for none (docs/world.md).
WORLD_DEMO_PROMPT = "a ring and a heart on a plain wall"
# The boxes keep a gap: the world's model draws a subject a little beyond its box, and touching
# subjects merge into one shape (with these boxes both land in their boxes for 8 seeds of 8).
WORLD_DEMO_SUBJECTS = (
    ("world/ring-50.png", "ring", [0.06, 0.32, 0.4, 0.66]),
    ("world/heart-1170.png", "heart", [0.6, 0.32, 0.94, 0.66]),
)
WORLD_DEMO_PHRASES = [phrase for _, phrase, _ in WORLD_DEMO_SUBJECTS]


def register(subparsers) -> None:
    generate = subparsers.add_parser(
        "generate",
        help="generate images from a job file or flags",
        description="Generate images with subjects in boxes. Give a job file (YAML/JSON, see README), "
        "flags, or both (flags override the file); or --from an image msdiff wrote, to make it again.",
    )
    generate.add_argument("job", nargs="?", help="job file (.yaml / .json); flags override its fields")
    generate.add_argument(
        "--from", dest="from_image", metavar="PNG", help="regenerate from the job recorded in an image"
    )
    models = generate.add_argument_group("models")
    models.add_argument(
        "--base", help="SDXL: hub id, diffusers folder, or single .safetensors file (required)" + _named_sets_help()
    )
    models.add_argument("--adapter", help="MS-Diffusion adapter: hub id, ms_adapter.bin, or project folder (required)")
    models.add_argument(
        "--adapter-weight-name",
        help="file name of the adapter inside a repo or folder (default: ms_adapter_config.json + "
        "ms_adapter.safetensors, else ms_adapter.bin)",
    )
    models.add_argument(
        "--image-encoder", help=f"CLIP vision encoder: hub id or folder (default: {DEFAULT_IMAGE_ENCODER})"
    )
    models.add_argument(
        "--scheduler", help="diffusers scheduler class name, e.g. DPMSolverMultistepScheduler (default: the base's)"
    )
    models.add_argument(
        "--variant", help="weight variant of the base's files, e.g. fp16: half the download (default: the full files)"
    )
    models.add_argument(
        "--vae",
        help="another VAE: hub id, folder or .safetensors, e.g. madebyollin/sdxl-vae-fp16-fix (default: the base's)",
    )
    models.add_argument(
        "--lora",
        action="append",
        nargs="+",
        metavar="ARG",
        help="PATH [SCALE]: a LoRA (.safetensors file, folder or hub id) at SCALE (default 1.0); repeat for several",
    )
    models.add_argument(
        "--cpu-offload",
        action="store_true",
        default=None,
        help="keep each model on the CPU until it runs: much less GPU memory, somewhat slower",
    )
    models.add_argument(
        "--image-encoder-offload",
        action="store_true",
        default=None,
        help="keep only the image encoder on the CPU except while it encodes subjects: 3.7 GB less GPU memory "
        "while denoising (SDXL's ViT-bigG in fp16), a move there and back per encoding",
    )
    models.add_argument("--controlnet", help="ControlNet hub id or folder (needs --control-image)")
    models.add_argument("--control-image", help="control image for the ControlNet")
    models.add_argument("--controlnet-scale", type=float, help="ControlNet conditioning scale (default: 1.0)")
    models.add_argument(
        "--controlnet-image-tokens",
        action="store_true",
        default=None,
        help="let the ControlNet attend over the subject tokens too, as the released inference_controlnet.py",
    )
    what = generate.add_argument_group("what to draw")
    what.add_argument("--prompt", help="the text; it must contain every subject's phrase (required)")
    what.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help=f'default: the release\'s "{RELEASE_NEGATIVE_PROMPT}"; "" for none (SDXL then uses zero embeddings)',
    )
    what.add_argument(
        "--subject",
        action="append",
        nargs="+",
        metavar="ARG",
        help="IMAGE PHRASE [X0,Y0,X1,Y1] [mask=MASK] [scale=S]; repeat per subject. IMAGE may be a+b.jpg for "
        "several references of one subject (unless a file of that whole name exists); the box is in [0, 1] of the "
        "output (omit box and mask for auto layout); mask=PATH (white = the subject's region, any shape) or "
        "mask=X,Y,X,Y,X,Y,... (a polygon of fractions) confines the subject to that region, beside or instead of "
        "the box; scale=S is its own strength.",
    )
    picture = generate.add_argument_group("start from a picture (image-to-image, inpainting)")
    picture.add_argument(
        "--init-image",
        metavar="PATH",
        help="redraw this picture with the prompt and subjects instead of drawing from noise; the output takes "
        "its size (rounded down to multiples of 8) unless --size is given",
    )
    picture.add_argument(
        "--strength",
        type=float,
        metavar="S",
        help="with --init-image: how far the picture is redrawn, in (0, 1]; a subject needs about 0.5 or more "
        "(default: 0.3, or 0.9999 with --inpaint)",
    )
    picture.add_argument(
        "--inpaint",
        metavar="subjects|PATH",
        help="with --init-image: repaint only part of the picture and keep the rest (inpainting): 'subjects' for "
        "the subjects' regions (their boxes or masks, grown by --repaint-margin), or a mask of the picture (white "
        "is repainted, black kept; any size, stretched over the picture; put the subjects inside it)",
    )
    picture.add_argument(
        "--repaint-margin",
        type=float,
        metavar="F",
        help="with --inpaint subjects: how far around the subjects' regions is repainted, a fraction of the "
        "shorter side in [0, 0.5] (default: 0.02)",
    )
    picture.add_argument(
        "--repaint-feather",
        type=float,
        metavar="F",
        help="with --inpaint: the width of the soft edge where the picture is pasted back, a fraction of the "
        "shorter side in [0, 0.5] (default: 0.02)",
    )
    picture.add_argument(
        "--keep-outside",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --inpaint: paste the picture back outside the repainted part, so it is kept exactly (default: "
        "on with --inpaint subjects, off with a mask, whose kept part is then the picture's VAE round trip)",
    )
    how = generate.add_argument_group("how")
    how.add_argument(
        "--size", help="WIDTHxHEIGHT, e.g. 1344x768, or one number for a square; multiples of 8 (default: 1024x1024)"
    )
    how.add_argument("--seed", type=int, help="seed of the first image; image k uses seed + k (default: random)")
    how.add_argument("--images", type=int, help="number of images (default: 1)")
    how.add_argument(
        "--seed-mode",
        choices=["per-image", "release"],
        help="per-image (default): image k from a CPU generator seeded seed+k; release: one generator on the "
        "device draws the batch, as the released code (its images seed for seed, e.g. with --device cuda)",
    )
    how.add_argument("--steps", type=int, help="denoising steps (default: 30)")
    how.add_argument("--guidance", type=float, help="classifier-free guidance; 1 turns it off (default: 7.5)")
    how.add_argument("--scale", type=float, help="subject strength; 0.4 suits background-like subjects (default: 0.6)")
    how.add_argument(
        "--mask-threshold", type=float, help="turn on auto layout with this threshold, e.g. 0.5 (default: off)"
    )
    how.add_argument("--start-step", type=int, help="step at which auto layout takes over (default: 5)")
    how.add_argument(
        "--phrase-matching",
        choices=["tokens", "release"],
        help="where auto layout finds repeated phrases: tokens (default) or the released code's positions",
    )
    how.add_argument(
        "--drop-grounding",
        action="store_true",
        default=None,
        help="use the learned grounding tokens instead of phrase + box",
    )
    how.add_argument(
        "--reference-combine",
        choices=REFERENCE_COMBINE,
        help="several photos of one subject: concat (default: resampled together) or mean (each alone, averaged)",
    )
    out = generate.add_argument_group("output")
    out.add_argument("--output", help="folder for the images (default: outputs)")
    out.add_argument(
        "--no-preview", dest="preview", action="store_false", default=None, help="skip the layout preview and sheet"
    )
    out.add_argument(
        "--no-masks",
        dest="save_masks",
        action="store_false",
        default=None,
        help="skip the auto-layout and repainted-part masks",
    )
    _add_device_arguments(out)
    out.add_argument("--quiet", action="store_true", help="no progress bars or loading messages")
    generate.set_defaults(func=run_generate)

    demo = subparsers.add_parser(
        "demo",
        help="end-to-end demo (the world's trained models when installed, unless others are given)",
        description="Generate an example and its layout preview and sheet. By default with the small models "
        "trained in the procedural world (docs/world.md) when their weights are in the package "
        "(msdiffusion/world/weights, written by `msdiff world build`): "
        + " and ".join(f"a {phrase}" for phrase in WORLD_DEMO_PHRASES)
        + " of held-out identities, each in its box. Without them, or with --random: tiny random SDXL-shaped models, "
        "which check the wiring (the image is noise). With --base/--adapter/--image-encoder: the dog-and-cat "
        "example on those models.",
    )
    demo.add_argument("--output", default="msdiff-demo", help="folder to write into")
    demo.add_argument("--base", help="real SDXL (hub id / folder / file); needs --adapter and --image-encoder too")
    demo.add_argument("--adapter", help="MS-Diffusion adapter (hub id, ms_adapter.bin or project folder), with --base")
    demo.add_argument("--image-encoder", help="CLIP vision encoder (hub id or folder), with --base")
    demo.add_argument("--random", action="store_true", help="tiny random models instead of the world's trained ones")
    demo.add_argument("--seed", type=int, default=0, help="seed")
    demo.add_argument("--steps", type=int, help="denoising steps (default: 25 world, 20 random, 30 real)")
    demo.add_argument(
        "--size", help="WIDTHxHEIGHT or one number (default: 64x64 world, 512x384 random, 1024x1024 real)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars or loading messages")
    _add_device_arguments(demo)
    demo.set_defaults(func=run_demo)

    convert = subparsers.add_parser(
        "convert",
        help="convert an adapter between the released .bin and the project format",
        description="SOURCE and DEST are each a .bin file (released format) or a folder (project format: "
        "ms_adapter.safetensors + ms_adapter_config.json). The tensors are copied unchanged.",
    )
    convert.add_argument("source", help="ms_adapter.bin, project folder, or hub id")
    convert.add_argument("dest", help="output: a path ending in .bin, or a folder")
    convert.add_argument("--adapter-weight-name", help="file name inside SOURCE when it is a repo or folder")
    convert.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    convert.set_defaults(func=run_convert)

    inspect = subparsers.add_parser(
        "inspect",
        help="describe an adapter checkpoint",
        description="Describe an adapter checkpoint: format, size, resampler architecture, attention layers, "
        "and which UNet it fits. Reads no other model.",
    )
    inspect.add_argument("source", help="ms_adapter.bin, project folder, or hub id")
    inspect.add_argument("--adapter-weight-name", help="file name inside SOURCE when it is a repo or folder")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=run_inspect)

    tiny = subparsers.add_parser(
        "tiny-models",
        help="write tiny random SDXL-shaped models to a folder, to try commands without weights",
        description="Write tiny random models the way real ones lie on disk: FOLDER/base (a diffusers SDXL "
        "folder), FOLDER/adapter (project format), FOLDER/ms_adapter.bin (released format) and "
        "FOLDER/image_encoder. Every command accepts them where it takes real models; their images show "
        "the wiring, not quality.",
    )
    tiny.add_argument("folder", type=Path, help="where to write them (created; must be empty or absent)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.set_defaults(func=run_tiny_models)


def _named_sets_help() -> str:
    """The named model sets and the settings each brings where a job or flag gives none."""
    sets = []
    for name, info in NAMED_MODELS.items():
        defaults = ", ".join(
            f"{key} {'x'.join(map(str, value)) if isinstance(value, list) else 'none' if value is None else value}"
            for key, value in info.defaults.items()
        )
        sets.append(f"{name} (its own defaults: {defaults})")
    return "; or a named set: " + "; ".join(sets)


def run_tiny_models(args) -> int:
    folder = args.folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserInputError(f"{folder} exists and is not an empty folder; choose another.")
    from msdiffusion.tiny import save_tiny_models

    paths = save_tiny_models(folder, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(
        f"try: msdiff demo --base {paths['base']} --adapter {paths['adapter']} --image-encoder {paths['image_encoder']} --size 256x192"
    )
    return 0


def _add_device_arguments(group) -> None:
    group.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    group.add_argument(
        "--dtype",
        type=dtype_name,
        choices=DTYPE_CHOICES,
        help="weights' precision (default: fp16 on a GPU, fp32 on the CPU)",
    )


# ---- generate ----------------------------------------------------------------------------------
SUBJECT_USAGE = "--subject IMAGE PHRASE [X0,Y0,X1,Y1] [mask=MASK] [scale=S]"


def _subject_from_flag(values: list[str]) -> dict:
    """`IMAGE PHRASE [X0,Y0,X1,Y1] [mask=MASK] [scale=S]` -> a job-file subject."""
    usage = SUBJECT_USAGE
    values = [v.strip() for v in values]  # cli.main may have shielded a negative box with a space
    if len(values) < 2 or len(values) > 5:
        raise UserInputError(f"{usage}: got {' '.join(values)!r}.")
    # `a+b.jpg` is two photos of one subject, unless a file of that whole name exists.
    images = [values[0]] if Path(values[0]).exists() else values[0].split("+")
    subject: dict = {"image": images if len(images) > 1 else images[0], "phrase": values[1]}
    for extra in values[2:]:
        if extra.startswith("scale="):
            try:
                subject["scale"] = float(extra.removeprefix("scale="))
            except ValueError:
                raise UserInputError(f"{usage}: scale must be a number, got {extra!r}.") from None
        elif extra.startswith("mask="):
            subject["mask"] = _mask_from_flag(extra.removeprefix("mask="), usage)
        else:
            try:
                subject["box"] = [float(v) for v in extra.split(",")]
            except ValueError:
                raise UserInputError(
                    f"{usage}: the box is four numbers X0,Y0,X1,Y1 in [0, 1], got {extra!r}."
                ) from None
    return subject


def _mask_from_flag(value: str, usage: str) -> str | list[list[float]]:
    """`mask=PATH` -> the path; `mask=X,Y,X,Y,...` (numbers, and no file of that name) -> a polygon of [x, y]."""
    if not value:
        raise UserInputError(f"{usage}: mask= needs a mask image's path or a polygon X,Y,X,Y,X,Y,...")
    try:
        numbers = [float(v) for v in value.split(",")]
    except ValueError:
        return value  # a path: job_from_dict checks that it exists
    if Path(value).exists():
        return value
    if len(numbers) % 2:
        raise UserInputError(
            f"{usage}: a polygon mask is X,Y pairs (fractions of the output), got an odd count of numbers: {value!r}."
        )
    return [numbers[i : i + 2] for i in range(0, len(numbers), 2)]


def _lora_from_flag(values: list[str]) -> dict:
    """`PATH [SCALE]` -> a job-file LoRA entry."""
    if len(values) > 2:
        raise UserInputError(f"--lora PATH [SCALE]: got {' '.join(values)!r}.")
    lora: dict = {"path": values[0]}
    if len(values) == 2:
        try:
            lora["scale"] = float(values[1])
        except ValueError:
            raise UserInputError(f"--lora PATH [SCALE]: SCALE must be a number, got {values[1]!r}.") from None
    return lora


def _flag_overrides(args) -> dict:
    fields = {
        "base": args.base,
        "adapter": args.adapter,
        "adapter_weight_name": args.adapter_weight_name,
        "image_encoder": args.image_encoder,
        "scheduler": args.scheduler,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "seed_mode": args.seed_mode,
        "images": args.images,
        "steps": args.steps,
        "guidance": args.guidance,
        "scale": args.scale,
        "mask_threshold": args.mask_threshold,
        "start_step": args.start_step,
        "phrase_matching": args.phrase_matching,
        "drop_grounding": args.drop_grounding,
        "reference_combine": args.reference_combine,
        "output": args.output,
        "preview": args.preview,
        "save_masks": args.save_masks,
        "device": args.device,
        "dtype": args.dtype,
        "variant": args.variant,
        "vae": args.vae,
        "cpu_offload": args.cpu_offload,
        "image_encoder_offload": args.image_encoder_offload,
        "init_image": args.init_image,
        "strength": args.strength,
        "inpaint": args.inpaint,
        "repaint_margin": args.repaint_margin,
        "repaint_feather": args.repaint_feather,
        "keep_outside": args.keep_outside,
    }
    overrides = {k: v for k, v in fields.items() if v is not None}
    if args.size:
        overrides["size"] = parse_size(args.size, "--size")
    if args.subject:
        overrides["subjects"] = [_subject_from_flag(values) for values in args.subject]
    if args.lora:
        overrides["loras"] = [_lora_from_flag(values) for values in args.lora]
    if args.controlnet or args.control_image or args.controlnet_scale is not None or args.controlnet_image_tokens:
        if not (args.controlnet and args.control_image):
            raise UserInputError("--controlnet and --control-image go together.")
        overrides["controlnet"] = {"model": args.controlnet, "image": args.control_image}
        if args.controlnet_scale is not None:
            overrides["controlnet"]["scale"] = args.controlnet_scale
        if args.controlnet_image_tokens:
            overrides["controlnet"]["image_tokens"] = True
    return overrides


def run_generate(args) -> int:
    from msdiffusion.app.jobs import job_from_dict, read_job_file, read_job_from_png

    if args.job and args.from_image:
        raise UserInputError("give a job file or --from IMAGE, not both.")
    data: dict = {}
    size_given = False  # whether the file names a size (else a picture's own size was filled in)
    if args.job:
        raw = read_job_file(args.job)
        size_given = "size" in raw
        data = job_from_dict(raw, args.job, Path(args.job).resolve().parent).to_dict()
    elif args.from_image:
        data = read_job_from_png(args.from_image)
        data.pop("output", None)  # into this run's --output (default outputs/), not where the PNG was made
    overrides = _flag_overrides(args)
    if "init_image" in overrides and "size" not in overrides and not size_given:
        data.pop("size", None)  # another picture: the output takes its size, not the one the file's picture gave
    data.update(overrides)
    if not data:
        raise UserInputError(
            "nothing to generate: give a job file, --from IMAGE, or --base/--adapter/--prompt/--subject flags."
        )
    source = args.job or (f"--from {args.from_image}" if args.from_image else None)
    label = "flags" if source is None else source + (" (with flags)" if overrides else "")
    job = job_from_dict(data, label, Path.cwd())
    written = _run_checked(job, "generate", progress=not args.quiet, log=(lambda *a: None) if args.quiet else print)
    print(f"{len(written)} file(s) in {Path(job.output)}")
    return 0


def _run_checked(job, command: str, progress: bool, log=print) -> list[Path]:
    """Warn (one line each) about settings that are valid but odd, then run the job."""
    import sys

    from msdiffusion.app.jobs import job_warnings, run_job

    for warning in job_warnings(job):
        print(f"msdiff {command}: warning: {warning}", file=sys.stderr)
    return run_job(job, progress=progress, log=log)


# ---- demo --------------------------------------------------------------------------------------
def _asset(name: str) -> str:
    return str(Path(__file__).resolve().parents[1] / "assets" / name)


def _demo_identity_note(image: str, phrase: str) -> str:
    """A demo subject and its identity (colours and pattern), read from its asset's name."""
    from msdiffusion.world.scenes import identity_parts

    a, b, (kind, _) = identity_parts(int(image.rsplit("-", 1)[1].split(".")[0]))
    return f"the {phrase} ({a} and {b}, {kind})"


def run_demo(args) -> int:
    from msdiffusion.app.jobs import Job, JobSubject
    from msdiffusion.loading import world_weights_present

    real = [args.base, args.adapter, args.image_encoder]
    if any(real) and not all(real):
        raise UserInputError("for real models give --base, --adapter and --image-encoder together.")
    if any(real) and args.random:
        raise UserInputError("--random builds its own tiny models: give it without --base/--adapter/--image-encoder.")
    kind = "real" if any(real) else "random" if args.random else "world"
    if kind == "world" and not world_weights_present():
        print(
            "msdiff demo: the world's trained weights are not in this installation (msdiffusion/world/weights; "
            "`msdiff world build` makes them, docs/world.md), so this runs the tiny random models (--random)."
        )
        kind = "random"
    output = str(Path(args.output).resolve())
    common = dict(seed=args.seed, output=output, device=args.device, dtype=args.dtype)
    if kind == "world":
        settings = dict(NAMED_MODELS[WORLD].defaults)
        settings["size"] = parse_size(args.size, "--size") if args.size else settings["size"]
        settings["steps"] = args.steps or settings["steps"]
        job = Job(
            base=WORLD,
            adapter=WORLD,
            image_encoder=WORLD,
            prompt=WORLD_DEMO_PROMPT,
            subjects=[JobSubject([_asset(image)], phrase, list(box)) for image, phrase, box in WORLD_DEMO_SUBJECTS],
            **settings,
            **common,
        )
        print(
            "msdiff demo: the world's models (trained on a CPU in a procedural world, docs/world.md); "
            + " and ".join(_demo_identity_note(image, phrase) for image, phrase, _ in WORLD_DEMO_SUBJECTS)
            + " are held out: no training scene shows them, nor anything that looks like them."
        )
    else:
        tiny = kind == "random"
        defaults = NAMED_MODELS[TINY].defaults if tiny else {"size": [1024, 1024], "steps": 30}
        size = parse_size(args.size, "--size") if args.size else defaults["size"]
        job = Job(
            base=args.base or TINY,
            adapter=args.adapter or TINY,
            image_encoder=args.image_encoder or TINY,
            prompt=DEMO_PROMPT,
            subjects=[
                JobSubject([_asset("dog.jpg")], "dog", list(DEMO_BOXES[0])),
                JobSubject([_asset("cat.jpg")], "cat", list(DEMO_BOXES[1])),
            ],
            size=size,
            steps=args.steps or defaults["steps"],
            **common,
        )
        if tiny:
            print(
                "msdiff demo --random: TINY RANDOM SDXL-shaped models (random weights). The run exercises the whole "
                "path (subject encoding, grounding resampler, box-masked attention, SDXL denoising, VAE) but the "
                "image is noise: it shows the wiring, not quality."
            )
    start = time.perf_counter()
    written = _run_checked(job, "demo", progress=not args.quiet, log=(lambda *a: None) if args.quiet else print)
    print(
        f"demo: {len(written)} files in {job.output} ({time.perf_counter() - start:.1f} s): "
        + ", ".join(p.name for p in written)
    )
    boxes = "; ".join(f"{s.phrase} -> {s.box}" for s in job.subjects)
    models = {"world": f"{WORLD} (shipped)", "random": "tiny random (msdiffusion.tiny)"}.get(
        kind, f"{job.base} + {job.adapter} + {job.image_encoder}"
    )
    print(f"prompt {job.prompt!r}; subjects {boxes}; models: {models}")
    return 0


# ---- convert / inspect ---------------------------------------------------------------------------
def _adapter_source(source: str) -> str:
    """SOURCE as a path or hub id: the named world set's adapter where it is named, as everywhere else."""
    from msdiffusion.loading import WORLD, world_model_paths

    return world_model_paths()["adapter"] if source == WORLD else source


def _load(source: str, weight_name: str | None):
    from msdiffusion.adapter import AdapterMismatchError, load_checkpoint
    from msdiffusion.checks import check_adapter_location

    source = _adapter_source(source)
    check_adapter_location(source, weight_name, what="SOURCE")  # a missing folder is one line, not a hub error
    try:
        return load_checkpoint(source, weight_name=weight_name)
    except (FileNotFoundError, AdapterMismatchError, OSError) as error:
        raise UserInputError(str(error)) from None


def run_convert(args) -> int:
    dest = Path(args.dest)
    if dest.exists() and not args.force:
        raise UserInputError(f"{dest} exists; pass --force to overwrite it.")
    if dest.suffix.lower() in (".safetensors", ".pt", ".pth", ".ckpt", ".json"):
        # The project format is a folder; a DEST named like a file would silently become one.
        raise UserInputError(
            f"{dest}: DEST is a .bin file (released format) or a folder (project format: ms_adapter.safetensors + "
            f"ms_adapter_config.json inside it), e.g. {dest.with_suffix('')}/ ; a single {dest.suffix} file is not a format msdiff writes."
        )
    checkpoint = _load(args.source, args.adapter_weight_name)
    written = checkpoint.save(dest)
    kind = "released .bin" if dest.suffix == ".bin" else "project format (safetensors + config)"
    print(f"wrote {written} ({kind})")
    return 0


def describe_checkpoint(source: str, weight_name: str | None = None) -> dict:
    """What `msdiff inspect` reports, as a dict."""
    from collections import Counter

    from msdiffusion.adapter import PROJECT_CONFIG_NAME, resolve_adapter_path

    checkpoint = _load(source, weight_name)
    path = resolve_adapter_path(_adapter_source(source), weight_name, None)
    project = path.is_dir() or (path.parent / PROJECT_CONFIG_NAME).is_file() and path.suffix == ".safetensors"
    config = checkpoint.resampler_config
    resampler_params = sum(t.numel() for t in checkpoint.image_proj.values())
    attention_params = sum(t.numel() for w in checkpoint.attention.values() for t in w.values())
    shapes = Counter(tuple(w["to_k_ip.weight"].shape) for w in checkpoint.attention.values())
    files = [p for p in ([path] if path.is_file() else path.iterdir()) if p.is_file()]
    return {
        "source": str(path),
        "format": "project (ms_adapter.safetensors + ms_adapter_config.json)"
        if project
        else "released (torch pickle, ms_adapter.bin layout)",
        "size_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1),
        "dtype": str(next(iter(checkpoint.image_proj.values())).dtype).removeprefix("torch."),
        "resampler": config.to_dict(),
        "tokens_per_subject": config.num_queries,
        "dummy_tokens": checkpoint.num_dummy_tokens,
        "cross_attention_layers": len(checkpoint.attention),
        "layer_shapes": {f"{h}x{c}": n for (h, c), n in sorted(shapes.items())},
        "unet_cross_attention_dim": config.output_dim,
        "image_feature_dim": config.embedding_dim,
        "phrase_dim": config.phrase_dim,
        "parameters": {"resampler": resampler_params, "attention": attention_params},
        "subjects": "any number per image; the released recipe trains with up to 4 (more may lose quality)",
        "looks_like": "SDXL (released architecture)"
        if len(checkpoint.attention) == 70 and config.output_dim == 2048
        else "a non-SDXL-sized UNet (e.g. a small trained/test model)",
    }


def run_inspect(args) -> int:
    info = describe_checkpoint(args.source, args.adapter_weight_name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    r = info["resampler"]
    print(f"{info['source']}\n  format: {info['format']}, {info['size_mb']} MB, {info['dtype']}")
    print(
        f"  resampler: dim {r['dim']}, depth {r['depth']}, {r['heads']} heads x {r['dim_head']}, "
        f"{info['tokens_per_subject']} tokens per subject, {info['parameters']['resampler'] / 1e6:.1f}M parameters"
    )
    print(
        f"  inputs: {info['image_feature_dim']}-d image features, {info['phrase_dim']}-d phrase embeddings, "
        f"{8 * r['num_freqs']}-d box embedding; output: {info['unet_cross_attention_dim']}-d tokens"
    )
    layers = ", ".join(f"{n} x {shape}" for shape, n in info["layer_shapes"].items())
    print(
        f"  attention: {info['cross_attention_layers']} cross-attention layers ({layers}), "
        f"{info['parameters']['attention'] / 1e6:.1f}M parameters; {info['dummy_tokens']} dummy tokens"
    )
    print(f"  subjects: {info['subjects']}\n  fits: {info['looks_like']}")
    return 0
