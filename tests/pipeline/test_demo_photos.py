"""Tests for the demo photographs shipped with the project (pipeline.demo_photos, `sp demo-data`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.demo_photos import HERE, write_demo_photos

SHAREABLE = {4, 5, 7, 8}  # CC BY, CC BY-SA, no known copyright restrictions, US government work
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_demo_photos(tmp_path_factory.mktemp("photos") / "demo")


def test_every_photo_is_shareable_credited_and_small(photos):
    credits = (photos["train"].parent / "ATTRIBUTION.md").read_text()
    total = 0
    for split, count in (("train", 82), ("val", 57)):
        coco = json.loads(photos[f"{split}_ann"].read_text())
        assert len(coco["images"]) == count == len(list(photos[split].glob("*.jpg")))
        for img in coco["images"]:
            assert img["license"] in SHAREABLE, img
            assert f"{split}/{img['file_name']} | {split} | {img['flickr_url']} |" in credits
            total += (photos[split] / img["file_name"]).stat().st_size
    assert total < 10e6, f"{total / 1e6:.1f} MB of photos"
    assert sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file()) < 10e6  # what the repository ships


def test_annotations_fit_their_photos(photos):
    for split in ("train", "val"):
        coco = COCO(str(photos[f"{split}_ann"]))
        assert len(coco.getCatIds()) == 80
        for img in coco.dataset["images"]:
            with Image.open(photos[split] / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                mask = coco.annToMask(ann)
                assert mask.shape == (img["height"], img["width"]) and mask.any(), ann["id"]
                assert ann["area"] == pytest.approx(mask.sum(), rel=0.02, abs=2)
                x, y, w, h = ann["bbox"]
                ys, xs = np.nonzero(mask)
                assert abs(xs.min() - x) <= 3 and abs(ys.min() - y) <= 3, ann["id"]  # COCO's own boxes are loose


def test_scaled_masks_match_the_original_annotations(photos, coco_subset):
    """The shipped masks are COCO's masks resized with their photo (IoU with the resized original)."""
    for split in ("train", "val"):
        shipped = COCO(str(photos[f"{split}_ann"]))
        original = COCO(str(coco_subset / split / "annotations.json"))
        for ann in shipped.loadAnns(shipped.getAnnIds())[::7]:
            img = shipped.imgs[ann["image_id"]]
            full = original.annToMask(original.anns[ann["id"]])
            resized = np.asarray(Image.fromarray(full * 255).resize((img["width"], img["height"]), Image.BILINEAR)) > 127
            mine = shipped.annToMask(ann).astype(bool)
            iou = (mine & resized).sum() / max(1, (mine | resized).sum())
            assert iou > (0.85 if resized.sum() >= 400 else 0.5), (ann["id"], iou)  # small masks: boundary pixels


def test_subsets_and_a_foreign_folder(tmp_path):
    paths = write_demo_photos(tmp_path / "few", num_train=3, num_val=2)
    train = json.loads(paths["train_ann"].read_text())
    assert [img["id"] for img in train["images"]] == sorted(img["id"] for img in train["images"])
    assert len(train["images"]) == 3 and len(list(paths["val"].glob("*.jpg"))) == 2
    assert {a["image_id"] for a in train["annotations"]} <= {img["id"] for img in train["images"]}
    assert paths["unlabeled"] == paths["train"]
    write_demo_photos(tmp_path / "few", num_train=3, num_val=2)  # same options again: fine
    with pytest.raises(ValueError, match="different settings"):
        write_demo_photos(tmp_path / "few", num_train=4, num_val=2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    result = CliRunner().invoke(app, ["demo-data", str(tmp_path / "mine")])
    assert result.exit_code == 2 and "refusing to write demo data" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "user data"
