"""Training targets (`collate_training`, shared by pre-training and fine-tuning): soft stride-4 masks as the
reference's, and no empty target at any training resolution."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages.coco_data import CocoInstances
from stages.pseudo_label_data import collate_training


def _item(masks, h, w, **extra):
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.bool).reshape(-1, h, w)
    return {"image": torch.zeros(3, h, w), "masks": masks, "boxes": torch.arange(len(masks) * 4.0).reshape(-1, 4),
            "index": 0, **extra}


def test_stride4_targets_are_the_covered_fraction_of_each_cell():
    """Each target cell is the fraction of its 4x4 pixels inside the object (a loop over the cells), padding
    counts as outside, and the full-resolution masks are the padded input masks."""
    g = torch.Generator().manual_seed(0)
    h, w = 37, 50  # padded to 64 x 64
    masks = torch.rand(3, h, w, generator=g) > 0.6
    batch = collate_training([_item(masks, h, w)])
    target = batch["targets"][0]
    assert target["masks"].shape == (3, 16, 16) and target["full_masks"].shape == (3, 64, 64)
    assert torch.equal(target["full_masks"][:, :h, :w], masks) and not target["full_masks"][:, h:].any()
    padded = torch.zeros(3, 64, 64)
    padded[:, :h, :w] = masks.float()
    for i in range(16):
        for j in range(16):
            want = padded[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean((1, 2))
            assert torch.allclose(target["masks"][:, i, j], want)
    assert ((target["masks"] > 0) & (target["masks"] < 1)).any()  # soft, not thresholded


@pytest.mark.parametrize("size", [(32, 32), (45, 61), (96, 128), (250, 333)])
def test_an_object_of_one_or_two_pixels_keeps_a_target_anywhere(size):
    """Thresholding 4x4 cells by majority (as before) emptied every object under 8 pixels; now a single pixel
    gives a target of 1/16 in its cell, wherever it lies."""
    h, w = size
    g = torch.Generator().manual_seed(h)
    masks = torch.zeros(6, h, w, dtype=torch.bool)
    for k in range(6):
        y, x = int(torch.randint(h - 1, (1,), generator=g)), int(torch.randint(w - 1, (1,), generator=g))
        masks[k, y, x] = True
        if k % 2:
            masks[k, y + 1, x] = True  # two pixels, possibly in two cells
    target = collate_training([_item(masks, h, w)])["targets"][0]["masks"]
    assert target.shape[0] == 6
    sums = target.flatten(1).sum(1)
    assert torch.allclose(sums, masks.flatten(1).sum(1) / 16)


def test_objects_without_pixels_are_dropped_from_every_target_field_and_counted():
    h, w = 32, 32
    masks = torch.zeros(4, h, w, dtype=torch.bool)
    masks[0, 2:9, 3:7] = True
    masks[2, 20, 20] = True  # 1 and 3 stay empty
    labels = torch.tensor([5, 6, 7, 8])
    seeds = torch.arange(4.0)[:, None].repeat(1, 3)
    batch = collate_training([_item(masks, h, w, labels=labels, seed_features=seeds),
                              _item(torch.zeros(0, h, w), h, w)])
    t = batch["targets"][0]
    assert batch["dropped_targets"] == 2
    assert t["labels"].tolist() == [5, 7]
    assert t["seed_features"][:, 0].tolist() == [0.0, 2.0]
    assert t["boxes"].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert torch.equal(t["full_masks"][:, :h, :w], masks[[0, 2]])
    assert t["masks"].flatten(1).sum(1).min() > 0
    assert batch["targets"][1]["masks"].shape == (0, 8, 8)


def test_no_labeled_object_becomes_an_empty_target_at_any_training_resolution(tmp_path):
    """A 640x480 photo with objects of 2x2, 1x3 and 4x1 pixels and one large one, fine-tuning data at short sides
    from 32 to 800 px: every target that reaches the model has pixels, and an object is only left out (and
    counted) when the resize to that resolution left none of its pixels."""
    Image.fromarray(np.full((480, 640, 3), 100, np.uint8)).save(tmp_path / "p.png")
    box = lambda x, y, w, h: [[x, y, x + w, y, x + w, y + h, x, y + h]]  # noqa: E731
    rects = [(101, 57, 2, 2), (333, 250, 1, 3), (500, 401, 4, 1), (20, 30, 300, 200)]
    data = {"images": [{"id": 1, "file_name": "p.png", "height": 480, "width": 640}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": box(*r), "iscrowd": 0}
                            for i, r in enumerate(rects)],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    for short in (32, 77, 160, 256, 320, 513, 800):
        ds = CocoInstances(tmp_path / "ann.json", tmp_path, short, 2000, flip_prob=0.0)
        item = ds[0]
        batch = collate_training([item])
        target = batch["targets"][0]
        assert (target["masks"].flatten(1).sum(1) > 0).all(), short
        kept = int(item["masks"].flatten(1).any(1).sum())
        assert len(target["labels"]) == kept and batch["dropped_targets"] == 4 - kept
        assert kept >= 1  # the large object always
    assert kept == 4  # at 800 px every object has pixels


def test_min_mask_area_keeps_exactly_the_masks_covering_that_fraction_of_their_photo(demo, tmp_path):
    """Pre-training on large objects only (`sp pretrain --min-mask-area`): against the COCO file's own mask areas
    (pycocotools), an item keeps exactly the masks covering at least the fraction, with their boxes and seed
    features, in store order, and the batch counts the ones left out."""
    from pycocotools import mask as mask_utils

    from stages.gen_masks import RunOptions
    from stages.import_coco import annotation_mask, import_coco
    from stages.pseudo_label_data import PseudoLabelDataset

    store = import_coco(demo["unlabeled_ann"], demo["unlabeled"], tmp_path / "gt.zarr", backbone="resnet18",
                        image_size=128, max_size=192, options=RunOptions(batch_size=4, workers=0))
    gt = json.loads(open(demo["unlabeled_ann"]).read())
    fraction = {}  # file name -> area fraction of each annotation, in the file's (= the store's) order
    for img in gt["images"]:
        masks = [annotation_mask(a, img["height"], img["width"]) for a in gt["annotations"] if a["image_id"] == img["id"]]
        fraction[img["file_name"]] = [float(mask_utils.area(mask_utils.encode(np.asfortranarray(m)))) /
                                      (img["height"] * img["width"]) for m in masks]
    values = np.unique([f for fs in fraction.values() for f in fs])
    threshold = float(values[len(values) // 2 - 1:len(values) // 2 + 1].mean())  # between two areas: no rounding tie
    everything = PseudoLabelDataset(store.path, demo["unlabeled"], 128, 192, flip_prob=0.0)
    large = PseudoLabelDataset(store.path, demo["unlabeled"], 128, 192, flip_prob=0.0, min_mask_area=threshold)
    left_out = 0
    for k in range(len(everything)):
        a, b = everything[k], large[k]
        keep = torch.tensor([f >= threshold for f in fraction[store.file_names[a["index"]]]], dtype=torch.bool)
        assert len(keep) == len(a["masks"]) and a["small_masks"] == 0
        assert torch.equal(b["masks"], a["masks"][keep]) and torch.equal(b["boxes"], a["boxes"][keep])
        assert torch.equal(b["seed_features"], a["seed_features"][keep]) and torch.equal(b["image"], a["image"])
        assert b["small_masks"] == int((~keep).sum())
        left_out += b["small_masks"]
    assert 0 < left_out < len(gt["annotations"])  # the median leaves out some masks and keeps others
    assert collate_training([large[k] for k in range(len(large))])["small_masks"] == left_out
