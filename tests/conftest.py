"""Shared fixtures: a small generated demo dataset, tiny generation settings, store comparison."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.demo_data import make_demo_data

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
COCO_SUBSET = SHARED_DATASETS / "coco_subset"


@pytest.fixture(scope="session")
def coco_subset() -> Path:
    """Real COCO photos with their instance labels (../shared/datasets/coco_subset: train/, val/ with
    annotations.json and images/, unlabeled/images/); tests that need it skip where it is absent."""
    if not (COCO_SUBSET / "val" / "annotations.json").is_file():
        pytest.skip(f"no real COCO data at {COCO_SUBSET} (the shared datasets sit beside the checkout)")
    return COCO_SUBSET


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict:
    """A small demo dataset (made once per test session)."""
    return make_demo_data(tmp_path_factory.mktemp("demo"), num_unlabeled=12, num_train=6, num_val=4, seed=0)


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory) -> Path:
    """A folder of real photographs (scikit-image's bundled ones) in the modes and formats users have: RGB and
    grayscale PNG, RGBA PNG, and JPEG, of different sizes."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (a dependency) gives the real photos")
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(data.camera()).save(folder / "camera.png")  # 8-bit grayscale
    Image.fromarray(data.logo()).save(folder / "logo.png")  # RGBA
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg", quality=90)
    Image.fromarray(data.chelsea()).save(folder / "chelsea.jpg", quality=90)
    Image.fromarray(data.rocket()).save(folder / "rocket.jpg", quality=90)
    return folder


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG of (H, W) or (H, W, 3) uint16 pixels (Pillow writes 16-bit grayscale only)."""
    import struct
    import zlib

    h, w = pixels.shape[:2]
    color = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def image_modes(tmp_path_factory) -> Path:
    """One photo (scikit-image's cat, 60x90) in every mode labeled data comes in: RGB, grayscale, RGBA, palette,
    16-bit grayscale and RGB PNG, CMYK JPEG, and a JPEG whose EXIF says "rotate 90°" (stored 60x90)."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (a dependency) gives the real photos")
    folder = tmp_path_factory.mktemp("modes")
    rgb = Image.fromarray(data.chelsea()).resize((90, 60), Image.BILINEAR)
    rgb.save(folder / "rgb.png")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png")
    write_png16(folder / "gray16.png", np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    write_png16(folder / "rgb16.png", np.asarray(rgb).astype(np.uint16) * 257)
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(folder / "exif_rotated.jpg", quality=95, exif=exif)
    return folder


@pytest.fixture
def one_thread():
    """Small CPU models train far faster on one thread when another process shares the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_settings():
    """Generation settings that run in seconds on a CPU: ResNet-18 at 128 px, random weights."""
    from stages.gen_masks import GenerationSettings

    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    return GenerationSettings(backbone="resnet18", image_size=128, max_size=192)


def assert_stores_equal(a, b, float_atol=0.0):
    """Two stores hold the same images, masks, RLE strings, seed features and settings.

    float_atol > 0 lets scores and seed features differ by float rounding (e.g. matmuls of other shapes)."""
    assert a.attrs["settings"] == b.attrs["settings"]
    assert a.file_names == b.file_names
    assert a.complete and b.complete
    assert a.skipped == b.skipped
    for name in ("height", "width", "status"):
        np.testing.assert_array_equal(a.image_array(name), b.image_array(name))
    np.testing.assert_array_equal(a.mask_offset, b.mask_offset)
    for name in ("box", "seed", "rle_end"):
        np.testing.assert_array_equal(a.mask_array(name), b.mask_array(name))
    assert a.rle_images(0, a.num_images) == b.rle_images(0, b.num_images)
    np.testing.assert_allclose(a.mask_array("score"), b.mask_array("score"), rtol=0, atol=float_atol)
    np.testing.assert_allclose(a.root["masks/seed_feature"][:].astype(np.float32),
                               b.root["masks/seed_feature"][:].astype(np.float32), rtol=0, atol=float_atol)
