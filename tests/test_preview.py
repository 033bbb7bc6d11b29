"""Previews: every photo of a subject on the sheet, labels in any script, auto-layout regions drawn."""

import numpy as np
import PIL.Image
import PIL.ImageFont

from msdiffusion.preview import PALETTE, covers, draw_layout, label_font, subjects_sheet


def solid(colour, size=(40, 40)):
    return PIL.Image.new("RGB", size, colour)


def has_colour(image, colour, tolerance=10):
    array = np.asarray(image.convert("RGB")).astype(int)
    return bool((np.abs(array - np.array(colour)).max(axis=-1) <= tolerance).any())


def test_sheet_shows_every_photo_of_a_subject():
    result = solid((128, 128, 128), (64, 64))
    one = subjects_sheet([solid((255, 0, 0)), solid((0, 255, 0))], ["dog", "cat"], result, height=64)
    several = subjects_sheet(
        [[solid((255, 0, 0)), solid((0, 0, 255))], solid((0, 255, 0))], ["dog", "cat"], result, height=64
    )
    assert several.width > one.width
    assert has_colour(several, (0, 0, 255)) and not has_colour(one, (0, 0, 255))  # the second photo of the dog


def test_labels_in_wide_scripts_pick_a_font_that_draws_them():
    default = PIL.ImageFont.load_default(13)
    assert covers(default, "dog") and not covers(default, "狗")
    for text in ("dog", "小狗", "犬のぬいぐるみ", "собака", "كلب"):
        font = label_font(text)
        image = draw_layout(solid((0, 0, 0), (200, 100)), [[0.1, 0.1, 0.9, 0.9]], [text])
        assert has_colour(image, PALETTE[0])  # drawn without error, whatever the fonts of this machine
        if any(covers(f, text) for f in _all_fonts()):
            assert covers(font, text), text


def _all_fonts():
    from msdiffusion.preview import _fonts

    return _fonts(13)


def test_auto_layout_regions_are_drawn_for_subjects_without_a_box():
    image = solid((0, 0, 0), (256, 256))
    region = np.zeros((8, 8), dtype=bool)
    region[4:, 4:] = True  # bottom-right quarter
    plain = draw_layout(image, [[0, 0, 0, 0]], ["dog"])
    assert np.asarray(plain).max() == 0  # no box, no region: nothing to draw
    shown = np.asarray(draw_layout(image, [[0, 0, 0, 0]], ["dog"], regions=[region])).astype(int)
    assert shown[224, 224].tolist() != [0, 0, 0] and shown[16, 240].tolist() == [0, 0, 0]
    tint = shown[240, 240]
    assert np.argmax(tint) == np.argmax(PALETTE[0])  # in the subject's colour


def test_subject_masks_are_tinted_the_kept_part_dimmed_and_the_sheet_shows_the_picture():
    image = solid((200, 200, 200), (256, 256))
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:24, 8:24] = True
    shown = np.asarray(draw_layout(image, [[0, 0, 0.5, 0.5]], ["dog"], masks=[mask])).astype(int)
    assert shown[60, 60].tolist() != [200, 200, 200] and shown[120, 120].tolist() == [200, 200, 200]
    assert np.argmax(shown[60, 60] - 200) == np.argmax(PALETTE[0])  # towards the subject's colour
    repainted = np.zeros((256, 256))
    repainted[:128] = 1.0
    dimmed = np.asarray(draw_layout(image, [[0, 0, 0, 0]], ["dog"], repainted=repainted)).astype(int)
    assert dimmed[64, 200].tolist() == [200, 200, 200] and (dimmed[200, 200] < 150).all()
    result = solid((0, 0, 255), (64, 64))
    plain = subjects_sheet([solid((255, 0, 0))], ["dog"], result, height=64)
    with_picture = subjects_sheet(
        [solid((255, 0, 0))], ["dog"], result, height=64, picture=solid((0, 255, 0), (64, 64))
    )
    assert with_picture.width > plain.width
    assert (np.asarray(with_picture) == [0, 255, 0]).all(-1).sum() >= 60 * 60
