"""What is wrong with a weights file, read from its header alone (no tensors are loaded).

The adapter reader and the checks before loading both use this, so a truncated download is named
as such instead of ending in a library's traceback.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

# Files a single-file model can be given as, by what reads them.
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (reads only its header), or None."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors file"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return "its header is cut off: truncated, or not a safetensors file"
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid: not a safetensors file"
    if not isinstance(header, dict):
        return "its header is not valid: not a safetensors file"
    try:
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        return "its header is not valid: not a safetensors file"
    if 8 + length + end > size:
        return f"truncated: its header describes {8 + length + end} bytes, the file has {size} (download it again)"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why `path` is not a `torch.save` file (zip archive or legacy pickle), or None; reads no tensors."""
    with open(path, "rb") as file:
        head = file.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path):  # reads the central directory at the end: a truncated file fails here
                return None
        except zipfile.BadZipFile:
            return "a damaged torch checkpoint: its zip archive is truncated or corrupt (download it again)"
    if head[:1] == b"\x80":  # legacy (pre-1.6) pickle format
        return None
    return "not a torch checkpoint (expected a file written by torch.save, or a .safetensors file)"


def model_file_problem(path: Path) -> str | None:
    """Why a model weights file cannot be read, by its suffix; None when it looks complete."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return safetensors_problem(path)
    if suffix in TORCH_SUFFIXES:
        return torch_file_problem(path)
    return None
