"""WebDataset tar shards as img2dataset and video2dataset write them, local or at any fsspec URL.

A shard `NNNNN.tar` holds samples as consecutive members sharing a key: `KEY.jpg` (or `.png`,
`.webp`) with `KEY.txt` (the caption) and/or `KEY.json` (metadata; the caption is one of its
fields, `--caption-field`). Clips hold either a video file (`KEY.mp4`, `.webm`, `.mkv`, `.avi`,
`.mov`; decoded with PyAV) or a frame list (`KEY.000.jpg`, `KEY.001.jpg`, ...: the WebDataset
convention that a key ends at the first dot of the member's base name).

Shards are read as streams (one pass, one sample in memory at a time), so a remote shard is never
downloaded whole to disk. Nothing here loads a model: the readers run on CPU workers.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp")
VIDEO_SUFFIXES = ("mp4", "webm", "mkv", "avi", "mov")
# The caption of a sample: its `.txt` member, or this field of its `.json` member.
TXT_FIELD = "txt"


@dataclass
class TarSample:
    """One sample of a shard: its key and its members' bytes by extension ("jpg", "json", "000.jpg"...)."""

    key: str
    members: dict[str, bytes]


def is_tar_source(source: str | os.PathLike) -> bool:
    """Whether `source` names tar shards: a `.tar` path or URL (braces allowed), or a folder holding `*.tar`."""
    text = os.fspath(source)
    if _strip_braces(text).endswith(".tar") or "*" in text:
        return True
    fs, path = _filesystem(text)
    try:
        return fs.isdir(path) and any(name.endswith(".tar") for name in fs.ls(path, detail=False))
    except (OSError, ValueError):
        return False


def list_shards(source: str | os.PathLike) -> list[str]:
    """The shard URLs of `source`, sorted: one `.tar`, a brace range `{00000..00099}.tar`, a glob, or a folder."""
    text = os.fspath(source)
    fs, path = _filesystem(text)
    protocol = text.split("://", 1)[0] + "://" if "://" in text else ""
    if "{" in text:
        found = _expand_braces(text)
        missing = [p for p in found if not _filesystem(p)[0].exists(_filesystem(p)[1])]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {text} not found, the first: {missing[0]}")
        return found
    if "*" in text:
        found = sorted(fs.glob(path))
    elif fs.isdir(path):
        found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
    elif fs.isfile(path):
        found = [path]
    else:
        raise FileNotFoundError(f"source not found: {text}")
    if not found:
        raise FileNotFoundError(f"no .tar shards in {text}")
    # fsspec strips the protocol from listed paths; put it back so workers on other machines can open them.
    return [fs.unstrip_protocol(p) if protocol else p for p in found]


def iter_tar_samples(url: str) -> Iterator[TarSample]:
    """The samples of one shard, in order, read as a stream."""
    import fsspec

    with fsspec.open(url, "rb") as handle:
        with tarfile.open(fileobj=handle, mode="r|*") as archive:
            current: TarSample | None = None
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                if name.startswith(".") or "." not in name:
                    continue  # hidden files (macOS `._x`) and members without an extension are not samples
                stem, _, extension = name.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                data = archive.extractfile(member).read()
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = TarSample(key, {})
                current.members[extension.lower()] = data
            if current is not None:
                yield current


def sample_caption(sample: TarSample, caption_field: str = TXT_FIELD) -> tuple[str, list[str] | None]:
    """The caption (the `.txt` member, or `caption_field` of the `.json` member) and given phrases, if any."""
    meta: dict = {}
    if "json" in sample.members:
        try:
            meta = json.loads(sample.members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    if caption_field == TXT_FIELD:
        caption = sample.members.get("txt", b"").decode("utf-8", errors="replace")
    else:
        caption = meta.get(caption_field)
        caption = caption if isinstance(caption, str) else ""
    phrases = meta.get("phrases")
    if not (isinstance(phrases, list) and all(isinstance(p, str) for p in phrases)):
        phrases = None
    return caption.strip(), phrases


def still_image(sample: TarSample) -> tuple[str, bytes] | None:
    """(extension, bytes) of a still sample's image, or None without one."""
    for suffix in IMAGE_SUFFIXES:
        if suffix in sample.members:
            return suffix, sample.members[suffix]
    return None


def clip_frames(sample: TarSample) -> tuple[tuple[str, bytes], tuple[str, bytes]] | str:
    """(target, reference) frames of a clip as (extension, encoded bytes): the middle and the first frame.

    From a frame list (`KEY.000.jpg` ...) the frames' own bytes; from a video file, decoded frames
    encoded as JPEG (quality 95). Returns a skip reason instead when the clip has too few frames.
    """
    frames = sorted(
        (extension, data)
        for extension, data in sample.members.items()
        if "." in extension and extension.rsplit(".", 1)[1] in IMAGE_SUFFIXES
    )
    if frames:
        if len(frames) < 2:
            return "clip with fewer than 2 frames"
        middle = frames[len(frames) // 2]
        return (middle[0].rsplit(".", 1)[1], middle[1]), (frames[0][0].rsplit(".", 1)[1], frames[0][1])
    for suffix in VIDEO_SUFFIXES:
        if suffix in sample.members:
            return _video_frames(sample.members[suffix], sample.key)
    return "clip without frames or a video file"


def _video_frames(data: bytes, key: str) -> tuple[tuple[str, bytes], tuple[str, bytes]] | str:
    try:
        import av
    except ImportError:
        raise ValueError(
            f"sample {key}: reading video files needs PyAV: pip install av (or write frame lists, KEY.000.jpg ...)"
        ) from None
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [frame.to_image() for frame in container.decode(video=0)]
    except Exception:  # PyAV raises its own error classes for every kind of broken file
        return "unreadable video"
    if len(frames) < 2:
        return "clip with fewer than 2 frames"
    return ("jpg", _jpeg(frames[len(frames) // 2])), ("jpg", _jpeg(frames[0]))


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _filesystem(url: str):
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def _strip_braces(text: str) -> str:
    return re.sub(r"\{[^}]*\}", "", text)


def _expand_braces(text: str) -> list[str]:
    """`a{00..02}.tar` -> a00.tar, a01.tar, a02.tar (zero padding kept); `{x,y}` lists too."""
    match = re.search(r"\{([^}]*)\}", text)
    if not match:
        return [text]
    inner = match.group(1)
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", inner)
    if ranged:
        first, last = ranged.groups()
        options = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    else:
        options = inner.split(",")
    head, tail = text[: match.start()], text[match.end() :]
    return [expanded for option in options for expanded in _expand_braces(head + option + tail)]


def shard_label(url: str) -> str:
    """A shard's file name, for messages and the manifest index."""
    return PurePosixPath(url.split("://", 1)[-1]).name
