"""The training dataset: documented keys and shapes, crop geometry, references, collation."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from msdiffusion.data.dataset import MSDiffusionDataset, collate_subjects, transform_box
from msdiffusion.data.manifest import ManifestError
from msdiffusion.subjects import default_image_processor, prepare_reference_pixels

KEYS = {
    "pixel_values",
    "caption",
    "original_size",
    "crop_top_left",
    "target_size",
    "subject_pixel_values",
    "subject_phrases",
    "subject_boxes",
    "num_subjects",
    "index",
}


@pytest.fixture(scope="module")
def processor():
    return default_image_processor()


def _manifest(folder, records):
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def wide(tmp_path):
    """A 200x100 target, red left half and blue right half, with four subjects around the centre crop."""
    image = PIL.Image.new("RGB", (200, 100), "red")
    image.paste((0, 0, 255), (100, 0, 200, 100))
    image.save(tmp_path / "wide.png")
    reference = PIL.Image.new("RGB", (40, 40), (0, 255, 0))
    reference.paste((0, 0, 255), (20, 0, 40, 40))
    reference.save(tmp_path / "ref.png")
    mask = PIL.Image.new("L", (40, 40), 0)
    mask.paste(255, (10, 10, 30, 30))
    mask.save(tmp_path / "mask.png")
    subjects = [
        {"phrase": "left dog", "box": [0.0, 0.0, 0.2, 1.0], "reference": "ref.png"},  # outside the crop
        {
            "phrase": "dog",
            "box": [0.25, 0.1, 0.5, 0.9],
            "reference": {"image": "ref.png", "crop": [0.5, 0.0, 1.0, 1.0]},
        },
        {
            "phrase": "cat",
            "box": [0.1, 0.0, 0.4, 0.5],
            "reference": {"image": "ref.png", "mask": "mask.png"},
        },  # half cut
        {"phrase": "ball", "box": [0.7, 0.2, 0.9, 0.8], "reference": "ref.png"},  # 25% visible
    ]
    records = [
        {"image": "wide.png", "caption": "a dog, a cat, a ball and a left dog", "subjects": subjects},
        {"image": "wide.png", "caption": "nothing", "subjects": []},
    ]
    return _manifest(tmp_path, records)


def test_sample_keys_shapes_and_centre_crop_geometry(wide, processor):
    dataset = MSDiffusionDataset(wide, resolution=64, crop="center", image_processor=processor)
    assert len(dataset) == 2
    item = dataset[0]
    assert set(item) == KEYS
    # 200x100 -> covers 64x64 at scale 0.64 -> 128x64, centre crop starts 32 px from the left.
    assert item["original_size"] == (100, 200)
    assert item["crop_top_left"] == (0, 32)
    assert item["target_size"] == (64, 64)
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    # The red/blue border (x = 100 of 200) lands at x = 64 - 32 = 32 in the crop.
    assert torch.allclose(item["pixel_values"][:, 32, 10], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(item["pixel_values"][:, 32, 50], torch.tensor([-1.0, -1.0, 1.0]))

    # "left dog" is outside the crop, "ball" keeps 25% < 30% of its area: both dropped.
    # dog: x 0.25*128-32 = 0 .. 0.5*128-32 = 32; cat: x -19.2 .. 19.2 clipped to 0 .. 19.2.
    assert item["num_subjects"] == 2
    assert item["subject_phrases"] == ["dog", "cat", "", ""]
    expected = torch.tensor([[0.0, 0.1, 0.5, 0.9], [0.0, 0.0, 19.2 / 64, 0.5], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.allclose(item["subject_boxes"], expected, atol=1e-6)
    assert item["subject_pixel_values"].shape == (4, 3, 224, 224)
    assert not item["subject_pixel_values"][2:].any()
    assert item["index"] == 0 and item["caption"] == "a dog, a cat, a ball and a left dog"

    empty = dataset[1]
    assert empty["num_subjects"] == 0 and empty["subject_phrases"] == [""] * 4 and not empty["subject_boxes"].any()


def test_references_are_cropped_masked_and_clip_preprocessed(wide, processor):
    reference = PIL.Image.open(wide.parent / "ref.png").convert("RGB")
    crop = reference.crop((20, 0, 40, 40))  # [0.5, 0, 1, 1] of a 40x40 image: the blue half
    masked = PIL.Image.new("RGB", (40, 40), (0, 0, 0))  # black background by default, as in the release
    masked.paste(reference.crop((10, 10, 30, 30)), (10, 10))
    dataset = MSDiffusionDataset(wide, resolution=64, crop="center", image_processor=processor)
    item = dataset[0]
    expected = prepare_reference_pixels([crop, masked], processor, 64)
    assert torch.equal(item["subject_pixel_values"][:2], expected)

    white = MSDiffusionDataset(
        wide, resolution=64, crop="center", image_processor=processor, mask_color=(255, 255, 255)
    )
    masked_white = PIL.Image.new("RGB", (40, 40), (255, 255, 255))
    masked_white.paste(reference.crop((10, 10, 30, 30)), (10, 10))
    assert torch.equal(white[0]["subject_pixel_values"][1], prepare_reference_pixels([masked_white], processor, 64)[0])

    unmasked = MSDiffusionDataset(wide, resolution=64, crop="center", image_processor=processor, mask_references=False)
    assert torch.equal(unmasked[0]["subject_pixel_values"][1], prepare_reference_pixels([reference], processor, 64)[0])


def test_random_crops_are_reproducible_and_move_boxes_consistently(tmp_path, processor):
    PIL.Image.new("RGB", (120, 80), "white").save(tmp_path / "t.png")
    box = [0.3, 0.2, 0.7, 0.9]
    manifest = _manifest(
        tmp_path,
        [{"image": "t.png", "caption": "a cup", "subjects": [{"phrase": "cup", "box": box, "reference": "t.png"}]}],
    )
    dataset = MSDiffusionDataset(
        manifest, resolution=(32, 32), crop="random", seed=3, image_processor=processor, min_visible_fraction=0.0
    )
    crops = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        first, again = dataset[0], dataset[0]
        assert first["crop_top_left"] == again["crop_top_left"]  # depends on (seed, epoch, index) only
        top, left = first["crop_top_left"]
        crops.add((top, left))
        # 120x80 -> 48x32: the crop moves along x only.
        assert top == 0 and 0 <= left <= 16
        x0, x1 = box[0] * 48 - left, box[2] * 48 - left
        expected = [max(x0, 0) / 32, box[1], min(x1, 32) / 32, box[3]]
        assert torch.allclose(first["subject_boxes"][0], torch.tensor(expected), atol=1e-6)
    assert len(crops) > 1


def test_transform_box_keeps_non_square_geometry():
    # 100x50 image (h=50, w=100) resized x2 to 200x100, crop (10, 30) of size 64x128 (h, w).
    # In resized pixels the box is x 20..100, y 10..90; shifted by the crop: x -10..70, y 0..80; clipped
    # to 128x64: x 0..70, y 0..64 (70% of its area stays visible).
    box = transform_box([0.1, 0.1, 0.5, 0.9], (50, 100), (2.0, 2.0), (10, 30), (64, 128), min_visible_fraction=0.7)
    assert box == pytest.approx((0.0, 0.0, 70 / 128, 1.0))
    assert (
        transform_box([0.1, 0.1, 0.5, 0.9], (50, 100), (2.0, 2.0), (10, 30), (64, 128), min_visible_fraction=0.71)
        is None
    )
    assert transform_box([0.9, 0.9, 1.0, 1.0], (50, 100), (2.0, 2.0), (0, 0), (64, 128)) is None


def test_max_subjects_collate_and_dataloader(wide, processor):
    dataset = MSDiffusionDataset(wide, resolution=(48, 64), max_subjects=1, crop="center", image_processor=processor)
    item = dataset[0]
    assert item["num_subjects"] == 1 and item["subject_phrases"] == ["dog"]
    assert item["subject_pixel_values"].shape == (1, 3, 224, 224)
    assert item["pixel_values"].shape == (3, 48, 64) and item["target_size"] == (48, 64)

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_subjects)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, 48, 64)
    assert batch["subject_pixel_values"].shape == (2, 1, 3, 224, 224)
    assert batch["subject_boxes"].shape == (2, 1, 4)
    assert batch["original_size"].tolist() == [[100, 200], [100, 200]]
    assert batch["target_size"].dtype == torch.long and batch["crop_top_left"].shape == (2, 2)
    assert batch["num_subjects"].tolist() == [1, 0] and batch["index"].tolist() == [0, 1]
    assert batch["caption"] == ["a dog, a cat, a ball and a left dog", "nothing"]
    assert batch["subject_phrases"] == [["dog"], [""]]


def test_invalid_manifest_or_options_fail_early(tmp_path, processor):
    manifest = _manifest(tmp_path, [{"image": "none.png", "caption": "x", "subjects": []}])
    with pytest.raises(ManifestError, match=r"manifest.jsonl:1: image: file not found"):
        MSDiffusionDataset(manifest, image_processor=processor)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "none.png")
    with pytest.raises(ValueError, match="crop must be one of"):
        MSDiffusionDataset(manifest, crop="middle", image_processor=processor)
    with pytest.raises(IndexError):
        MSDiffusionDataset(manifest, image_processor=processor)[1]


def test_pixel_values_match_pil_resize(tmp_path, processor):
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "n.png")
    manifest = _manifest(tmp_path, [{"image": "n.png", "caption": "noise", "subjects": []}])
    item = MSDiffusionDataset(manifest, resolution=24, crop="center", image_processor=processor)[0]
    # 30x40 (w x h) -> 24x32, centre crop rows 4..28.
    expected = PIL.Image.open(tmp_path / "n.png").resize((24, 32), PIL.Image.BICUBIC).crop((0, 4, 24, 28))
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert item["crop_top_left"] == (4, 0) and torch.allclose(item["pixel_values"], expected)


def test_aspect_ratio_buckets(tmp_path, processor):
    from msdiffusion.data.buckets import BucketBatchSampler, nearest_bucket, sdxl_buckets

    buckets = sdxl_buckets(1024)
    assert {(1024, 1024), (896, 1152), (832, 1216), (768, 1344), (1152, 896)} <= set(buckets)
    assert all(h % 64 == 0 and w % 64 == 0 and max(h / w, w / h) <= 2 for h, w in buckets)
    assert all(abs(h * w - 1024**2) / 1024**2 < 0.1 for h, w in buckets)
    assert nearest_bucket(200, 100, [(64, 64), (32, 64), (64, 32)]) == 1

    records = []
    for k, size in enumerate([(200, 100), (100, 200), (90, 90), (210, 100), (64, 32)]):
        PIL.Image.new("RGB", size, "white").save(tmp_path / f"{k}.png")
        record = {
            "image": f"{k}.png",
            "caption": "a cup",
            "subjects": [{"phrase": "cup", "box": [0.25, 0.25, 0.75, 0.75], "reference": f"{k}.png"}],
        }
        if k == 4:
            record.update(width=64, height=32)  # sizes from the manifest, headers not needed
        records.append(record)
    manifest = _manifest(tmp_path, records)
    dataset = MSDiffusionDataset(
        manifest, buckets=[(32, 32), (32, 64), (64, 32)], crop="center", image_processor=processor
    )
    assert dataset.bucket_ids.tolist() == [1, 2, 0, 1, 1]
    wide = dataset[0]
    # 200x100 scales exactly onto 64x32: nothing cropped, the box is unchanged.
    assert wide["target_size"] == (32, 64) and wide["pixel_values"].shape == (3, 32, 64)
    assert wide["crop_top_left"] == (0, 0) and torch.allclose(
        wide["subject_boxes"][0], torch.tensor([0.25, 0.25, 0.75, 0.75])
    )
    assert dataset[1]["target_size"] == (64, 32)

    sampler = BucketBatchSampler(dataset.bucket_ids, batch_size=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    assert sorted(i for batch in batches for i in batch) == [0, 1, 2, 3, 4]
    assert all(len({int(dataset.bucket_ids[i]) for i in batch}) == 1 for batch in batches)
    assert list(sampler) == batches  # same epoch, same order
    orders = set()
    for epoch in range(8):
        sampler.set_epoch(epoch)
        orders.add(tuple(map(tuple, sampler)))
    assert len(orders) > 1
    assert (
        len(BucketBatchSampler(dataset.bucket_ids, batch_size=2, drop_last=True))
        == len(list(BucketBatchSampler(dataset.bucket_ids, batch_size=2, drop_last=True)))
        == 1
    )

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_subjects)
    assert all(batch["pixel_values"].shape[0] == len(batch["index"]) for batch in loader)
    with pytest.raises(ValueError, match="BucketBatchSampler"):
        collate_subjects([dataset[0], dataset[1]])
