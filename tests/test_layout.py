import warnings

import pytest
import torch
from reference_impl import reference_box_cells

from msdiffusion.layout import (
    SubjectLayout,
    auto_layout_regions,
    box_regions,
    latent_grid,
    phrase_token_positions,
    regions_to_bias,
)
from msdiffusion.tiny import tiny_tokenizers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizers(tmp_path_factory.mktemp("tok"))[0]


@pytest.mark.parametrize("h,w", [(3, 5), (12, 21), (24, 42), (8, 8), (1, 1)])
def test_box_regions_cell_by_cell(h, w):
    boxes = torch.tensor(
        [[[0.1, 0.2, 0.55, 0.9], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.33, 0.25, 0.34, 0.26]]],
        dtype=torch.float64,
    )
    regions = box_regions(boxes, h, w)
    assert regions.shape == (1, 4, h * w)
    for j in range(4):
        expected = reference_box_cells(boxes[0, j].tolist(), h, w)
        got = {(i // w, i % w) for i in range(h * w) if regions[0, j, i]}
        assert got == expected, (j, h, w)
    assert not regions[0, 2].any()  # a zero box covers nothing
    assert regions[0, 3].any()  # a sliver still covers the cells it touches


def test_latent_grid_follows_sdxl_downsampling():
    assert latent_grid((168, 96), 168 * 96) == (168, 96)
    assert latent_grid((168, 96), 84 * 48) == (84, 48)
    assert latent_grid((42, 24), 11 * 6) == (11, 6)  # 21x12 -> ceil halves
    with pytest.raises(ValueError, match="another image size"):
        latent_grid((42, 24), 100)


def test_bias_hides_tokens_outside_regions():
    regions = torch.tensor([[[True, False, False], [True, True, False]]])  # 2 subjects, 3 cells
    bias, inside = regions_to_bias(regions, tokens_per_subject=2, num_dummy_tokens=1, dtype=torch.float32)
    assert bias.shape == (1, 1, 3, 5)
    visible = bias[0, 0] == 0
    assert visible.tolist() == [
        [False, True, True, True, True],  # cell 0: both subjects
        [False, False, False, True, True],  # cell 1: subject 1
        [True, False, False, False, False],  # cell 2: dummy only
    ]
    assert inside[0, :, 0].tolist() == [1, 1, 0]
    assert bias.min() == -10000


def test_auto_layout_regions_min_max_threshold():
    maps = torch.tensor([[[0.0, 1.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0]]])
    regions = auto_layout_regions(maps, 0.4)
    assert regions[0, 0].tolist() == [False, False, True, True]
    assert not regions[0, 1].any()  # a phrase that was not found gets no region


def test_phrase_positions_use_tokens_case_and_punctuation(tokenizer):
    prompt = "A Dog, and a cat on the beach with another dog."
    positions = phrase_token_positions(tokenizer, prompt, ["dog", "cat", "dog", "dog", "bear"])
    ids = tokenizer(prompt).input_ids
    dog = tokenizer("dog", add_special_tokens=False).input_ids
    assert positions[0] and ids[positions[0][0] : positions[0][-1] + 1] == dog
    assert positions[0][0] == 2  # position 0 is the start token, then "a"
    assert positions[2][0] > positions[1][0] > positions[0][0]  # second "dog" maps to the second occurrence
    assert positions[3] == [] and positions[4] == []  # a third dog / an absent phrase are not found


def test_multi_token_phrase(tokenizer):
    positions = phrase_token_positions(tokenizer, "a photo of a teddy bear on a sofa", ["teddy bear"])
    assert len(positions[0]) == len(tokenizer("teddy bear", add_special_tokens=False).input_ids) >= 2


def test_layout_repeat_interleave_and_validation():
    layout = SubjectLayout(
        boxes=torch.rand(2, 3, 4),
        latent_size=(8, 8),
        subject_scales=torch.rand(2, 3),
        phrase_positions=[[[1], [2], []], [[3], [], []]],
        mask_threshold=0.5,
    )
    assert layout.num_image_tokens == 4 + 3 * 16
    repeated = layout.repeat_interleave(2)
    assert repeated.batch_size == 4
    assert torch.equal(repeated.boxes[1], layout.boxes[0]) and torch.equal(repeated.boxes[2], layout.boxes[1])
    assert repeated.phrase_positions[1] == layout.phrase_positions[0]
    with pytest.raises(ValueError, match="shape"):
        SubjectLayout(boxes=torch.rand(2, 4), latent_size=(8, 8))
    with pytest.raises(ValueError, match="token positions"):
        SubjectLayout(boxes=torch.rand(1, 1, 4), latent_size=(8, 8), mask_threshold=0.3)


def test_phrase_past_the_token_limit_is_named_as_such(tokenizer):

    from msdiffusion.layout import warn_missing_phrases

    prompt = "a photo of " + "the red beach " * 30 + "with a dog"  # "dog" is far past token 77
    phrases = ["dog", "cat", "photo"]
    positions = phrase_token_positions(tokenizer, prompt, phrases)
    assert positions[0] == [] and positions[1] == [] and positions[2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_missing_phrases(prompt, phrases, positions, auto_layout=False, tokenizer=tokenizer)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "'dog' lies past the 77th token of the prompt" in messages[0]
    assert "'cat' was not found in the prompt" in messages[1]
