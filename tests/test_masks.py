"""Subject regions of any shape: `subject_masks` beside (or instead of) `subject_boxes`."""

import math
import random

import numpy as np
import PIL.Image
import pytest
import torch

from msdiffusion.layout import SubjectLayout, box_regions, mask_regions, regions_to_bias, with_mask_regions
from msdiffusion.subjects import build_subjects, check_mask, mask_bounding_box, rasterise_polygon
from msdiffusion.tiny import tiny_pipeline

PROMPT = "a dog and a cat on the beach"
SIZE = (128, 192)  # height, width: latent 16x24, cross-attention grids 8x12 and 4x6
# On pixel edges of the 128x192 output (and of the 96x64 masks below): x in 1/192ths (1/96ths), y in 1/128ths (1/64ths).
BOXES = [[0.0, 32 / 128, 88 / 192, 96 / 128], [96 / 192, 24 / 128, 1.0, 104 / 128]]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def subject_images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 255, (80, 60, 3), dtype=np.uint8)) for _ in range(2)]


def generate(pipe, seed=0, **kwargs):
    args = dict(prompt=PROMPT, num_inference_steps=2, height=SIZE[0], width=SIZE[1], output_type="np")
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(seed), **args).images


def rectangle(box, height, width, kind="pil"):
    """The box's rectangle as a mask of `height x width` pixels (white inside)."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = 255
    if kind == "pil":
        return PIL.Image.fromarray(mask)
    if kind == "bool":
        return mask > 0
    return torch.from_numpy(mask.astype(np.float32) / 255)


def cells(region, w):
    return {(int(i) // w, int(i) % w) for i in torch.nonzero(region).flatten()}


# ---- the layout ---------------------------------------------------------------------------


def test_a_rectangle_mask_covers_exactly_its_boxs_cells():
    """Bit for bit, for any mask size and grid (odd, non-square, finer or coarser than the mask)."""
    rng = random.Random(0)
    for _ in range(300):
        mh, mw = rng.randint(1, 70), rng.randint(1, 70)
        r0, c0 = rng.randrange(mh), rng.randrange(mw)
        r1, c1 = rng.randint(r0 + 1, mh), rng.randint(c0 + 1, mw)
        mask = torch.zeros(mh, mw, dtype=torch.bool)
        mask[r0:r1, c0:c1] = True
        box = mask_bounding_box(mask)
        assert box == (c0 / mw, r0 / mh, c1 / mw, r1 / mh)
        for h, w in [(rng.randint(1, 90), rng.randint(1, 90)), (mh, mw), (3, 5), (64, 64)]:
            expected = box_regions(torch.tensor([[box]], dtype=torch.float64), h, w)[0, 0]
            assert torch.equal(mask_regions(mask, h, w), expected), (mh, mw, r0, r1, c0, c1, h, w)


def test_a_two_part_mask_covers_both_parts_and_not_the_gap():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[8:24, 4:20] = True  # top left
    mask[40:60, 44:60] = True  # bottom right
    region = mask_regions(mask, 8, 8)
    assert cells(region, 8) == {(r, c) for r in range(1, 3) for c in range(0, 3)} | {
        (r, c) for r in range(5, 8) for c in range(5, 8)
    }
    bounding = box_regions(torch.tensor([[mask_bounding_box(mask)]], dtype=torch.float64), 8, 8)[0, 0]
    assert region.sum() < bounding.sum() and not (region & ~bounding).any()


def test_overlapping_masks_share_the_cells_they_both_cover():
    a = torch.zeros(32, 32, dtype=torch.bool)
    a[:, :20] = True
    b = torch.zeros(32, 32, dtype=torch.bool)
    b[:, 12:] = True
    layout_regions = with_mask_regions(torch.zeros(1, 2, 16, dtype=torch.bool), [[a, b]], 4, 4)
    bias, inside = regions_to_bias(layout_regions, tokens_per_subject=2, num_dummy_tokens=1, dtype=torch.float32)
    visible = bias[0, 0] == 0  # (cells, tokens): dummy, subject 0 x2, subject 1 x2
    for cell in range(16):
        column = cell % 4
        assert bool(visible[cell, 1:3].all()) == (column <= 2)  # a covers columns 0..2 (20/32 * 4 = 2.5)
        assert bool(visible[cell, 3:5].all()) == (column >= 1)  # b covers columns 1..3 (12/32 * 4 = 1.5)
        assert not visible[cell, 0]  # every cell is in some region: no dummy token
    assert inside.all()


def test_layout_keeps_box_regions_where_no_mask_and_repeats_masks():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]], dtype=torch.float64)
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[0, 9] = True  # one pixel, top right
    layout = SubjectLayout(boxes=boxes, latent_size=(8, 8), masks=[[None, mask]])
    regions = with_mask_regions(box_regions(boxes, 4, 4), layout.masks, 4, 4)
    assert torch.equal(regions[0, 0], box_regions(boxes, 4, 4)[0, 0])
    assert cells(regions[0, 1], 4) == {(0, 3)}
    repeated = layout.repeat_interleave(3)
    assert len(repeated.masks) == 3 and repeated.masks[2][1] is mask
    with pytest.raises(ValueError, match="one row of at most 2 entries per sample"):
        SubjectLayout(boxes=boxes, latent_size=(8, 8), masks=[[None, mask], [None]])
    with pytest.raises(ValueError, match="bool tensor"):
        SubjectLayout(boxes=boxes, latent_size=(8, 8), masks=[[mask.float()]])


# ---- inputs -------------------------------------------------------------------------------


def test_mask_inputs_of_every_kind_and_their_bounding_box(subject_images):
    box = BOXES[0]
    expected = torch.from_numpy(rectangle(box, 64, 96, "bool"))
    for given in (
        rectangle(box, 64, 96, "pil"),
        rectangle(box, 64, 96, "pil").convert("RGB"),
        rectangle(box, 64, 96, "bool"),
        rectangle(box, 64, 96, "bool").astype(np.uint8) * 255,
        rectangle(box, 64, 96, "tensor"),
        rectangle(box, 64, 96, "tensor")[None],
    ):
        assert torch.equal(check_mask(given), expected), type(given)
    subjects = build_subjects(1, subject_images, ["dog", "cat"], subject_masks=[rectangle(box, 64, 96), None])[0]
    assert subjects[0].box == tuple(box) and subjects[1].box == (0.0, 0.0, 0.0, 0.0)
    # beside a box, the resampler reads the box given
    given_box = [0.1, 0.1, 0.9, 0.9]
    subjects = build_subjects(1, subject_images[:1], ["dog"], [given_box], subject_masks=[rectangle(box, 64, 96)])[0]
    assert subjects[0].box == tuple(given_box) and subjects[0].mask.shape == (64, 96)
    # a polygon: its points' bounding box
    triangle = [(0.1, 0.2), (0.6, 0.2), (0.35, 0.9)]
    subjects = build_subjects(1, subject_images[:1], ["dog"], subject_masks=[triangle])[0]
    assert subjects[0].box == (0.1, 0.2, 0.6, 0.9)


def test_polygons_are_rasterised_at_pixel_centres():
    square = rasterise_polygon([(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75)], 8, 8)
    assert torch.equal(square, torch.from_numpy(rectangle((0.25, 0.25, 0.75, 0.75), 8, 8, "bool")))
    triangle = rasterise_polygon([(0, 0), (1, 0), (0, 1)], 100, 100)
    assert abs(int(triangle.sum()) - 5000) <= 100  # half the pixels
    assert triangle[0, 0] and not triangle[99, 99]
    ring = rasterise_polygon([(0, 0), (1, 0), (1, 1), (0, 1), (0, 0), (0.25, 0.25), (0.25, 0.75), (0.75, 0.75), (0.75, 0.25), (0.25, 0.25)], 8, 8)  # fmt: skip
    assert not ring[2:6, 2:6].any() and ring[0].all()  # even-odd: the hole stays out


@pytest.mark.parametrize(
    "masks,error,match",
    [
        ([np.zeros((8, 8), bool), None], ValueError, "subject 0 mask: the mask is empty"),
        ([None, 3.5], TypeError, "subject 1 mask: expected a mask image"),
        ([None], ValueError, "subject_masks=1"),
        ("mask.png", TypeError, "one entry per subject"),
        ([np.full((4, 4), 2.0), None], ValueError, r"values in \[0, 1\]"),
        ([[(0.1, 0.1), (0.5, 0.5)], None], ValueError, "at least 3 points"),
        ([[(0.1, 0.1), (1.5, 0.5), (0.2, 0.9)], None], ValueError, "fractions of the output image"),
        ([[(0.1, 0.1), (0.2, 0.2), (0.3, 0.3)], None], ValueError, "encloses no area"),
        ([np.ones((2, 3, 4, 5)), None], ValueError, "expected an HxW mask"),
    ],
    ids=["empty", "wrong-type", "count", "not-a-list", "float-range", "two-points", "outside", "flat", "4-d"],
)
def test_clear_errors(subject_images, masks, error, match):
    with pytest.raises(error, match=match):
        build_subjects(1, subject_images, ["dog", "cat"], subject_masks=masks)


# ---- the pipeline -------------------------------------------------------------------------


def test_masks_equal_to_their_boxes_give_the_same_image_bit_for_bit(pipe, subject_images):
    expected = generate(pipe, subject_images=subject_images, subject_phrases=["dog", "cat"], subject_boxes=BOXES)
    for masks in (
        [rectangle(b, *SIZE) for b in BOXES],  # the output's size
        [rectangle(b, 64, 96, "tensor") for b in BOXES],  # half of it
        [[(b[0], b[1]), (b[2], b[1]), (b[2], b[3]), (b[0], b[3])] for b in BOXES],  # polygons
    ):
        got = generate(pipe, subject_images=subject_images, subject_phrases=["dog", "cat"], subject_masks=masks)
        np.testing.assert_array_equal(got, expected)
    both = generate(
        pipe,
        subject_images=subject_images,
        subject_phrases=["dog", "cat"],
        subject_boxes=BOXES,
        subject_masks=[rectangle(BOXES[0], *SIZE), None],
    )
    np.testing.assert_array_equal(both, expected)


def test_a_mask_confines_the_subject_at_every_resolution(pipe, subject_images, monkeypatch):
    from msdiffusion.adapter import ms_attention_state

    two_parts = np.zeros(SIZE, dtype=bool)
    two_parts[0:32, 0:64] = True  # on the coarsest grid's cell edges (32 px), so that cells are easy to name
    two_parts[64:128, 128:192] = True
    state = ms_attention_state(pipe.unet)
    seen = {}
    original = state.box_masks

    def spy(h, w, device, dtype):
        seen[(h, w)] = original(h, w, device, dtype)
        return seen[(h, w)]

    monkeypatch.setattr(state, "box_masks", spy)
    args = dict(subject_images=subject_images[:1], subject_phrases=["dog"])
    masked = generate(pipe, subject_masks=[two_parts], **args)
    assert set(seen) == {(8, 12), (4, 6)}
    for (h, w), (bias, inside) in seen.items():
        expected = {(r, c) for r in range(h) for c in range(w) if two_parts[r * 128 // h, c * 192 // w]}
        assert cells(inside[0, :, 0] > 0, w) == expected
        assert cells(bias[0, 0, :, 4] == 0, w) == expected  # the subject's tokens
        assert cells(bias[0, 0, :, 0] == 0, w) == {(r, c) for r in range(h) for c in range(w)} - expected
    monkeypatch.undo()
    bounding = generate(pipe, subject_boxes=[mask_bounding_box(torch.from_numpy(two_parts))], **args)
    assert not np.allclose(masked, bounding, atol=1e-4)  # the gap between the parts is not the subject's


def test_a_mask_of_another_shape_is_stretched_with_a_warning(pipe, subject_images):
    args = dict(subject_images=subject_images, subject_phrases=["dog", "cat"])
    square = [rectangle(b, 64, 64) for b in BOXES]
    with pytest.warns(UserWarning, match="64x64 mask is stretched over the 192x128 output"):
        stretched = generate(pipe, subject_masks=square, **args)
    assert np.isfinite(stretched).all()
    # round() snaps the boxes to 1/64ths; stretched, those are the same fractions of the output
    snapped = [mask_bounding_box(check_mask(m)) for m in square]
    np.testing.assert_array_equal(stretched, generate(pipe, subject_boxes=snapped, **args))


def test_auto_layout_and_prepared_subjects_and_batches_with_masks(pipe, subject_images):
    masks = [rectangle(BOXES[0], *SIZE), [(0.5, 0.1), (1.0, 0.5), (0.6, 0.95)]]
    args = dict(subject_images=subject_images, subject_phrases=["dog", "cat"], subject_masks=masks)
    out = pipe(
        prompt=PROMPT,
        num_inference_steps=3,
        height=SIZE[0],
        width=SIZE[1],
        mask_threshold=0.5,
        start_step=2,
        output_type="np",
        **args,
    )
    assert out.images.shape == (1, *SIZE, 3) and out.auto_layout_maps.shape == (1, 2, 8, 12)
    # before `start_step` auto layout uses the masks' regions
    never = generate(pipe, mask_threshold=0.5, start_step=10, **args)
    np.testing.assert_allclose(never, generate(pipe, **args), atol=1e-5)

    prepared = pipe.prepare_subjects(subject_images, ["dog", "cat"], subject_masks=masks)
    np.testing.assert_array_equal(generate(pipe, prepared_subjects=prepared), generate(pipe, **args))
    with pytest.raises(ValueError, match="either prepared_subjects or subject_masks"):
        generate(pipe, prepared_subjects=prepared, subject_masks=masks)

    # per prompt: one with masks, one with a box; two images each
    batch = pipe(
        prompt=[PROMPT, "a cat on the grass"],
        subject_images=[subject_images, subject_images[1:]],
        subject_phrases=[["dog", "cat"], ["cat"]],
        subject_boxes=[None, [BOXES[1]]],
        subject_masks=[masks, None],
        num_images_per_prompt=2,
        num_inference_steps=2,
        height=SIZE[0],
        width=SIZE[1],
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)],
    ).images
    assert batch.shape == (4, *SIZE, 3)
    np.testing.assert_allclose(batch[0], generate(pipe, seed=1, **args)[0], atol=2e-4)


def test_a_polygon_too_thin_for_the_output_is_refused(pipe, subject_images):
    sliver = [(0.1, 0.1), (0.9, 0.1), (0.9, 0.1 + 1e-4)]
    with pytest.raises(ValueError, match="covers no pixel centre of the 192x128 output"):
        generate(pipe, subject_images=subject_images[:1], subject_phrases=["dog"], subject_masks=[sliver])
    assert math.isfinite(sum(mask_bounding_box(tuple(sliver))))
