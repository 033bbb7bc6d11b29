"""The training DataLoader: the manifest dataset (or its cached-features variant), batched by bucket.

Every index the sampler yields carries its epoch, `(epoch, index)`, and the dataset wrapper sets the
epoch in whichever process reads the item. So random crops depend on `(seed, epoch, index)` even
with persistent DataLoader workers (which never see a `set_epoch` called in the main process), and
a resumed run reads exactly the items an uninterrupted one would.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.buckets import BucketBatchSampler, sdxl_buckets
from ..data.dataset import MASK_COLORS, MSDiffusionDataset, SampleReadError, collate_subjects
from .config import ConfigError, TrainConfig


class EpochTaggedBatches(Sampler):
    """Batches of `(epoch, index)` from a `BucketBatchSampler`, reshuffled per epoch."""

    def __init__(self, batches: BucketBatchSampler):
        self.batches = batches
        self.batch_size = batches.batch_size  # accelerate shards by these two
        self.drop_last = batches.drop_last

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.batches.epoch
        for batch in self.batches:
            yield [(epoch, index) for index in batch]

    def __len__(self) -> int:
        return len(self.batches)


class EpochTaggedDataset(Dataset):
    """Reads `(epoch, index)` keys: sets the wrapped dataset's epoch in the reading process, then reads.

    With `skip_bad=True` a sample whose image cannot be read is replaced by the next readable one,
    and the item lists the skipped samples (`bad_samples`: their `manifest:line: problem` messages)
    for the training loop to count and report; otherwise the `SampleReadError` propagates.
    """

    # Consecutive unreadable samples after which reading gives up (the data is broken, not a file).
    MAX_CONSECUTIVE_BAD = 100

    def __init__(self, dataset: MSDiffusionDataset, skip_bad: bool = False):
        self.dataset = dataset
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        bad: list[str] = []
        candidates = self._replacements(index)
        for attempt in range(min(len(candidates), self.MAX_CONSECUTIVE_BAD)):
            try:
                item = self.dataset[int(candidates[attempt])]
            except SampleReadError as error:
                if not self.skip_bad:
                    raise
                bad.append(str(error))
                continue
            item["bad_samples"] = bad
            return item
        raise SampleReadError(f"{len(bad)} samples in a row cannot be read, the last: {bad[-1]}")

    def _replacements(self, index: int):
        """`index`, then the following samples of its bucket (a batch holds one size), wrapping around."""
        import numpy as np

        ids = self.dataset.bucket_ids
        same = np.arange(len(self.dataset)) if ids is None else np.flatnonzero(ids == ids[index])
        start = int(np.searchsorted(same, index))
        return np.roll(same, -start)


def build_dataset(
    config: TrainConfig, image_processor=None, cache=None, cache_settings: dict | None = None
) -> MSDiffusionDataset:
    kwargs = dict(
        resolution=config.resolution,
        max_subjects=config.max_subjects,
        crop=config.crop,
        min_visible_fraction=config.min_visible_fraction,
        mask_references=config.mask_references,
        mask_color=MASK_COLORS[config.mask_color],
        reference_square_size=config.reference_size,
        image_processor=image_processor,
        seed=config.seed,
        buckets=sdxl_buckets(config.resolution) if config.buckets else None,
    )
    if cache is not None:
        from .cache import CachedFeatureDataset

        return CachedFeatureDataset(config.manifest, cache, cache_settings or {}, **kwargs)
    return MSDiffusionDataset(config.manifest, **kwargs)


def build_dataloader(
    config: TrainConfig, dataset: MSDiffusionDataset, cached: bool
) -> tuple[DataLoader, EpochTaggedBatches]:
    """Shuffled full batches (one bucket each); the tail of each bucket is left for another epoch's order."""
    bucket_ids = dataset.bucket_ids if dataset.bucket_ids is not None else [0] * len(dataset)
    batches = EpochTaggedBatches(
        BucketBatchSampler(bucket_ids, config.train_batch_size, shuffle=True, drop_last=True, seed=config.seed)
    )
    if len(batches) == 0:
        raise ConfigError(
            [
                f"train_batch_size: the manifest's {len(dataset)} samples make no full batch of {config.train_batch_size}"
                + (" in any aspect-ratio bucket" if config.buckets else "")
                + "; lower it or add samples"
            ]
        )
    workers = config.dataloader_workers
    collate = collate_subjects
    if cached:
        from .cache import collate_cached

        collate = collate_cached
    loader = DataLoader(
        EpochTaggedDataset(dataset, skip_bad=config.bad_samples == "skip"),
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=config.pin_memory and torch.cuda.is_available(),
        persistent_workers=config.persistent_workers and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_leave_sigterm_to_the_main_process if workers > 0 else None,
    )
    return loader, batches


def _leave_sigterm_to_the_main_process(worker_id: int) -> None:
    """Schedulers such as Slurm send SIGTERM to every process of a job: a worker it ended would make the
    main process fail at the next batch instead of saving a checkpoint and stopping (loop.py).

    A worker therefore waits for SIGTERM in a thread, and ends on one sent by the main process (which
    stops workers that way) as PyTorch's own handler does, ignoring the others. (Ignoring every SIGTERM
    would hang the main process at exit: it terminates leftover workers with SIGTERM and joins them.)
    """
    import signal
    import threading

    if not hasattr(signal, "sigwaitinfo"):  # not on macOS or Windows: keep PyTorch's behaviour
        return
    # Threads started later inherit the mask, so the waiting thread below is the only one that gets it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-main-process", daemon=True).start()
