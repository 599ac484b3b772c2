"""Tests for the synthetic demo dataset (pipeline.demo_data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from pipeline.demo_data import make_demo_data, render_scene

# Small counts keep the suite fast on a shared machine; the properties tested hold per image.
SMALL = dict(num_unlabeled=6, num_train=8, num_val=4)
ANN_SPLITS = [("train_ann", "train"), ("val_ann", "val"), ("unlabeled_ann", "unlabeled")]
# pycocotools' decode trips a NumPy 2 deprecation inside the library itself; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", seed=3, **SMALL)


def _tree_bytes(root: Path) -> dict:
    """Map of relative path -> file contents for every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decoded(ann: dict) -> np.ndarray:
    return mask_utils.decode(ann["segmentation"]).astype(bool)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    kwargs = dict(num_unlabeled=2, num_train=3, num_val=2, seed=7)
    make_demo_data(tmp_path / "a", **kwargs)
    make_demo_data(tmp_path / "b", **kwargs)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert len(a) == 2 + 3 + 2 + 3 + 1  # images, three JSONs, README
    assert a == b

    # Regenerating into our own directory with the same settings is allowed and reproduces it.
    make_demo_data(tmp_path / "a", **kwargs)
    assert _tree_bytes(tmp_path / "a") == a

    make_demo_data(tmp_path / "c", **{**kwargs, "seed": 8})
    c = _tree_bytes(tmp_path / "c")
    assert c.keys() == a.keys()
    for name in a:
        if name.endswith(".jpg"):
            assert a[name] != c[name], name
    assert a["annotations/train.json"] != c["annotations/train.json"]


def test_layout_and_returned_paths(demo):
    assert set(demo) == {"unlabeled", "train", "val", "train_ann", "val_ann", "unlabeled_ann"}
    root = demo["train"].parent
    assert (root / "README.txt").read_text().startswith("Synthetic demo data")
    for key, split in ANN_SPLITS:
        assert demo[split].is_dir() and demo[key].is_file()
        files = sorted(p.name for p in demo[split].iterdir())
        listed = sorted(img["file_name"] for img in json.loads(demo[key].read_text())["images"])
        assert files == listed
        assert len(files) == SMALL[f"num_{split}"]


@pytest.mark.parametrize("key,split", ANN_SPLITS)
def test_coco_files_are_valid(demo, key, split):
    data = json.loads(demo[key].read_text())
    coco = COCO(str(demo[key]))
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert [img["id"] for img in data["images"]] == list(range(1, len(data["images"]) + 1))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert data["annotations"], "every split should contain objects"

    for img in data["images"]:
        with Image.open(demo[split] / img["file_name"]) as im:
            assert im.format == "JPEG"
            assert im.size == (img["width"], img["height"])

    for ann in data["annotations"]:
        img = coco.imgs[ann["image_id"]]
        assert ann["iscrowd"] == 0 and ann["category_id"] in coco.cats
        assert isinstance(ann["segmentation"]["counts"], str)
        m = _decoded(ann)
        # Decoding at the recorded size means the mask lies inside the image.
        assert m.shape == (img["height"], img["width"])
        assert m.sum() > 0 and m.sum() == ann["area"]
        ys, xs = np.nonzero(m)
        expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["bbox"] == pytest.approx(expected)


def test_masks_within_an_image_are_disjoint(demo):
    for key, _ in ANN_SPLITS:
        coco = COCO(str(demo[key]))
        for image_id, img in coco.imgs.items():
            cover = np.zeros((img["height"], img["width"]), np.int32)
            for ann in coco.imgToAnns[image_id]:
                cover += _decoded(ann)
            assert cover.max() <= 1, f"overlapping masks in {img['file_name']}"


def test_render_scene_handles_occlusion():
    partly_occluded = 0
    for seed in range(12):
        image, visible, full, labels = render_scene(np.random.default_rng(seed), 120, 160)
        assert image.shape == (120, 160, 3) and image.dtype == np.uint8
        assert len(visible) == len(full) == len(labels) >= 1
        assert set(labels) <= {1, 2, 3}
        stacked = np.stack(visible).astype(np.int32)
        assert stacked.sum(axis=0).max() <= 1  # visible masks never overlap
        for vis, whole in zip(visible, full):
            assert not (vis & ~whole).any()  # visible part is part of the object
            # Almost fully hidden instances must have been dropped.
            assert vis.sum() >= 16 and vis.sum() >= 0.3 * whole.sum()
            partly_occluded += int(vis.sum() < whole.sum())
    assert partly_occluded > 0


def test_render_scene_is_deterministic():
    a = render_scene(np.random.default_rng(5), 100, 140)
    b = render_scene(np.random.default_rng(5), 100, 140)
    assert np.array_equal(a[0], b[0]) and a[3] == b[3]
    assert all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))


def test_variety_of_categories_sizes_and_image_shapes(demo):
    train = json.loads(demo["train_ann"].read_text())
    assert len({a["category_id"] for a in train["annotations"]}) >= 2

    areas, shapes = [], set()
    for key, _ in ANN_SPLITS:
        data = json.loads(demo[key].read_text())
        areas += [a["area"] for a in data["annotations"]]
        shapes |= {(img["height"], img["width"]) for img in data["images"]}
    areas = np.array(areas)
    # A COCO-like spread: plenty of small objects (COCO has ~40 %), some medium and large ones.
    assert (areas < 32**2).mean() >= 0.2
    assert ((areas >= 32**2) & (areas <= 96**2)).any()
    assert (areas > 96**2 * 0.25).sum() >= 3
    assert len(shapes) > 1  # image sizes vary


def test_objects_stand_out_from_their_surroundings(demo):
    """Objects should differ in colour from a thin ring of pixels around them (not invisible)."""
    coco = COCO(str(demo["train_ann"]))
    contrasts = []
    for ann in coco.anns.values():
        if ann["area"] < 200:
            continue
        img = coco.imgs[ann["image_id"]]
        pixels = np.asarray(Image.open(demo["train"] / img["file_name"]).convert("RGB"), np.float32)
        m = _decoded(ann)
        ring = ndimage.binary_dilation(m, iterations=4) & ~ndimage.binary_dilation(m, iterations=1)
        if ring.sum() < 20:
            continue
        contrasts.append(np.abs(pixels[m].mean(0) - pixels[ring].mean(0)).sum())
    # Summed over RGB; painted objects give ~115 here, unpainted regions (shadow only) ~50.
    assert contrasts and np.median(contrasts) > 80


def test_refuses_foreign_non_empty_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not produced by `sp demo-data`"):
        make_demo_data(foreign, num_unlabeled=1, num_train=1, num_val=1)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]  # nothing written

    # A README that is not ours does not count as the marker either.
    (foreign / "README.txt").write_text("my project\n")
    with pytest.raises(ValueError, match="not produced by `sp demo-data`"):
        make_demo_data(foreign, num_unlabeled=1, num_train=1, num_val=1)


def test_empty_existing_dir_is_fine_but_other_settings_are_refused(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    make_demo_data(out, num_unlabeled=1, num_train=1, num_val=1)
    with pytest.raises(ValueError, match="different settings"):
        make_demo_data(out, num_unlabeled=2, num_train=1, num_val=1)
