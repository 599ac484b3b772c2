"""store.export: summary, COCO JSON, COCO results and HDF5 must hold exactly what the store holds."""
import json
import os

import h5py
import numpy as np
import pycocotools.mask as coco_mask
import pytest
from pycocotools.coco import COCO

from store import rle
from store.export import format_summary, gt_image_ids, store_summary, to_coco, to_coco_results, to_hdf5
from store.pseudo_label_store import SKIPPED, ImageResult, PseudoLabelStore, StoreError

# pycocotools' decode trips a numpy 2 deprecation warning; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SETTINGS = {"method": "test", "image_size": 32}
FEATURE_DIM = 8


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) bool → (K, 4) float32 xyxy, x2/y2 exclusive, as stage 1 stores them."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(ys):
            boxes[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return boxes


def random_masks(rng, k: int, h: int, w: int) -> np.ndarray:
    """k random rectangles, some with a hole, so masks are not just their boxes."""
    masks = np.zeros((k, h, w), bool)
    for j in range(k):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        masks[j, y:rng.integers(y + 2, h + 1), x:rng.integers(x + 2, w + 1)] = True
        if j % 2:
            masks[j, y + 1, x + 1] = False
    return masks


def build_store(path, counts, skip=(), size=(24, 32), seed=0, commit=None):
    """A store with counts[i] random masks in image i (images in `skip` are SKIPPED); only the first
    `commit` images are committed when given, and the store is finalized when all are.

    Returns (store, masks per image: list of (K, H, W) bool or None)."""
    rng = np.random.default_rng(seed)
    h, w = size
    store = PseudoLabelStore.create(path, [f"sub/img{i}.png" for i in range(len(counts))], SETTINGS,
                                    FEATURE_DIM, {"images_root": "/nowhere"})
    results, all_masks = [], []
    for i, k in enumerate(counts):
        if i in skip:
            results.append(ImageResult(index=i, status=SKIPPED, reason=f"broken {i}"))
            all_masks.append(None)
            continue
        masks = random_masks(rng, k, h, w)
        results.append(ImageResult(
            index=i, height=h, width=w, rle=rle.encode_batch(masks), box=tight_boxes(masks),
            score=rng.random(k).astype(np.float32), seed=rng.integers(-1, 9, (k, 3)).astype(np.int16),
            seed_feature=rng.standard_normal((k, FEATURE_DIM)).astype(np.float16)))
        all_masks.append(masks)
    store.append(results[:commit])
    if commit is None:
        store.finalize()
    return PseudoLabelStore.open(path), all_masks


@pytest.fixture
def store_and_masks(tmp_path):
    return build_store(tmp_path / "s.zarr", [3, 0, 2, 5, 1], skip={1})


def test_coco_json_holds_the_stored_masks(store_and_masks, tmp_path):
    store, masks = store_and_masks
    out = tmp_path / "out" / "pseudo.json"
    written = to_coco(store, out)
    assert not out.with_name(out.name + ".tmp").exists()
    assert json.loads(out.read_text()) == written
    coco = COCO(str(out))
    # Image 1 is skipped: ids are index + 1 of the others.
    assert sorted(coco.getImgIds()) == [1, 3, 4, 5]
    assert coco.imgs[4] == {"id": 4, "file_name": "sub/img3.png", "height": 24, "width": 32}
    assert written["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    assert written["info"]["settings_hash"] == store.attrs["settings_hash"]
    assert written["info"]["settings"] == SETTINGS
    anns = written["annotations"]
    assert [a["id"] for a in anns] == list(range(1, 12))
    scores = store.mask_array("score")
    for image_id in coco.getImgIds():
        image_anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        expected = masks[image_id - 1]
        assert len(image_anns) == len(expected)
        for a, m in zip(image_anns, expected):
            np.testing.assert_array_equal(coco.annToMask(a), m)
            seg = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
            np.testing.assert_array_equal(a["bbox"], coco_mask.toBbox(seg))
            assert a["area"] == coco_mask.area(seg) == m.sum()
            assert a["iscrowd"] == 0 and a["category_id"] == 1
    np.testing.assert_allclose([a["score"] for a in anns], scores)


def test_coco_without_scores(store_and_masks, tmp_path):
    written = to_coco(store_and_masks[0], tmp_path / "p.json", with_scores=False)
    assert written["annotations"] and all("score" not in a for a in written["annotations"])


def test_coco_results_map_file_names_to_gt_ids(store_and_masks):
    store, masks = store_and_masks
    # img0 by full path, img3 by basename only, img1 (skipped) and img2, img4 not in GT; an unrelated GT image.
    gt = {"images": [{"id": 70, "file_name": "sub/img0.png"}, {"id": 9, "file_name": "img3.png"},
                     {"id": 5, "file_name": "img1.png"}, {"id": 2, "file_name": "other.png"}]}
    assert gt_image_ids(store, gt) == {0: 70, 3: 9}
    results = to_coco_results(store, gt, category_id=4)
    assert [r["image_id"] for r in results] == [70] * 3 + [9] * 5
    assert {r["category_id"] for r in results} == {4}
    rows = list(range(0, 3)) + list(range(5, 10))  # mask rows of images 0 and 3
    np.testing.assert_allclose([r["score"] for r in results], store.mask_array("score")[rows])
    for r, m in zip(results, list(masks[0]) + list(masks[3])):
        np.testing.assert_array_equal(rle.decode(r["segmentation"]["counts"], 24, 32), m)
        seg = {"size": [24, 32], "counts": r["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(r["bbox"], coco_mask.toBbox(seg))


def test_ambiguous_basename_is_not_matched(store_and_masks, tmp_path):
    gt = {"images": [{"id": 1, "file_name": "a/img0.png"}, {"id": 2, "file_name": "b/img0.png"}]}
    assert gt_image_ids(store_and_masks[0], gt) == {}
    # Two store images x/img.png and y/img.png: only the exact match maps, never both to one GT image.
    store = PseudoLabelStore.create(tmp_path / "two.zarr", ["x/img.png", "y/img.png"], SETTINGS, FEATURE_DIM)
    store.append([ImageResult(index=i, height=4, width=4, box=np.zeros((0, 4), np.float32),
                              score=np.zeros(0, np.float32), seed=np.zeros((0, 3), np.int16),
                              seed_feature=np.zeros((0, FEATURE_DIM), np.float16)) for i in range(2)])
    assert gt_image_ids(store, {"images": [{"id": 3, "file_name": "img.png"}]}) == {}
    assert gt_image_ids(store, {"images": [{"id": 3, "file_name": "y/img.png"}]}) == {1: 3}


def test_hdf5_round_trip(store_and_masks, tmp_path):
    store, _ = store_and_masks
    out = tmp_path / "pseudo.h5"
    to_hdf5(store, out)
    assert not out.with_name(out.name + ".tmp").exists()
    with h5py.File(out, "r") as f:
        assert [n.decode() for n in f["images/file_name"][:]] == store.file_names
        for name in ("height", "width", "status"):
            np.testing.assert_array_equal(f[f"images/{name}"][:], store.image_array(name))
        np.testing.assert_array_equal(f["images/mask_offset"][:], store.mask_offset)
        for name in ("box", "score", "seed"):
            np.testing.assert_array_equal(f[f"masks/{name}"][:], store.mask_array(name))
        np.testing.assert_array_equal(f["masks/seed_feature"][:], store.root["masks/seed_feature"][:])
        assert f["masks/seed_feature"].dtype == np.float16
        stored_rle = [c for counts in store.rle_images(0, store.num_images) for c in counts]
        assert list(f["masks/rle"][:]) == stored_rle
        assert json.loads(f.attrs["settings"]) == SETTINGS
        assert f.attrs["settings_hash"] == store.attrs["settings_hash"]
        assert f.attrs["schema_version"] == store.attrs["schema_version"]
        assert json.loads(f.attrs["skipped"]) == {"1": "broken 1"}


def test_hdf5_refuses_an_incomplete_store(tmp_path):
    store, _ = build_store(tmp_path / "s.zarr", [2, 1], commit=1)
    with pytest.raises(StoreError, match="incomplete"):
        to_hdf5(store, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_summary_counts_and_histogram(tmp_path):
    # Counts on both edges of every bin; images 9 and 10 are skipped.
    counts = [0, 1, 2, 4, 5, 9, 10, 19, 20, 2, 7]
    store, _ = build_store(tmp_path / "s.zarr", counts, skip={9, 10})
    s = store_summary(store)
    assert (s["images_planned"], s["images_committed"], s["images_done"], s["images_skipped"]) == (11, 11, 9, 2)
    assert s["masks"] == sum(counts[:9]) == 70
    assert s["masks_per_image_histogram"] == {"0": 1, "1": 1, "2-4": 2, "5-9": 2, "10-19": 2, "20+": 1}
    assert s["masks_per_image_mean"] == pytest.approx(70 / 9)
    assert s["masks_per_image_max"] == 20
    assert s["skipped_examples"] == [{"index": 9, "file_name": "sub/img9.png", "reason": "broken 9"},
                                     {"index": 10, "file_name": "sub/img10.png", "reason": "broken 10"}]
    assert s["settings"] == SETTINGS and s["settings_hash"] == store.attrs["settings_hash"]
    assert s["feature_dim"] == FEATURE_DIM and s["complete"] is True
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "s.zarr") for f in fs)
    assert s["disk_bytes"] == disk > 0
    assert s["bytes_per_image"] == pytest.approx(disk / 9) and s["bytes_per_mask"] == pytest.approx(disk / 70)
    text = format_summary(s)
    for needle in ("11 planned, 9 done, 2 skipped", "70", "20+: 1", "[9] sub/img9.png: broken 9",
                   store.attrs["settings_hash"], "image_size = 32"):
        assert needle in text


def test_summary_of_an_incomplete_store(tmp_path):
    store, _ = build_store(tmp_path / "s.zarr", [2, 3, 4], commit=2)
    s = store_summary(store)
    assert s["complete"] is False and s["masks"] == 5 and s["images_done"] == 2 and s["images_planned"] == 3
    assert "INCOMPLETE (2 of 3 committed)" in format_summary(s)
