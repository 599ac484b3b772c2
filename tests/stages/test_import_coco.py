import json

import numpy as np
import pytest

from stages.eval_masks import evaluate_pseudo_masks
from stages.gen_masks import RunOptions
from stages.import_coco import annotation_mask, import_coco
from store import rle
from store.merge import find_parts, merge_stores
from store.pseudo_label_store import PseudoLabelStore

from conftest import assert_stores_equal


def test_imported_ground_truth_is_a_perfect_store(demo, tmp_path):
    store = import_coco(demo["unlabeled_ann"], demo["unlabeled"], tmp_path / "gt.zarr", backbone="resnet18",
                        image_size=128, max_size=192, options=RunOptions(batch_size=4, workers=0))
    gt = json.loads(open(demo["unlabeled_ann"]).read())
    assert store.num_images == len(gt["images"])
    assert store.mask_offset[-1] == len(gt["annotations"])
    result = evaluate_pseudo_masks(store, demo["unlabeled_ann"])
    assert result["segm"]["AP"] == pytest.approx(100.0) and result["bbox"]["AP"] == pytest.approx(100.0)
    # masks round-trip exactly and every mask has a unit seed feature pooled from the backbone
    first = gt["images"][0]
    anns = [a for a in gt["annotations"] if a["image_id"] == first["id"]]
    i = store.file_names.index(first["file_name"])
    for counts, ann in zip(store.rle(i), anns):
        np.testing.assert_array_equal(rle.decode(counts, first["height"], first["width"]),
                                      annotation_mask(ann, first["height"], first["width"]))
    feats = store.seed_features(i).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-2)
    assert store.attrs["settings"]["method"] == "import"


def test_images_without_annotations_get_no_masks_and_leave_the_others_unchanged(demo, tmp_path):
    """COCO files list photos with no (or only crowd) annotations (coco_subset train has such photos): they are
    stored with no mask, and every other photo's masks and features are those of the import without them."""
    gt = json.loads(open(demo["unlabeled_ann"]).read())
    emptied = gt["images"][1]
    crowd = [{**a, "iscrowd": 1} for a in gt["annotations"] if a["image_id"] == emptied["id"]]
    kept = [a for a in gt["annotations"] if a["image_id"] != emptied["id"]]
    (tmp_path / "some.json").write_text(json.dumps({**gt, "annotations": kept + crowd}))
    (tmp_path / "others.json").write_text(json.dumps({**gt, "images": [i for i in gt["images"] if i != emptied],
                                                       "annotations": kept}))
    # one photo a batch: the padding to a batch's largest photo, and with it C5, is then the same in both runs
    common = dict(backbone="resnet18", image_size=128, max_size=192, options=RunOptions(batch_size=1, workers=0))
    store = import_coco(tmp_path / "some.json", demo["unlabeled"], tmp_path / "some.zarr", **common)
    others = import_coco(tmp_path / "others.json", demo["unlabeled"], tmp_path / "others.zarr", **common)
    assert store.num_images == len(gt["images"]) and crowd
    assert store.rle(store.file_names.index(emptied["file_name"])) == []
    for name in others.file_names:
        i, j = store.file_names.index(name), others.file_names.index(name)
        assert store.rle(i) == others.rle(j)
        np.testing.assert_array_equal(store.seed_features(i), others.seed_features(j))


def test_polygon_annotations_are_rasterised(tmp_path):
    ann = {"segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]}
    mask = annotation_mask(ann, 10, 12)
    assert mask.shape == (10, 12) and 20 <= mask.sum() <= 40


def test_a_results_list_is_refused_with_a_reason(tmp_path, demo):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps([{"image_id": 1, "segmentation": {}, "score": 1}]))
    with pytest.raises(ValueError, match="not a COCO instances JSON"):
        import_coco(bad, demo["unlabeled"], tmp_path / "s.zarr")


def test_sharded_import_merges_into_the_single_process_store(demo, tmp_path):
    """`sp store import-coco --shard I/N` (the workflow's ground-truth stores) + `sp store merge` == one process."""
    common = dict(backbone="resnet18", image_size=128, max_size=192)
    single = import_coco(demo["unlabeled_ann"], demo["unlabeled"], tmp_path / "one.zarr", **common,
                         options=RunOptions(batch_size=2, workers=0))
    for index in range(2):
        import_coco(demo["unlabeled_ann"], demo["unlabeled"], tmp_path / "gt.zarr", **common,
                    options=RunOptions(batch_size=2, workers=0, shard=(index, 2)))
    merge_stores(find_parts(tmp_path / "gt.zarr"), tmp_path / "gt.zarr")
    assert_stores_equal(PseudoLabelStore.open(tmp_path / "gt.zarr"), single)
