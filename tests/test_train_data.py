"""The training DataLoader: persistent workers still read each epoch's crops; the order is (seed, epoch)-determined."""

from __future__ import annotations

from train_fixtures import write_manifest

from msdiffusion.train import TrainConfig
from msdiffusion.train.data import build_dataloader, build_dataset


def _crops(loader) -> dict[int, tuple[int, int]]:
    return {int(i): tuple(c) for batch in loader for i, c in zip(batch["index"], batch["crop_top_left"].tolist())}


def test_persistent_workers_read_every_epoch_as_the_dataset_would(tmp_path):
    manifest = write_manifest(tmp_path, 4, size=(192, 64))  # wide images: random crops move along x
    config = TrainConfig(
        base="b",
        image_encoder="e",
        manifest=str(manifest),
        resolution=64,
        train_batch_size=2,
        dataloader_workers=2,
        persistent_workers=True,
        min_visible_fraction=0.0,
    ).validate()
    loader, batches = build_dataloader(config, build_dataset(config), cached=False)
    assert loader.persistent_workers and loader.num_workers == 2
    reference = build_dataset(config)

    seen = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        crops = _crops(loader)  # the same worker processes every epoch
        reference.set_epoch(epoch)
        assert crops == {i: reference[i]["crop_top_left"] for i in crops}
        seen.append(crops)
    assert seen[0] != seen[1] or seen[1] != seen[2]  # crops do change with the epoch

    batches.set_epoch(1)
    order = [int(i) for batch in loader for i in batch["index"]]
    batches.set_epoch(1)
    assert order == [int(i) for batch in loader for i in batch["index"]]
    assert sorted(order) == [0, 1, 2, 3]
