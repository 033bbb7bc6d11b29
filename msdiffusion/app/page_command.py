"""`msdiff ui`, the command: its options (the served models, who may use the page, the `PageLimits`),
the logins of `--auth`, the warning for a page shared without one, and serving the page (`run_ui`)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msdiffusion.app.page import build_page, launch
from msdiffusion.app.page_jobs import PageModels, default_models
from msdiffusion.app.page_limits import MAX_SUBJECTS, PageLimits
from msdiffusion.app.visitors import PHOTO_SIDE
from msdiffusion.errors import UserInputError


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a positive {'whole ' if kind is int else ''}number, got {text!r}"
            )
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def register(subparsers) -> None:
    ui = subparsers.add_parser(
        "ui",
        help="a web page: upload subjects, draw their boxes, generate (needs the ui extra)",
        description="Serve a Gradio page to draw subjects' boxes and generate. With no model options it serves "
        'the world\'s trained models (what msdiff demo uses). Install with: pip install -e ".[ui]". Before '
        "sharing it (--host 0.0.0.0), read README's 'Sharing the page'.",
    )
    ui.add_argument("job", nargs="?", help="job file whose models (and prompt, subjects, settings) start the page")
    ui.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; give --auth with it)"
    )
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    models = ui.add_argument_group("models (as msdiff generate; default: the world's trained models)")
    models.add_argument("--base", help="SDXL: hub id, diffusers folder, single .safetensors file, or tiny-random")
    models.add_argument("--adapter", help="MS-Diffusion adapter: hub id, ms_adapter.bin, or project folder")
    models.add_argument("--adapter-weight-name", help="file name of the adapter inside a repo or folder")
    models.add_argument("--image-encoder", help="CLIP vision encoder: hub id or folder")
    models.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    models.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    models.add_argument(
        "--cpu-offload",
        action="store_true",
        help="a small GPU: keep each model on the CPU until it runs (much less GPU memory, somewhat slower)",
    )
    models.add_argument(
        "--image-encoder-offload",
        action="store_true",
        help="keep only the image encoder on the CPU except while it encodes subjects (3.7 GB less GPU memory "
        "while denoising with SDXL's)",
    )
    access = ui.add_argument_group("who may use it")
    access.add_argument(
        "--auth",
        action="append",
        metavar="USER:PASS",
        help="ask for this login (repeat for more users); without it anyone who reaches the port uses the page",
    )
    access.add_argument(
        "--auth-file", metavar="FILE", help="logins, one USER:PASS a line (keeps passwords out of the process list)"
    )
    limits = ui.add_argument_group("limits (what one visitor or API caller may ask of the server)")
    default = PageLimits()
    limits.add_argument(
        "--max-size", type=_positive(int), default=default.max_size, metavar="PIXELS", help="largest width or height"
    )
    limits.add_argument("--max-steps", type=_positive(int), default=default.max_steps, metavar="N", help="most steps")
    limits.add_argument(
        "--max-images", type=_positive(int), default=default.max_images, metavar="N", help="most images per request"
    )
    limits.add_argument(
        "--max-photos", type=_positive(int), default=default.max_photos, metavar="N", help="most photos of one subject"
    )
    limits.add_argument(
        "--max-upload-mb",
        type=_positive(float),
        default=default.max_upload_mb,
        metavar="MB",
        help="largest file a visitor may upload",
    )
    limits.add_argument(
        "--max-megapixels",
        type=_positive(float),
        default=default.max_megapixels,
        metavar="MP",
        help=f"largest photo, read from its header before decoding; photos are shrunk on receipt to {PHOTO_SIDE} "
        "pixels a side",
    )
    limits.add_argument(
        "--queue-size",
        type=_positive(int),
        default=default.queue_size,
        metavar="N",
        help="requests that may wait for the model; more are refused until one starts",
    )
    limits.add_argument(
        "--job-seconds",
        type=_positive(float),
        default=default.job_seconds,
        metavar="S",
        help="a generation running longer is stopped (a generation also stops when its page is closed or Stop is "
        "pressed)",
    )
    limits.add_argument(
        "--keep-minutes",
        type=_positive(float),
        default=default.keep_minutes,
        metavar="M",
        help="a visitor's photos and results are removed when they leave, or this long after their last use",
    )
    ui.set_defaults(func=run_ui)


def limits_from_args(args) -> PageLimits:
    return PageLimits(
        **{name: getattr(args, name) for name in PageLimits.__dataclass_fields__ if getattr(args, name, None)}
    )


def read_auth(logins: list[str] | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """The logins of `--auth USER:PASS` and `--auth-file` (one a line; blank and # lines skipped); None without any."""
    entries = [("--auth", text) for text in logins or []]
    if auth_file:
        path = Path(auth_file)
        if not path.is_file():
            raise UserInputError(f"--auth-file: {auth_file!r} not found.")
        lines = [line.strip() for line in path.read_text().splitlines()]
        entries += [
            (f"--auth-file line {n}", line) for n, line in enumerate(lines, 1) if line and not line.startswith("#")
        ]
        if not entries:
            raise UserInputError(f"--auth-file: {auth_file!r} holds no USER:PASS line.")
    pairs = []
    for where, text in entries:
        user, colon, password = text.partition(":")
        if not colon or not user.strip() or not password:
            # The message never repeats the text: it may be a password.
            raise UserInputError(f"{where}: expected USER:PASS (a user name, a colon, a password).")
        pairs.append((user.strip(), password))
    return pairs or None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may be this machine's address on the network


def sharing_warning(host: str, auth) -> str | None:
    """The warning for a page bound beyond loopback without a login (None when there is none to give)."""
    if is_loopback(host) or auth:
        return None
    return (
        f"msdiff ui: warning: listening on {host} without --auth: anyone who can reach this machine's port can "
        "use the page and its models. Give --auth USER:PASS (or --auth-file FILE); README: 'Sharing the page'."
    )


def models_from_args(args) -> PageModels:
    """The served models: a job file's, overridden by flags; the world's models when none are given."""
    from msdiffusion.app.jobs import job_from_dict, read_job_file
    from msdiffusion.loading import NAMED_MODELS
    from msdiffusion.settings import DEFAULT_IMAGE_ENCODER

    given = {"base": args.base, "adapter": args.adapter, "image_encoder": args.image_encoder}
    if args.job:
        job = job_from_dict(read_job_file(args.job), args.job, Path(args.job).resolve().parent)
        data = job.to_dict()
        data.update({k: v for k, v in given.items() if v})
        defaults = {
            k: data[k]
            for k in ("negative_prompt", "size", "seed", "steps", "guidance", "scale", "images", "start_step")
        }
        defaults["negative_prompt"] = defaults["negative_prompt"] or ""
        # The job's subjects are the first visit's example: the server's operator chose to show these photos.
        example = {
            "prompt": job.prompt,
            "subjects": [{"images": s.images, "phrase": s.phrase, "box": s.box} for s in job.subjects[:MAX_SUBJECTS]],
        }
        return PageModels(
            data["base"],
            data["adapter"],
            data["image_encoder"],
            args.adapter_weight_name or data["adapter_weight_name"],
            args.device or data["device"],
            args.dtype or data["dtype"],
            defaults,
            example,
            args.cpu_offload or data["cpu_offload"],
            args.image_encoder_offload or data["image_encoder_offload"],
        )
    if not any(given.values()):
        models = default_models()
    else:
        if not (args.base and args.adapter):
            raise UserInputError(
                "give --base and --adapter (and --image-encoder, or its default) together, or none for the world's models."
            )
        models = PageModels(args.base, args.adapter, args.image_encoder or DEFAULT_IMAGE_ENCODER)
        if args.base in NAMED_MODELS:
            models.defaults = dict(NAMED_MODELS[args.base].defaults)
    models.adapter_weight_name, models.device, models.dtype = args.adapter_weight_name, args.device, args.dtype
    models.cpu_offload, models.image_encoder_offload = args.cpu_offload, args.image_encoder_offload
    return models


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on (Gradio would say so only after the models load, naming an
    environment variable instead of --port)."""
    import socket

    if not 0 < port < 65536:
        raise UserInputError(f"--port must be from 1 to 65535, got {port}.")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserInputError(
                f"--port {port}: cannot listen on {host}:{port} ({error.strerror or error}); another program may be "
                "using it: give another --port."
            ) from None


def run_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserInputError('msdiff ui needs Gradio: pip install -e ".[ui]" (or pip install gradio).') from None
    from msdiffusion.loading import check_models, device_and_dtype, load_pipeline

    auth = read_auth(args.auth, args.auth_file)
    limits = limits_from_args(args)
    warning = sharing_warning(args.host, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    check_port_free(args.host, args.port)  # before a minute of loading, not after
    models = models_from_args(args)
    settings = models.model_settings()
    adapter = check_models(settings)
    device, dtype = device_and_dtype(models.device, models.dtype)
    print(f"msdiff ui: loading {models.base} + {models.adapter} + {models.image_encoder} on {device} ...", flush=True)
    pipe = load_pipeline(settings, device, dtype, adapter)
    page = build_page(models, pipe, limits)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        # A service manager stops the server with SIGTERM: leave as on Ctrl-C, removing the visitors' files.
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        launch(page, host=args.host, port=args.port, auth=auth)
    finally:
        page.visitor_files.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0
