"""The one image loader of both stages: every mode becomes the RGB a user expects, without clipping."""
import numpy as np
import pytest
from PIL import Image

from stages.image_data import load_image


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(image_modes):
    gray8 = np.asarray(load_image(image_modes / "gray.png"))
    gray16 = np.asarray(load_image(image_modes / "gray16.png"))
    assert gray16.shape == (60, 90, 3) and (gray16 < 255).mean() > 0.99  # Pillow alone makes it all 255
    np.testing.assert_array_equal(gray16, gray8)  # v * 257 → v exactly
    np.testing.assert_array_equal(load_image(image_modes / "rgb16.png"), load_image(image_modes / "rgb.png"))


@pytest.mark.parametrize("name, mean_error", [("gray.png", 0), ("rgba.png", 0), ("palette.png", 8),
                                              ("cmyk.jpg", 8), ("exif_rotated.jpg", 8)])
def test_every_mode_becomes_rgb_of_the_stored_pixels(image_modes, name, mean_error):
    """The same photo in each mode loads as (60, 90, 3) RGB close to the original: EXIF rotation is not
    applied (annotations refer to the stored pixels), CMYK is converted, alpha dropped, palettes expanded."""
    source = Image.open(image_modes / "rgb.png")
    expected = np.asarray(source.convert("L").convert("RGB") if name == "gray.png" else source).astype(int)
    loaded = load_image(image_modes / name)
    assert loaded.mode == "RGB" and loaded.size == (90, 60)
    assert np.abs(np.asarray(loaded).astype(int) - expected).mean() <= mean_error
