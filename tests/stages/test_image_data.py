"""The one image loader of both stages: every mode becomes the RGB a user expects, without clipping; image-only
work (superpixels) runs in the DataLoader workers and travels with the batch."""
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from models.mask_refinement import RefineConfig, superpixels
from stages.image_data import ImageFolder, batch_loader, list_images, load_image, network_input


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


@pytest.mark.parametrize("workers", [0, 1])
def test_segments_travel_with_the_batch_per_image_and_unpadded(real_photos, tmp_path, workers):
    """The loader's `segment` function runs on each image's own network input (in the worker processes with
    --workers 1): a batch of photos of different sizes carries, per loaded image, exactly what the function
    gives for that image alone, at the image's own working size; an unreadable file is skipped, not segmented."""
    shutil.copytree(real_photos, tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    names = list_images(tmp_path / "photos")
    cfg = RefineConfig(method="superpixel")
    folder = ImageFolder(tmp_path / "photos", names, 96, 160, segment=partial(superpixels, cfg=cfg))
    batches = list(batch_loader(folder, 4, workers))
    assert [name for batch in batches for _, name, _ in batch.failed] == ["broken.jpg"]
    assert sum(len(batch.segments) for batch in batches) == len(names) - 1
    assert any(len(set(batch.resized_hw)) > 1 for batch in batches)  # images of different sizes were padded
    for batch in batches:
        assert len(batch.segments) == len(batch.index)
        for name, resized_hw, segments in zip(batch.file_name, batch.resized_hw, batch.segments):
            alone = superpixels(network_input(load_image(tmp_path / "photos" / name), 96, 160), cfg)
            assert segments.shape == cfg.work_size(resized_hw) and torch.equal(segments, alone), name
            assert segments.unique().tolist() == list(range(int(segments.max()) + 1))  # labels 0..n-1, all used
    assert next(iter(batch_loader(ImageFolder(tmp_path / "photos", names, 96, 160), 4, 0))).segments is None
