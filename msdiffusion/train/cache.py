"""Precomputed text and image features (`msdiff data cache`), so training needs neither encoder.

Layout of a cache folder:

- `cache.json`: the settings the features depend on (base, image encoder, reference size and
  masking, dtype) and the manifest they were made from; training refuses a cache whose settings
  differ from its config;
- `nulls.safetensors`: the features of nothing (empty caption, all-zero reference, empty phrase);
- `shard-NNNNN.safetensors`: per manifest sample `i` (0-based, as `MSDiffusionDataset` counts),
  `{i}.prompt_embeds` (77, D), `{i}.pooled_prompt_embeds` (P,), and for its S subjects in manifest
  order `{i}.phrase_embeds` (S, 768) and `{i}.image_features` (S, L, E). Each shard's metadata maps
  `i` to a hash of the manifest line, so an edited line is caught instead of read stale.

Every file is written under a temporary name, flushed and renamed, so a shard is either complete or
absent whenever the command is killed. A shard whose lines are unchanged is kept when the command runs
again (interrupted runs resume).
Size: about 0.9 MB per subject in float16 with ViT-bigG (257 x 1664 features), plus 0.3 MB per caption.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..atomic import atomic_path, write_text_atomic
from ..data.dataset import MASK_COLORS, MSDiffusionDataset
from ..data.manifest import iter_lines
from .conditioning import NullFeatures
from .models import reference_pixels_size

CACHE_FORMAT = "msdiffusion-feature-cache"
CACHE_VERSION = 1
CACHE_CONFIG = "cache.json"
NULLS_FILE = "nulls.safetensors"
DEFAULT_SHARD_SIZE = 256


class CacheError(ValueError):
    """A cache that does not match the training config or the manifest."""


def line_hash(text: str) -> str:
    return hashlib.sha1(text.strip().encode("utf-8")).hexdigest()[:16]


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


# --- writing ---------------------------------------------------------------------------------------


class _ReferenceLoader(torch.utils.data.Dataset):
    """Manifest samples -> (index, line hash, caption, phrases, reference pixels), read in DataLoader workers.

    References go through `MSDiffusionDataset`'s own cropping/masking and CLIP preprocessing, so the
    cached features are those the dataset would have produced.
    """

    def __init__(
        self, dataset: MSDiffusionDataset, indices: list[int], lines: list[tuple[int, int, str]], reference_size: int
    ):
        self.dataset, self.indices, self.lines, self.reference_size = dataset, indices, lines, reference_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        from ..subjects import prepare_reference_pixels

        index = self.indices[k]
        number, _, text = self.lines[index]
        sample = self.dataset.sample(index)
        where = f"{self.dataset.manifest}:{number}"
        opened: dict = {}
        references = [
            self.dataset.reference_image(s.reference, opened, where, j) for j, s in enumerate(sample.subjects)
        ]
        pixels = (
            prepare_reference_pixels(references, self.dataset.image_processor, self.reference_size)
            if references
            else torch.zeros(0, 3, *reference_pixels_size(self.dataset.image_processor))
        )
        return {
            "index": index,
            "hash": line_hash(text),
            "caption": sample.caption,
            "phrases": [s.phrase for s in sample.subjects],
            "pixels": pixels,
        }


def write_cache(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    text_encoders,
    image_encoder,
    image_processor,
    settings: dict[str, Any],
    reference_size: int,
    mask_references: bool = True,
    mask_color: tuple[int, int, int] = MASK_COLORS["black"],
    batch_size: int = 16,
    workers: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Write (or complete) the cache of `manifest` in `out`; returns counts of samples written and kept."""
    from safetensors.torch import save_file

    from .conditioning import null_features

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = MSDiffusionDataset(
        manifest,
        resolution=reference_size,
        mask_references=mask_references,
        mask_color=mask_color,
        reference_square_size=reference_size,
        image_processor=image_processor,
        validate=True,
    )
    lines = list(iter_lines(manifest))
    info = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "manifest": str(Path(manifest).resolve()),
        "num_samples": len(lines),
        "shard_size": shard_size,
        "reference_size": reference_size,
        "mask_references": mask_references,
        "mask_color": list(dataset.mask_color) if mask_references else None,
        "dtype": str(dtype).removeprefix("torch."),
        **settings,
    }
    # Shards of other settings are useless; lines and shard contents are matched by hash below.
    previous = _read_info(out)
    unchecked = ("num_samples", "manifest")
    if previous is not None and any(previous.get(k) != v for k, v in info.items() if k not in unchecked):
        for path in [p for p in out.iterdir() if p.name.startswith("shard-")]:
            path.unlink()
    write_text_atomic(out / CACHE_CONFIG, json.dumps(info, indent=2) + "\n")  # before any shard: they follow it
    pixels_shape = (3, *reference_pixels_size(image_processor))
    nulls = null_features(text_encoders, image_encoder, device, pixels_shape)
    with atomic_path(out / NULLS_FILE) as tmp:
        save_file({k: v.to(dtype).contiguous().cpu() for k, v in nulls.tensors().items()}, tmp)

    counts = {"written": 0, "kept": 0}
    num_shards = -(-len(lines) // shard_size)
    for shard in range(num_shards):
        indices = list(range(shard * shard_size, min(len(lines), (shard + 1) * shard_size)))
        hashes = {str(i): line_hash(lines[i][2]) for i in indices}
        if _shard_hashes(out / shard_name(shard)) == hashes:
            counts["kept"] += len(indices)
            if progress:
                progress(counts["written"] + counts["kept"], len(lines))
            continue
        loader = torch.utils.data.DataLoader(
            _ReferenceLoader(dataset, indices, lines, reference_size),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=list,
        )
        tensors: dict[str, torch.Tensor] = {}
        for items in loader:
            tensors.update(_encode_items(items, text_encoders, image_encoder, device, dtype, batch_size))
            counts["written"] += len(items)
            if progress:
                progress(counts["written"] + counts["kept"], len(lines))
        with atomic_path(out / shard_name(shard)) as tmp:
            save_file(tensors, tmp, metadata=hashes)
    for path in out.glob("shard-*.safetensors"):  # past the end of a manifest that got shorter
        if int(path.stem.removeprefix("shard-")) >= num_shards:
            path.unlink()
    return counts


@torch.no_grad()
def _encode_items(items, text_encoders, image_encoder, device, dtype, batch_size: int) -> dict[str, torch.Tensor]:
    prompt, pooled = text_encoders.encode_captions([item["caption"] for item in items], device)
    phrases = [p for item in items for p in item["phrases"]]
    phrase_embeds = text_encoders.encode_phrases(phrases, device) if phrases else None
    pixels = torch.cat([item["pixels"] for item in items])
    features = []
    for chunk in pixels.split(batch_size):
        if len(chunk):
            hidden = image_encoder(chunk.to(device, image_encoder.dtype), output_hidden_states=True).hidden_states[-2]
            features.append(hidden)
    features = torch.cat(features) if features else None

    tensors = {}
    start = 0
    for k, item in enumerate(items):
        i, count = item["index"], len(item["phrases"])
        tensors[f"{i}.prompt_embeds"] = prompt[k]
        tensors[f"{i}.pooled_prompt_embeds"] = pooled[k]
        if count:
            tensors[f"{i}.phrase_embeds"] = phrase_embeds[start : start + count]
            tensors[f"{i}.image_features"] = features[start : start + count]
        start += count
    return {k: v.to(dtype).contiguous().cpu() for k, v in tensors.items()}


def _read_info(folder: Path) -> dict | None:
    path = folder / CACHE_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _shard_hashes(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # a truncated or foreign file: rewrite it
        return None


# --- reading ---------------------------------------------------------------------------------------


class FeatureCache:
    """Read access to a cache folder; file handles are opened lazily in each process (DataLoader workers too)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        info = _read_info(self.folder)
        if info is None or info.get("format") != CACHE_FORMAT:
            raise CacheError(
                f"{self.folder} is not a feature cache (no {CACHE_CONFIG}); write one with "
                "`msdiff data cache MANIFEST --base ... --image-encoder ... --out FOLDER`"
            )
        if info.get("version") != CACHE_VERSION:
            raise CacheError(f"{self.folder} was written by another version of the cache format; rebuild it")
        self.info = info
        self._handles: dict[int, Any] = {}

    def __getstate__(self):  # handles are per process
        return {**self.__dict__, "_handles": {}}

    def check(self, expected: dict[str, Any], lines: list[tuple[int, str]]) -> None:
        """Raise `CacheError` naming each setting that differs from the training config's, or the first
        manifest line (number, text) changed since caching."""
        problems = [
            f"{key}: the cache has {self.info.get(key)!r}, the training config {value!r}"
            for key, value in expected.items()
            if self.info.get(key) != value
        ]
        if self.info["num_samples"] != len(lines):
            problems.append(f"samples: the cache has {self.info['num_samples']}, the manifest {len(lines)}")
        if problems:
            raise CacheError(
                f"the feature cache {self.folder} does not match this training run:\n  "
                + "\n  ".join(problems)
                + "\nRebuild it with `msdiff data cache` using the same settings, or train without `cache`."
            )
        size = self.info["shard_size"]
        for shard in range(-(-len(lines) // size)):
            stored = _shard_hashes(self.folder / shard_name(shard))
            if stored is None:
                raise CacheError(
                    f"{self.folder / shard_name(shard)} is missing or unreadable: the cache is incomplete; "
                    "run `msdiff data cache` again to finish it"
                )
            for index in range(shard * size, min(len(lines), (shard + 1) * size)):
                number, text = lines[index]
                if stored.get(str(index)) != line_hash(text):
                    raise CacheError(
                        f"the feature cache {self.folder} is stale from manifest line {number} on (the line changed "
                        "after caching); run `msdiff data cache` again (unchanged shards are kept)"
                    )

    def nulls(self) -> NullFeatures:
        from safetensors.torch import load_file

        tensors = load_file(self.folder / NULLS_FILE)
        return NullFeatures(
            tensors["prompt_embeds"],
            tensors["pooled_prompt_embeds"],
            tensors["image_features"],
            tensors["phrase_embeds"],
        )

    def _handle(self, shard: int):
        if shard not in self._handles:
            from safetensors import safe_open

            path = self.folder / shard_name(shard)
            if not path.is_file():
                raise CacheError(
                    f"{path} is missing: the cache is incomplete; run `msdiff data cache` again to finish it"
                )
            handle = safe_open(path, "pt")
            self._handles[shard] = (handle, set(handle.keys()))
        return self._handles[shard]

    def read(self, index: int) -> dict[str, torch.Tensor | None]:
        """The features of manifest sample `index` (`phrase_embeds`/`image_features` None without subjects)."""
        handle, keys = self._handle(index // self.info["shard_size"])
        names = ("prompt_embeds", "pooled_prompt_embeds", "phrase_embeds", "image_features")
        return {name: handle.get_tensor(f"{index}.{name}") if f"{index}.{name}" in keys else None for name in names}


class CachedFeatureDataset(MSDiffusionDataset):
    """`MSDiffusionDataset` whose subjects come as cached features instead of reference pixels.

    Targets, crops, boxes and the choice of subjects are the parent's (same functions, same
    `(seed, epoch, index)` randomness); reference images are never opened. Items have the parent's
    keys except `subject_pixel_values`, plus `prompt_embeds`, `pooled_prompt_embeds`,
    `subject_phrase_embeds` (max_subjects, 768) and `subject_image_features` (max_subjects, L, E),
    zeros in padding slots.
    """

    def __init__(self, manifest, cache: FeatureCache, expected_settings: dict[str, Any], **kwargs):
        super().__init__(manifest, **kwargs)
        cache.check(expected_settings, [(number, text) for number, _, text in iter_lines(self.manifest)])
        self.cache = cache
        nulls = cache.nulls()
        self._phrase_shape = tuple(nulls.phrase_embeds.shape)
        self._image_shape = tuple(nulls.image_features.shape)
        self._cache_dtype = nulls.phrase_embeds.dtype

    def __getitem__(self, index: int) -> dict[str, Any]:
        target = self.cropped_target(index)  # the parent's choice of subjects and boxes
        sample, kept = target.sample, target.kept

        cached = self.cache.read(index)
        phrase_embeds = torch.zeros(self.max_subjects, *self._phrase_shape, dtype=self._cache_dtype)
        image_features = torch.zeros(self.max_subjects, *self._image_shape, dtype=self._cache_dtype)
        boxes = torch.zeros(self.max_subjects, 4)
        phrases = [""] * self.max_subjects
        for slot, (j, box) in enumerate(kept):
            phrase_embeds[slot] = cached["phrase_embeds"][j]
            image_features[slot] = cached["image_features"][j]
            boxes[slot] = torch.tensor(box)
            phrases[slot] = sample.subjects[j].phrase
        return {
            "pixel_values": target.pixels,
            "caption": sample.caption,
            "original_size": target.original_size,
            "crop_top_left": target.crop_top_left,
            "target_size": target.target_size,
            "subject_phrases": phrases,
            "subject_boxes": boxes,
            "num_subjects": len(kept),
            "index": index,
            "prompt_embeds": cached["prompt_embeds"],
            "pooled_prompt_embeds": cached["pooled_prompt_embeds"],
            "subject_phrase_embeds": phrase_embeds,
            "subject_image_features": image_features,
        }


def collate_cached(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate_subjects` for `CachedFeatureDataset` items."""
    from ..data.dataset import collate_subjects

    tensors = ("prompt_embeds", "pooled_prompt_embeds", "subject_phrase_embeds", "subject_image_features")
    extra = {key: torch.stack([item[key] for item in batch]) for key in tensors}
    # collate_subjects stacks reference pixels; cached items have none, so give it empty ones.
    plain = [
        {**{k: v for k, v in item.items() if k not in tensors}, "subject_pixel_values": torch.empty(0)}
        for item in batch
    ]
    out = collate_subjects(plain)
    del out["subject_pixel_values"]
    out.update(extra)
    return out
