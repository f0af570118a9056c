import numpy as np
import pytest

from screener.engine import preprocessing as pp


def gray_image(h=600, w=700, seed=0):
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w)) * 60).astype(np.uint8)
    img[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] += 150
    return img


def test_to_gray8_modes_agree():
    g = gray_image()
    bgr = np.dstack([g, g, g])
    bgra = np.dstack([g, g, g, np.full_like(g, 255)])
    la = np.dstack([g, np.full_like(g, 255)])
    assert np.array_equal(pp.to_gray8(g), g)
    assert np.array_equal(pp.to_gray8(bgr), g)
    assert np.array_equal(pp.to_gray8(bgra), g)
    assert np.array_equal(pp.to_gray8(la), g)
    g16 = g.astype(np.uint16) * 257
    out = pp.to_gray8(g16)
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0


def test_polarity_fixed():
    g = gray_image()
    inv = 255 - g
    a = pp.prepare(g, pp.recipe("original"))
    b = pp.prepare(inv, pp.recipe("original"))
    assert np.array_equal(a, b)


def test_centre_crop_pads_small_images_without_upscaling():
    small = gray_image(300, 200)
    rcp = pp.Recipe("t", crop="centre", image_size=100, auto_polarity=False)
    out = pp.prepare(small, rcp)
    assert out.shape == (100, 100, 3)
    # 500 window over a 200-wide image: 150 px black each side -> 30 px at 100/500 scale
    assert out[:, :25].max() == 0 and out[:, -25:].max() == 0


def test_wide_box_clipped_and_square():
    rcp = pp.recipe("wide_crop")
    win = pp.window((600, 700), rcp, (300, 100, 400, 500))
    x0, y0, x1, y1 = win
    assert x1 - x0 == y1 - y0  # square
    # clipped box: x 200..500, y 0..600 -> side 600
    assert y1 - y0 == 600


def test_box_never_empty_or_negative():
    assert pp.clip_box((-50, -50, -10, -10), 100, 100) == (0, 0, 1, 1)
    assert pp.clip_box((150, 150, 200, 200), 100, 100) == (99, 99, 100, 100)


@pytest.mark.parametrize("name", list(pp.RECIPES))
def test_every_recipe_shape_and_dtype(name):
    g = gray_image()
    rcp = pp.recipe(name, 64)
    box = (250, 150, 450, 450) if rcp.needs_box else None
    x = pp.preprocess(g, rcp, pp.Normalization(), box)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32


def test_colour_channels_order():
    g = gray_image()
    rcp = pp.Recipe("c", crop="centre", colour="gs_eq_inv", image_size=500, auto_polarity=False, centre_size=500)
    out = pp.prepare(g, rcp)
    # window fully inside image: inverted channel is exactly 255 - gray
    assert np.array_equal(out[:, :, 2], 255 - out[:, :, 0])


def test_mirror_flips():
    g = gray_image()
    rcp = pp.recipe("roi_he", 64)
    box = (100, 100, 500, 500)
    assert np.array_equal(pp.prepare(g, rcp, box, mirror=True), pp.prepare(g, rcp, box)[:, ::-1])


def test_needs_box():
    with pytest.raises(ValueError, match="needs a box"):
        pp.prepare(gray_image(), pp.recipe("crop"))


def test_channel_stats():
    imgs = [np.full((4, 4, 3), 128, np.uint8), np.full((4, 4, 3), 0, np.uint8)]
    n = pp.channel_stats(imgs)
    assert abs(n.mean[0] - 128 / 255 / 2) < 1e-6
