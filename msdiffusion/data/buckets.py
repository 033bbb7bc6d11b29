"""Aspect-ratio buckets: train on wide and tall images without cropping them to squares.

Each image goes to the bucket (a training size) whose aspect ratio is closest to its own, and each
batch holds images of one bucket, so tensors stack. SDXL was trained this way, with sizes of about
1024x1024 pixels in multiples of 64.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def sdxl_buckets(resolution: int = 1024, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) sizes of about resolution**2 pixels, sides multiples of `step`, aspect up to `max_aspect`."""
    if resolution % step or resolution <= 0:
        raise ValueError(f"resolution ({resolution}) must be a positive multiple of step ({step})")
    sizes = set()
    width = step
    while width <= resolution * max_aspect:
        height = max(step, round(resolution * resolution / width / step) * step)
        if max(width / height, height / width) <= max_aspect:
            sizes.add((height, width))
        width += step
    return sorted(sizes, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(width: int, height: int, buckets: Sequence[Sequence[int]]) -> int:
    """Index of the (height, width) bucket whose aspect ratio is closest (in log scale) to width / height."""
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][1] / buckets[b][0]) - aspect))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that share a bucket, shuffled per epoch from (seed, epoch) alone.

    Give it `dataset.bucket_ids` and pass it as the DataLoader's `batch_sampler`; call `set_epoch`
    every epoch. Under `accelerate`, `prepare` shards these batches across processes.
    """

    def __init__(
        self, bucket_ids: Sequence[int], batch_size: int, shuffle: bool = True, drop_last: bool = False, seed: int = 0
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for bucket in np.unique(self.bucket_ids):
            indices = np.flatnonzero(self.bucket_ids == bucket)
            if self.shuffle:
                indices = rng.permutation(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size].tolist()
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        counts = np.bincount(self.bucket_ids) if len(self.bucket_ids) else np.array([], dtype=np.int64)
        if self.drop_last:
            return int(sum(c // self.batch_size for c in counts))
        return int(sum(-(-c // self.batch_size) for c in counts))
