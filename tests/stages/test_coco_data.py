import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages.coco_check import CocoError
from stages.coco_data import CocoInstances
from stages.image_data import ImageFolder
from stages.pseudo_label_data import collate_training


@pytest.fixture
def tiny_coco(tmp_path):
    """Three 40x60 images: two objects of categories 7 and 3, a crowd region, and an image with no objects."""
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(tmp_path / name)
    poly = lambda x, y, w, h: [[x, y, x + w, y, x + w, y + h, x, y + h]]  # noqa: E731
    data = {
        "images": [{"id": 5, "file_name": "a.png", "height": 40, "width": 60},
                   {"id": 9, "file_name": "b.png", "height": 40, "width": 60},
                   {"id": 2, "file_name": "c.png", "height": 40, "width": 60}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "segmentation": poly(2, 2, 20, 10), "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "segmentation": poly(30, 20, 10, 10), "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 3, "segmentation": poly(0, 0, 30, 30), "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path


def test_labels_are_contiguous_by_category_id_and_crowd_is_not_a_target(tiny_coco):
    ds = CocoInstances(tiny_coco / "ann.json", tiny_coco, image_size=40, max_size=60, flip_prob=0.0)
    assert [c["id"] for c in ds.categories] == [3, 7]
    by_file = {ds.file_names[k]: ds[k] for k in range(len(ds))}
    a = by_file["a.png"]
    assert a["labels"].tolist() == [1, 0]  # category 7 → label 1, category 3 → label 0
    assert a["masks"].shape == (2, 40, 60)
    assert a["boxes"][1].tolist() == pytest.approx([30, 20, 41, 31], abs=1)
    assert len(by_file["b.png"]["labels"]) == 0  # the crowd region is no training target
    assert len(by_file["c.png"]["labels"]) == 0
    batch = collate_training([a, by_file["c.png"]])  # an empty image batches with a full one
    assert batch["targets"][1]["masks"].shape == (0, 16, 16)


def test_flip_and_rotation_move_masks_with_the_image(tiny_coco):
    plain = CocoInstances(tiny_coco / "ann.json", tiny_coco, 40, 60, flip_prob=0.0)
    flipped = CocoInstances(tiny_coco / "ann.json", tiny_coco, 40, 60, flip_prob=1.0)
    k = plain.file_names.index("a.png")
    assert torch.equal(flipped[k]["masks"], plain[k]["masks"].flip(-1))
    rotated = CocoInstances(tiny_coco / "ann.json", tiny_coco, 40, 60, flip_prob=0.0, rotate_deg=9)
    seen = set()
    for epoch in range(6):  # rotation applies to half of the samples, by a seeded draw
        rotated.set_epoch(epoch)
        item = rotated[k]
        seen.add(torch.equal(item["masks"], plain[k]["masks"]))
        assert len(item["labels"]) == len(item["masks"]) == len(item["boxes"])
    assert seen == {True, False}


def test_a_file_of_another_size_is_an_error_naming_it(tiny_coco):
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tiny_coco / "a.png")
    with pytest.raises(CocoError, match=r"image 5 'a.png' \(file 10x10, JSON 40x60\)"):
        CocoInstances(tiny_coco / "ann.json", tiny_coco, 40, 60)  # checked before anything is read
    # a dataset dict counts as checked: a file that changed since still fails when read, naming itself
    ds = CocoInstances(json.loads((tiny_coco / "ann.json").read_text()), tiny_coco, 40, 60)
    with pytest.raises(ValueError, match="a.png is 10x10, its labels say 40x60"):
        ds[ds.file_names.index("a.png")]


def test_labeled_images_of_every_mode_load_exactly_as_in_stage_1(image_modes, tmp_path):
    """Grayscale, RGBA, palette, 16-bit, CMYK and EXIF-rotated files pass the check with their stored size and
    give the very tensors that stage 1 (ImageFolder) makes of them."""
    names = sorted(p.name for p in image_modes.iterdir())
    data = {"images": [{"id": i, "file_name": n, "height": 60, "width": 90} for i, n in enumerate(names, 1)],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "segmentation": [[10, 10, 40, 10, 40, 30]]}
                            for i in range(1, len(names) + 1)],
            "categories": [{"id": 1, "name": "cat"}]}
    (tmp_path / "modes.json").write_text(json.dumps(data))
    labeled = CocoInstances(tmp_path / "modes.json", image_modes, image_size=48, max_size=72, flip_prob=0.0)
    unlabeled = ImageFolder(image_modes, labeled.file_names, image_size=48, max_size=72)
    for k in range(len(labeled)):
        assert torch.equal(labeled[k]["image"], unlabeled[k]["image"]), labeled.file_names[k]
        assert labeled[k]["masks"].shape == (1, 48, 72)


def test_repeat_passes_over_every_image_several_times_with_fresh_augmentation(tiny_coco):
    once = CocoInstances(tiny_coco / "ann.json", tiny_coco, 40, 60, flip_prob=0.5)
    thrice = CocoInstances(tiny_coco / "ann.json", tiny_coco, 40, 60, flip_prob=0.5, repeat=3)
    assert len(thrice) == 3 * len(once) == 9
    k = once.file_names.index("a.png")
    copies = [thrice[k + 3 * r] for r in range(3)]
    plain = CocoInstances(tiny_coco / "ann.json", tiny_coco, 40, 60, flip_prob=0.0)[k]["masks"]
    for item in copies:  # the same image and objects, each copy flipped or not by its own draw
        assert item["labels"].tolist() == [1, 0]
        assert torch.equal(item["masks"], plain) or torch.equal(item["masks"], plain.flip(-1))
    flipped = set()
    for epoch in range(3):
        thrice.set_epoch(epoch)
        flipped |= {torch.equal(thrice[k + 3 * r]["masks"], plain.flip(-1)) for r in range(3)}
    assert flipped == {True, False}
