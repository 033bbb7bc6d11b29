"""Bad input gets a clear error (or a warning), never a silently wrong image."""

import warnings

import numpy as np
import PIL.Image
import pytest

from msdiffusion.subjects import check_box, load_image
from msdiffusion.tiny import tiny_pipeline

IMG = PIL.Image.new("RGB", (32, 32), (10, 200, 10))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


def call(pipe, **kwargs):
    args = dict(
        prompt="a dog and a cat",
        subject_images=[IMG, IMG],
        subject_phrases=["dog", "cat"],
        subject_boxes=[[0, 0, 0.5, 1], [0.5, 0, 1, 1]],
        num_inference_steps=1,
        height=64,
        width=64,
        output_type="latent",
    )
    args.update(kwargs)
    return pipe(**args)


@pytest.mark.parametrize(
    "box,match",
    [
        ([0.1, 0.1, 1.2, 0.5], "outside \\[0, 1\\]"),
        ([-0.1, 0.1, 0.5, 0.5], "outside \\[0, 1\\]"),
        ([0.5, 0.1, 0.5, 0.9], "x1 > x0"),
        ([0.6, 0.1, 0.5, 0.9], "x1 > x0"),
        ([0.1, 0.9, 0.5, 0.2], "y1 > y0"),
        ([0.1, 0.2, 0.3], "four numbers"),
        ([0.1, "a", 0.3, 0.4], "four numbers"),
        ([0.1, float("nan"), 0.3, 0.4], "finite"),
    ],
)
def test_bad_boxes(pipe, box, match):
    with pytest.raises(ValueError, match=match):
        call(pipe, subject_boxes=[box, [0.5, 0, 1, 1]])


def test_zero_box_is_allowed():
    assert check_box([0, 0, 0, 0]) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"subject_images": [IMG]}, "subject_images=1, subject_phrases=2"),
        ({"subject_boxes": [[0, 0, 1, 1]]}, "subject_boxes=1"),
        ({"subject_scales": [0.5]}, "subject_scales=1"),
        ({"subject_phrases": ["dog", ""]}, "non-empty string"),
        ({"subject_phrases": "dog"}, "list of phrases"),
        ({"subject_images": None}, "both `subject_images` and `subject_phrases`"),
        ({"mask_threshold": 1.5}, "mask_threshold"),
        ({"start_step": 0}, "start_step"),
    ],
)
def test_inconsistent_subject_arguments(pipe, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(pipe, **kwargs)


def test_batched_subjects_must_match_prompts(pipe):
    with pytest.raises(ValueError, match="one list per prompt"):
        call(
            pipe,
            prompt=["a dog", "a cat", "a bear"],
            subject_images=[[IMG], [IMG]],
            subject_phrases=[["dog"], ["cat"]],
            subject_boxes=[[[0, 0, 1, 1]], [[0, 0, 1, 1]]],
        )


def test_unreadable_and_missing_images(pipe, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*notes.jpg"):
        call(pipe, subject_images=[str(bad), IMG])
    with pytest.raises(ValueError, match="file not found"):
        call(pipe, subject_images=[str(tmp_path / "missing.png"), IMG])
    with pytest.raises(TypeError, match="expected an image, a path"):
        call(pipe, subject_images=[42, IMG])
    with pytest.raises(ValueError, match="empty list"):
        call(pipe, subject_images=[[], IMG])


def test_image_inputs_of_every_kind(tmp_path):
    import numpy as np
    import torch

    path = tmp_path / "x.png"
    IMG.save(path)
    for given in (IMG, str(path), path, np.asarray(IMG), torch.from_numpy(np.asarray(IMG)).permute(2, 0, 1)):
        assert load_image(given).size == (32, 32)
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        load_image(np.full((4, 4, 3), 3.0))


def test_transparent_pixels_are_black_whatever_the_file_stores_under_them(tmp_path):
    """A cut-out subject saved with its photo (or white) kept under alpha 0 is, to every viewer, the
    subject alone: the model must see it so too, not the hidden background."""
    from msdiffusion.data.dataset import _open_rgb

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (255, 255, 255)  # what the file stores under the transparent pixels
    rgba[2:6, 2:6] = (200, 30, 30, 255)  # the subject, opaque
    rgba[0, 0, 3] = 128  # an antialiased edge: half over black
    path = tmp_path / "cutout.png"
    PIL.Image.fromarray(rgba, "RGBA").save(path)
    for given in (path, PIL.Image.open(path), rgba):
        image = np.asarray(load_image(given))
        assert (image[7, 7] == 0).all() and tuple(image[3, 3]) == (200, 30, 30)
        assert 125 <= image[0, 0, 0] <= 130
    assert np.array_equal(np.asarray(_open_rgb(path, "reference")), np.asarray(load_image(path)))  # training too
    palette = PIL.Image.fromarray(rgba[..., :3]).convert("P")  # a GIF whose white is its transparent index
    palette.info["transparency"] = palette.getpixel((7, 7))
    assert (np.asarray(load_image(palette))[7, 7] == 0).all()


def sideways_photo(path, size=(64, 32)):
    """A photo stored as shot (left half red, right half blue) whose EXIF says: turn it a quarter clockwise."""
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:, : size[0] // 2] = (255, 0, 0)
    array[:, size[0] // 2 :] = (0, 0, 255)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(array).save(path, exif=exif, quality=95)
    return path


def test_a_photo_file_is_turned_as_its_exif_orientation_says(tmp_path):
    from msdiffusion.settings import picture_size

    path = sideways_photo(tmp_path / "phone.jpg", (128, 64))
    image = load_image(path)
    assert image.size == (64, 128)  # shown upright: taller than wide
    top, bottom = np.asarray(image)[5, 32], np.asarray(image)[-5, 32]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left (red) half is now on top
    assert picture_size(str(path)) == [64, 128]  # the output size of a job on it


def test_phrase_not_in_prompt_warns(pipe):
    with pytest.warns(UserWarning, match="'bird' was not found"):
        call(pipe, subject_phrases=["dog", "bird"])
    with pytest.warns(UserWarning, match="auto layout cannot guide"):
        call(pipe, subject_phrases=["dog", "bird"], mask_threshold=0.5)


def test_more_subjects_than_trained_warns(pipe):
    with pytest.warns(UserWarning, match="at most 4"):
        call(
            pipe,
            prompt="a dog a cat a bear a duck a clock",
            subject_images=[IMG] * 5,
            subject_phrases=["dog", "cat", "bear", "duck", "clock"],
            subject_boxes=[[0, 0, 1, 1]] * 5,
        )


def test_subjects_need_text_prompt_and_adapter(pipe):
    embeds = pipe.encode_prompt("a dog", device="cpu")
    with pytest.raises(ValueError, match="give `prompt` as text"):
        call(pipe, prompt=None, prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[2])
    bare = tiny_pipeline(seed=0)
    bare.unload_ms_adapter()
    with pytest.raises(ValueError, match="load_ms_adapter"):
        call(bare)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no subjects: a plain SDXL call, no warnings of ours
        bare(prompt="a dog", num_inference_steps=1, height=64, width=64, output_type="latent")


def test_a_reference_smaller_than_one_encoder_patch_warns():
    import warnings

    import PIL.Image

    from msdiffusion.subjects import build_subjects

    with pytest.warns(UserWarning, match=r"subject 1 image: 1x1 pixels, under 14 on a side"):
        build_subjects(1, [PIL.Image.new("RGB", (64, 64)), PIL.Image.new("RGB", (1, 1))], ["dog", "cat"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build_subjects(1, [PIL.Image.new("RGB", (14, 200))], ["dog"])
