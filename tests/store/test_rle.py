"""store.rle must agree with pycocotools byte for byte."""

import json

import numpy as np
import pycocotools.mask as coco
import pytest

from store import rle

# pycocotools' decode trips a numpy 2 deprecation warning; not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")


def coco_rle(mask):
    return coco.encode(np.asfortranarray(mask.astype(np.uint8)))


def blobby(rng, h, w, smooth=4, level=0.3):
    """Thresholded smoothed noise: a few irregular blobs with holes."""
    x = rng.standard_normal((h, w))
    for _ in range(smooth):  # cheap blur with wrap-around neighbours
        x = (x + np.roll(x, 1, 0) + np.roll(x, -1, 0)
             + np.roll(x, 1, 1) + np.roll(x, -1, 1)) / 5
    return x > level * x.std()


def ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def random_mask(kind, h, w, seed):
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.random((h, w)) < 0.5
    if kind == "sparse":
        return rng.random((h, w)) < 0.01
    if kind == "blobby":
        return blobby(rng, h, w)
    if kind == "ellipse":
        return ellipse(h, w, h * rng.random(), w * rng.random(),
                       1 + h * rng.random() / 2, 1 + w * rng.random() / 2)
    raise ValueError(kind)


def check_against_coco(mask):
    """All public functions against pycocotools for one mask."""
    h, w = mask.shape
    ref = coco_rle(mask)
    counts = rle.encode(mask)
    assert isinstance(counts, bytes)
    assert counts == ref["counts"]

    got = rle.decode(counts, h, w)
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    assert got.shape == (h, w)
    np.testing.assert_array_equal(got, mask.astype(np.uint8))
    # Decoding pycocotools' own string (as str, the JSON form) too.
    np.testing.assert_array_equal(
        rle.decode(ref["counts"].decode(), h, w), coco.decode(ref))

    assert rle.area(counts, h, w) == int(coco.area(ref))
    b = rle.bbox(counts, h, w)
    assert b.dtype == np.float64
    np.testing.assert_array_equal(b, coco.toBbox(ref))


KINDS = ["noise", "sparse", "blobby", "ellipse"]
SHAPES = [(1, 1), (1, 13), (13, 1), (2, 3), (7, 7), (31, 17), (64, 96),
          (240, 320)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_random_masks_match_pycocotools(kind, shape):
    for seed in range(3):
        check_against_coco(random_mask(kind, *shape, seed=seed))


def _pixel(h, w, y, x):
    m = np.zeros((h, w), bool)
    m[y, x] = True
    return m


def _long_runs():
    # Huge zero and one runs with big positive and negative deltas.
    flat = np.zeros(2000 * 3000, bool)  # column-major pixel order
    flat[5] = True
    flat[1_000_000:3_500_000] = True
    flat[-1] = True
    return flat.reshape(2000, 3000, order="F")


EDGE = {
    "empty": np.zeros((5, 7), bool),
    "full": np.ones((5, 7), bool),
    "1x1_zero": np.zeros((1, 1), bool),
    "1x1_one": np.ones((1, 1), bool),
    "px_top_left": _pixel(6, 9, 0, 0),
    "px_top_right": _pixel(6, 9, 0, 8),
    "px_bottom_left": _pixel(6, 9, 5, 0),
    "px_bottom_right": _pixel(6, 9, 5, 8),
    "px_middle": _pixel(6, 9, 3, 4),
    "row_1xN": np.array([[0, 1, 1, 0, 1, 0, 0, 0, 1, 1]], bool),
    "col_Nx1": np.array([[1], [1], [0], [1], [0], [0], [1]], bool),
    "row_1xN_full": np.ones((1, 50), bool),
    "col_Nx1_empty": np.zeros((50, 1), bool),
    "first_px_one": np.eye(8, dtype=bool),
    "last_px_one": np.eye(8, dtype=bool)[::-1, ::-1],
    "checkerboard": np.indices((9, 11)).sum(0) % 2 == 1,
    "wrapping_run": np.pad(np.ones((4, 3), bool), ((3, 0), (1, 1))),
    "no_rows": np.zeros((0, 3), bool),
    "no_cols": np.zeros((3, 0), bool),
    "big_empty": np.zeros((2000, 3000), bool),
    "big_full": np.ones((2000, 3000), bool),
    "big_long_runs": _long_runs(),
}


@pytest.mark.parametrize("name", list(EDGE))
def test_edge_cases_match_pycocotools(name):
    check_against_coco(EDGE[name])


@pytest.mark.parametrize("layout", ["C", "F", "strided", "uint8", "int64",
                                    "float32", "uint8_values"])
def test_any_layout_and_nonzero_dtype(layout):
    base = blobby(np.random.default_rng(7), 40, 30)
    if layout == "C":
        m = np.ascontiguousarray(base)
    elif layout == "F":
        m = np.asfortranarray(base)
    elif layout == "strided":
        big = np.zeros((80, 90), bool)
        big[::2, ::3] = base
        m = big[::2, ::3]
    elif layout == "uint8":
        m = base.astype(np.uint8)
    elif layout == "uint8_values":
        # Nonzero = foreground. pycocotools itself would start a new run
        # where a 1 meets a 2, so it is only the reference for base.
        values = np.random.default_rng(8).integers(1, 3, base.shape)
        m = base.astype(np.uint8) * values.astype(np.uint8)
    elif layout == "int64":  # 256 would become 0 in a cast to uint8
        m = base.astype(np.int64) * 256
    else:  # float32; 0.5 would become 0 in a cast to uint8
        m = base.astype(np.float32) * 0.5
    assert rle.encode(m) == coco_rle(base)["counts"]


def test_encode_batch_equals_per_mask():
    masks = np.stack([random_mask(k, 48, 64, seed=s)
                      for s in range(4) for k in KINDS])
    masks[0] = False
    masks[1] = True
    # Noise masks force the output buffer to grow mid-batch.
    assert rle.encode_batch(masks) == [rle.encode(m) for m in masks]
    assert rle.encode_batch(masks) == [coco_rle(m)["counts"] for m in masks]
    # Fortran-ordered and non-bool batches give the same strings.
    assert rle.encode_batch(np.asfortranarray(masks.astype(np.uint8))) == \
        rle.encode_batch(masks)
    assert rle.encode_batch(masks[:0]) == []


def test_mask_too_big_for_32_bit_counts():
    huge = np.broadcast_to(np.zeros(1, bool), (1, 65536, 65536))  # no memory
    with pytest.raises(ValueError, match="32-bit"):
        rle.encode_batch(huge)


def test_to_coco_is_json_ready_and_readable_by_pycocotools():
    m = random_mask("blobby", 33, 21, seed=1)
    d = rle.to_coco(rle.encode(m), 33, 21)
    assert d == {"size": [33, 21], "counts": coco_rle(m)["counts"].decode()}
    d = json.loads(json.dumps(d))
    np.testing.assert_array_equal(coco.decode(d), m.astype(np.uint8))


CORRUPT = {
    "too_few_pixels": ("3", 2, 2),
    "too_many_pixels": ("5", 2, 2),
    "extra_runs": ("0400", 2, 3),
    "empty_string": ("", 2, 2),
    "char_below_range": ("1 3", 2, 2),
    "char_above_range": ("13p", 2, 2),  # 'p' would read as a 0 run
    # 'P' = 48 + 0x20: a zero chunk saying more chunks follow; the runs
    # 1, 3 already cover 2x2, so only the truncation check can catch it.
    "truncated_count": ("13P", 2, 2),
    # 4 spread over 14 chunks: the value is fine, the length is not.
    "overlong_count": ("T" + "P" * 12 + "0", 2, 2),
    "negative_first": ("O5", 2, 2),  # 'O' = 48 + 31 = -1
    "negative_by_delta": ("1111L", 2, 2),  # 4th count = 1 + (-4)
    "non_ascii": ("1\u00e93", 2, 2),
    "negative_size": ("0", -1, 2),
    # 2**32 as one run: "0" + chunks 0, 0, 0, 0, 0, 0, 4 (low bits first).
    "run_over_32_bits": ("0" + "P" * 6 + "4", 65536, 65536),
}


@pytest.mark.parametrize("name", list(CORRUPT))
@pytest.mark.parametrize("fn", [rle.decode, rle.area, rle.bbox],
                         ids=["decode", "area", "bbox"])
def test_corrupt_counts_raise(fn, name):
    counts, h, w = CORRUPT[name]
    with pytest.raises(ValueError, match="RLE"):
        fn(counts, h, w)
    if isinstance(counts, str) and counts.isascii():
        with pytest.raises(ValueError, match="RLE"):
            fn(counts.encode(), h, w)
