"""stages.viz: overlays change the pixels under masks and nothing far from them; contact sheets tile."""
import logging

import numpy as np
import pytest
from PIL import Image

from stages.viz import ALPHA, contact_sheet, draw_overlays, mask_colour, pick_images
from store import rle
from store.pseudo_label_store import SKIPPED, ImageResult, PseudoLabelStore

H, W = 60, 80


# Image i's rectangular masks as xyxy boxes (x2/y2 exclusive); image 2 is skipped. All lie in rows < 35
# and columns < 45.
MASKS = {0: [(10, 10, 30, 30), (20, 5, 45, 35)], 1: [], 3: [(0, 0, 12, 12)]}


@pytest.fixture
def setup(tmp_path):
    """(store, images_dir, source pixels per index): noise images and a store of MASKS."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    names = [f"im{i}.png" for i in range(4)]
    sources = {}
    for i, name in enumerate(names):
        sources[i] = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(sources[i]).save(images_dir / name)
    store = PseudoLabelStore.create(tmp_path / "s.zarr", names, {"method": "test"}, 4)
    results = []
    for i in range(4):
        if i not in MASKS:
            results.append(ImageResult(index=i, status=SKIPPED, reason="broken"))
            continue
        k = len(MASKS[i])
        boxes = np.array(MASKS[i], np.float32).reshape(k, 4)
        masks = np.zeros((k, H, W), bool)
        for m, (x1, y1, x2, y2) in zip(masks, MASKS[i]):
            m[y1:y2, x1:x2] = True
        results.append(ImageResult(index=i, height=H, width=W, rle=rle.encode_batch(masks), box=boxes,
                                   score=np.linspace(0.9, 0.5, k, dtype=np.float32),
                                   seed=np.zeros((k, 3), np.int16), seed_feature=np.zeros((k, 4), np.float16)))
    store.append(results)
    store.finalize()
    return PseudoLabelStore.open(tmp_path / "s.zarr"), images_dir, sources


def test_overlays_change_mask_pixels_only(setup, tmp_path):
    store, images_dir, sources = setup
    paths = draw_overlays(store, images_dir, tmp_path / "viz", n=10, seed=None)
    assert [p.name for p in paths] == ["000000_im0.png", "000001_im1.png", "000003_im3.png"]
    for i, path in zip([0, 1, 3], paths):
        with Image.open(path) as im:
            assert im.size == (W, H) and im.mode == "RGB"
            out = np.asarray(im).astype(int)
        src = sources[i].astype(int)
        # Far from every mask, box and score label: untouched.
        np.testing.assert_array_equal(out[40:, 50:], src[40:, 50:])
        if not MASKS[i]:
            np.testing.assert_array_equal(out, src)
    out = np.asarray(Image.open(paths[0])).astype(int)
    src = sources[0].astype(int)
    # Inside only the first mask (left of the second, below its label, inside its outline): one blend of
    # colour 0, up to rounding.
    expected = (1 - ALPHA) * src[23:29, 12:18] + ALPHA * np.array(mask_colour(0))
    np.testing.assert_allclose(out[23:29, 12:18], expected, atol=0.51)
    # Inside the second mask, away from outlines and labels: the pixels changed.
    assert (out[20:33, 32:43] != src[20:33, 32:43]).any(axis=2).all()


def test_sample_is_deterministic_and_skips_skipped_images(setup):
    store = setup[0]
    assert pick_images(store, 2, seed=None) == [0, 1]
    picks = [pick_images(store, 2, seed=s) for s in range(8)]
    assert picks[3] == pick_images(store, 2, seed=3)
    assert all(len(p) == 2 and p == sorted(p) and 2 not in p for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # the seed matters
    assert pick_images(store, 10, seed=1) == [0, 1, 3]


def test_image_of_another_size_is_skipped(setup, tmp_path, caplog):
    store, images_dir, _ = setup
    Image.new("RGB", (W + 1, H)).save(images_dir / "im0.png")
    with caplog.at_level(logging.WARNING, logger="stages.viz"):
        paths = draw_overlays(store, images_dir, tmp_path / "viz", n=1, seed=None)
    assert paths == [] and "im0.png is 81x60, the store says 80x60" in caplog.text


def test_contact_sheet_tiles_in_rows(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    paths = []
    for k, colour in enumerate(colours):
        paths.append(tmp_path / f"{k}.png")
        Image.new("RGB", (200, 100), colour).save(paths[-1])
    out = contact_sheet(paths, tmp_path / "sheet" / "all.png", columns=2, thumb=64)
    with Image.open(out) as im:
        assert im.size == (128, 128)
        sheet = np.asarray(im)
    # 200x100 shrinks to 64x32, centred in its cell (rows 16..47 of the cell).
    assert tuple(sheet[32, 32]) == colours[0] and tuple(sheet[32, 96]) == colours[1]
    assert tuple(sheet[96, 32]) == colours[2]
    assert tuple(sheet[5, 32]) == (32, 32, 32) and tuple(sheet[96, 96]) == (32, 32, 32)
