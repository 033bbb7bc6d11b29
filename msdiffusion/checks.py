"""Checks of user inputs that run before any model loads.

With real SDXL, loading takes a minute or more and about 10 GB of memory; a mistake found after
that (an unreadable photo, a misspelt folder, a device this machine lacks, a hub id with no
network) wastes it and usually ends in a library's traceback. Every function here is cheap (file
headers, not weights) and raises `InputCheckError` with one line that names the input, what is
wrong and what was expected.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserInputError
from .weight_files import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, model_file_problem

_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(?::(\d+))?$")
# A hub probe that cannot connect within this time means "no network" (the hub client would
# otherwise retry for about half a minute per file before saying so).
HUB_PROBE_TIMEOUT_S = 3.0


class InputCheckError(UserInputError):
    """An input that cannot work, found before loading anything."""


# ---- images --------------------------------------------------------------------------------------
def check_image_file(path: str | os.PathLike, what: str) -> None:
    """Decode the whole image at `path` (a truncated file often has a valid header)."""
    import PIL.Image

    path = Path(path)
    if path.is_dir():
        raise InputCheckError(f"{what}: {str(path)!r} is a folder, not an image file.")
    if not path.is_file():
        raise InputCheckError(f"{what}: {str(path)!r} does not exist.")
    try:
        with PIL.Image.open(path) as image:
            image.load()
    except PIL.UnidentifiedImageError:
        raise InputCheckError(
            f"{what}: {str(path)!r} is not an image PIL can read (expected JPEG, PNG, WebP, ...)."
        ) from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated data, broken chunks
        raise InputCheckError(
            f"{what}: {str(path)!r} is a damaged image ({error}); re-export or re-download it."
        ) from None


# ---- devices -------------------------------------------------------------------------------------
def check_device(device: str | None, what: str = "device") -> None:
    """Refuse a device name torch does not know, or one this machine / this torch build lacks."""
    if device is None:
        return
    match = _DEVICE.match(device)
    if not match:
        raise InputCheckError(f"{what}: {device!r} is not a device; use cpu, cuda, cuda:N or mps.")
    import torch

    kind, index = match[1], int(match[2] or 0)
    if kind == "cuda":
        if not torch.backends.cuda.is_built():
            raise InputCheckError(
                f"{what}: {device!r}, but this PyTorch ({torch.__version__}) was built without CUDA; install a CUDA "
                "build (https://pytorch.org/get-started/locally/) or use --device cpu."
            )
        count = torch.cuda.device_count()
        if count == 0:
            raise InputCheckError(
                f"{what}: {device!r}, but no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES), or use --device cpu."
            )
        if index >= count:
            raise InputCheckError(
                f"{what}: {device!r}, but only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})."
            )
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise InputCheckError(f"{what}: 'mps' (Apple GPU) is not available on this machine; use --device cpu.")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise InputCheckError(f"{what}: {device!r} (Intel GPU) is not available on this machine; use --device cpu.")


# ---- model files ---------------------------------------------------------------------------------
def _check_weight_files(folder: Path, what: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in SAFETENSORS_SUFFIXES + (".bin",):
            problem = model_file_problem(path)
            if problem:
                raise InputCheckError(f"{what}: {path}: {problem}.")


def looks_local(value: str) -> bool:
    """True for what can only be a path (not a hub `owner/name` id): `nope/` or `a/b/c` are folders."""
    if value.startswith((".", "/", "~", "\\")) or os.path.isabs(value) or value.count("/") != 1:
        return True
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return Path(value).suffix.lower() in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES


# What each kind of model folder must hold, for the message and the check.
_FOLDER_MARKERS = {
    "base": (("model_index.json",), "a diffusers SDXL folder (with model_index.json)"),
    "image_encoder": (("config.json",), "a transformers CLIP vision model folder (with config.json)"),
    "controlnet": (("config.json",), "a diffusers ControlNet folder (with config.json)"),
    "vae": (("config.json",), "a diffusers VAE folder (with config.json)"),
    "lora": (
        ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"),
        "a LoRA file or a folder with pytorch_lora_weights.safetensors",
    ),
    "transformers": (("config.json",), "a transformers model folder (with config.json)"),
}
# A file the hub repo of each kind must have (to ask the local cache about).
_HUB_FILES = {
    "base": "model_index.json",
    "image_encoder": "config.json",
    "controlnet": "config.json",
    "vae": "config.json",
    "transformers": "config.json",
    "adapter": None,  # ms_adapter_config.json or ms_adapter.bin: checked when the adapter is read
    "lora": None,
}


def check_model_location(value: str, kind: str, what: str, subfolder: str | None = None) -> None:
    """A local model path must exist and hold what `kind` needs; a hub id must be reachable or cached."""
    if looks_local(value) or Path(value).expanduser().exists():
        path = Path(value).expanduser()
        if not path.exists():
            raise InputCheckError(f"{what}: {value!r} does not exist (expected {_expected(kind)}).")
        if path.is_file():
            if kind in ("image_encoder", "controlnet", "transformers") or (
                kind == "vae" and path.suffix.lower() not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
            ):
                raise InputCheckError(f"{what}: {value!r} is a file; expected {_expected(kind)}.")
            if path.suffix.lower() not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
                raise InputCheckError(
                    f"{what}: {value!r} is not a model file (expected .safetensors or .ckpt, or {_expected(kind)})."
                )
            problem = model_file_problem(path)
            if problem:
                raise InputCheckError(f"{what}: {value!r}: {problem}.")
            return
        folder = path / subfolder if subfolder else path
        markers, _ = _FOLDER_MARKERS.get(kind, ((), ""))
        if markers and not any((folder / marker).is_file() for marker in markers):
            raise InputCheckError(
                f"{what}: {value!r} is a folder without {' or '.join(markers)}; expected {_expected(kind)}."
            )
        _check_weight_files(folder, what)
        return
    filename = _HUB_FILES.get(kind)
    if filename:
        check_hub_model(value, filename, what, subfolder)


def _expected(kind: str) -> str:
    if kind == "base":
        return "a diffusers SDXL folder, a single .safetensors/.ckpt file, or a hub id such as stabilityai/stable-diffusion-xl-base-1.0"
    if kind == "adapter":
        return "an ms_adapter.bin file, a project adapter folder, or a hub id such as doge1516/MS-Diffusion"
    return _FOLDER_MARKERS[kind][1] + " or a hub id (owner/name)"


# ---- the hub -------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """True when the user asked for no network (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def hub_reachable() -> bool:
    """Whether the hub endpoint accepts a connection within a few seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def in_hub_cache(repo_id: str, filename: str, subfolder: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    name = f"{subfolder}/{filename}" if subfolder else filename
    return isinstance(try_to_load_from_cache(repo_id, name), str)


def check_hub_model(repo_id: str, filename: str, what: str, subfolder: str | None = None) -> None:
    """A hub model is usable when it is in the local cache or the hub can be reached."""
    if in_hub_cache(repo_id, filename, subfolder):
        return
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else None
    if reason is None and not hub_reachable():
        reason = "the Hugging Face hub cannot be reached (no network?)"
    if reason:
        raise InputCheckError(
            f"{what}: {repo_id!r} is not in the local Hugging Face cache and {reason}: download it where there is "
            f"network (`hf download {repo_id}`), then run again, or give a local folder."
        )


def go_offline_if_unreachable(repo_ids: list[str]) -> bool:
    """With every hub model cached but no network, switch the hub client to offline mode (no retries)."""
    if not repo_ids or hub_offline() or hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    return True


def check_adapter_location(value: str, weight_name: str | None = None, what: str = "adapter") -> None:
    """A local adapter must exist (it is read, with its own checks, by `load_checkpoint`); a hub one must be
    cached or the hub reachable."""
    from .adapter import PROJECT_CONFIG_NAME, RELEASED_WEIGHT_NAME

    if looks_local(value) or Path(value).expanduser().exists():
        if not Path(value).expanduser().exists():
            raise InputCheckError(f"{what}: {value!r} does not exist (expected {_expected('adapter')}).")
        return
    names = [weight_name] if weight_name else [PROJECT_CONFIG_NAME, RELEASED_WEIGHT_NAME]
    if any(in_hub_cache(value, name) for name in names):
        return
    reason = (
        "HF_HUB_OFFLINE is set"
        if hub_offline()
        else None
        if hub_reachable()
        else "the Hugging Face hub cannot be reached (no network?)"
    )
    if reason:
        raise InputCheckError(
            f"{what}: {value!r} is not in the local Hugging Face cache and {reason}: download it where there "
            f"is network (`hf download {value}`), then run again, or give a local file or folder."
        )


def check_locations(
    models: list[tuple[str | None, str, str]], device: str | None = None, adapter_weight_name: str | None = None
) -> None:
    """Check `(value, kind, what)` model locations (kind "adapter" included) and a device, before loading.

    When every hub model is cached but the hub cannot be reached, the hub client is switched to
    offline mode so that loading does not retry for minutes.
    """
    check_device(device)
    hub_ids = []
    for value, kind, what in models:
        if not value:
            continue
        if kind == "adapter":
            check_adapter_location(value, adapter_weight_name, what)
        else:
            check_model_location(value, kind, what)
        if not looks_local(value) and not Path(value).expanduser().exists():
            hub_ids.append(value)
    go_offline_if_unreachable(hub_ids)
