"""stages.eval_masks: class-agnostic AP of pseudo masks, checked on known cases and against pycocotools."""
import copy
import json
import logging
import math

import numpy as np
import pycocotools.mask as coco_mask
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from stages.eval_masks import evaluate_pseudo_masks, format_table
from stages.evaluate import STAT_NAMES
from stages.gen_masks import RunOptions, generate
from store import rle
from store.pseudo_label_store import ImageResult, PseudoLabelStore

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
H, W = 64, 160
SHIFT = 90  # GT objects lie in x < 64: shifted by this they overlap no GT at all


def ellipse(cy, cx, ry, rx):
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def rect(y1, x1, y2, x2):
    m = np.zeros((H, W), bool)
    m[y1:y2, x1:x2] = True
    return m


# GT objects of three images in two categories (the evaluation must ignore the categories), and of an
# image that no store here has (it must not be evaluated).
GT_MASKS = {
    "a.png": [(ellipse(20, 20, 10, 14), 1), (rect(40, 5, 60, 30), 2), (ellipse(50, 50, 6, 6), 1)],
    "b.png": [(rect(2, 2, 12, 12), 2), (ellipse(40, 40, 20, 18), 1)],
    "c.png": [(rect(10, 30, 50, 60), 1), (ellipse(30, 10, 9, 5), 2), (rect(55, 40, 63, 63), 2)],
    "unseen.png": [(rect(10, 10, 30, 30), 1)],
}
STORE_IMAGES = ["a.png", "b.png", "c.png"]


def encode(mask):
    r = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": r["counts"].decode()}


@pytest.fixture
def gt_json(tmp_path):
    images, anns = [], []
    for image_id, (name, objects) in enumerate(GT_MASKS.items(), start=11):
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        for mask, category in objects:
            seg = encode(mask)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category, "segmentation": seg,
                         "area": float(mask.sum()), "bbox": coco_mask.toBbox(seg).tolist(), "iscrowd": 0})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "round"}, {"id": 2, "name": "square"}]}))
    return path


def make_store(path, pseudo: dict[str, list[tuple[np.ndarray, float]]]):
    """A finished store with the given (mask, score) list per file name; names get a folder prefix so
    that they match the GT by basename."""
    names = list(pseudo)
    store = PseudoLabelStore.create(path, [f"unlabeled/{n}" for n in names], {"method": "test"}, 4)
    results = []
    for i, name in enumerate(names):
        masks = np.array([m for m, _ in pseudo[name]], bool).reshape(-1, H, W)
        boxes = np.array([coco_mask.toBbox(encode(m)) for m in masks], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh → xyxy, x2/y2 exclusive
        results.append(ImageResult(
            index=i, height=H, width=W, rle=rle.encode_batch(masks), box=boxes,
            score=np.array([s for _, s in pseudo[name]], np.float32),
            seed=np.zeros((len(masks), 3), np.int16), seed_feature=np.zeros((len(masks), 4), np.float16)))
    store.append(results)
    store.finalize()
    return PseudoLabelStore.open(path)


def pycocotools_stats(gt_json, pseudo):
    """The reference: COCOeval run directly, on results built by hand from the same masks."""
    dataset = json.loads(gt_json.read_text())
    for a in dataset["annotations"]:
        a["category_id"] = 1
    dataset["categories"] = [{"id": 1, "name": "fg"}]
    gt = COCO()
    gt.dataset = dataset
    gt.createIndex()
    ids = {im["file_name"]: im["id"] for im in dataset["images"]}
    image_ids = sorted(ids[name] for name in pseudo)
    segm = [{"image_id": ids[name], "category_id": 1, "segmentation": encode(m), "score": s}
            for name, objects in pseudo.items() for m, s in objects]
    bbox = [{**r, "bbox": coco_mask.toBbox(r["segmentation"]).tolist()} for r in copy.deepcopy(segm)]
    out = {}
    for iou_type, results in (("bbox", bbox), ("segm", segm)):
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.params.imgIds = image_ids
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        out[iou_type] = {n: 100 * v if v >= 0 else math.nan for n, v in zip(STAT_NAMES, ev.stats)}  # percent
    return out


def test_gt_masks_score_ap_1(gt_json, tmp_path):
    pseudo = {name: [(m, 1.0) for m, _ in GT_MASKS[name]] for name in STORE_IMAGES}
    result = evaluate_pseudo_masks(make_store(tmp_path / "s.zarr", pseudo), gt_json)
    assert result["images"] == 3 and result["masks"] == 8 and result["images_without_gt"] == 0
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert result[iou_type][name] == pytest.approx(100.0), (iou_type, name)


def test_shifted_masks_score_ap_0(gt_json, tmp_path):
    pseudo = {name: [(np.roll(m, SHIFT, axis=1), 1.0) for m, _ in GT_MASKS[name]] for name in STORE_IMAGES}
    result = evaluate_pseudo_masks(make_store(tmp_path / "s.zarr", pseudo), gt_json)
    for iou_type in ("bbox", "segm"):
        assert result[iou_type]["AP"] == 0 and result[iou_type]["AP50"] == 0 and result[iou_type]["AR100"] == 0


def test_no_masks_score_ap_0(gt_json, tmp_path):
    result = evaluate_pseudo_masks(make_store(tmp_path / "s.zarr", {n: [] for n in STORE_IMAGES}), gt_json)
    assert result["masks"] == 0 and result["segm"]["AP"] == 0 and result["bbox"]["AP50"] == 0


def test_half_the_masks_equal_a_direct_cocoeval(gt_json, tmp_path, caplog):
    # Every other GT mask, confident false positives, a loose box around one object, and an image that
    # the GT does not have: AP is strictly between 0 and 1, and must be what COCOeval itself says.
    kept = {name: [(m, 0.9 - 0.1 * k) for k, (m, _) in enumerate(GT_MASKS[name]) if k % 2 == 0]
            for name in STORE_IMAGES}
    kept["a.png"].append((rect(0, 100, 30, 150), 0.95))
    kept["c.png"].append((rect(8, 26, 54, 66), 0.5))
    # A hollow square: small by mask area, medium by box area; only correct for mask AP if the mask
    # area decides its size range.
    kept["b.png"].append((rect(20, 100, 60, 140) & ~rect(22, 102, 58, 138), 0.85))
    extra = {"not_in_gt.png": [(GT_MASKS["a.png"][0][0], 0.99)]}
    store = make_store(tmp_path / "s.zarr", {**kept, **extra})
    with caplog.at_level(logging.INFO, logger="stages.eval_masks"):
        result = evaluate_pseudo_masks(store, gt_json)
    assert result["images"] == 3 and result["images_without_gt"] == 1
    assert "1 of 4 done store images have no GT" in caplog.text
    assert 0 < result["segm"]["AP50"] < 100 and 0 < result["bbox"]["AP50"] < 100
    reference = pycocotools_stats(gt_json, kept)
    for iou_type in ("bbox", "segm"):
        for name in STAT_NAMES:
            assert result[iou_type][name] == pytest.approx(reference[iou_type][name], nan_ok=True), (iou_type, name)


def test_no_common_image_is_an_error(gt_json, tmp_path):
    store = make_store(tmp_path / "s.zarr", {"zzz.png": [(rect(0, 0, 5, 5), 1.0)]})
    with pytest.raises(ValueError, match="none of the 1 done images"):
        evaluate_pseudo_masks(store, gt_json)


def test_format_table():
    stats = dict(zip(STAT_NAMES, [50.0, 75.0, 25.0, math.nan, 12.5, 100.0] + [0.0] * 6))
    text = format_table({"bbox": stats, "segm": {**stats, "AP": 33.3}, "images": 3, "masks": 7,
                         "images_without_gt": 2})
    lines = text.splitlines()
    assert lines[0].split() == list(STAT_NAMES[:6])
    assert lines[1].split()[:2] == ["segm", "33.3"]
    assert lines[2].split() == ["bbox", "50.0", "75.0", "25.0", "-", "12.5", "100.0"]
    assert "3 images, 7 pseudo masks; 2 store images without GT" in text


def test_store_generated_on_demo_data(demo, tiny_settings, tmp_path):
    # End to end on real stage-1 output: file names of the folder match the demo GT, all images count.
    store = generate(demo["unlabeled"], tmp_path / "s.zarr", tiny_settings, RunOptions(batch_size=4, workers=0))
    result = evaluate_pseudo_masks(store, demo["unlabeled_ann"])
    assert result["images"] == store.num_images == 12 and result["images_without_gt"] == 0
    assert result["masks"] == store.progress["masks_done"] > 0
    assert all(0 <= v <= 100 or math.isnan(v) for iou_type in ("bbox", "segm") for v in result[iou_type].values())


def test_gt_without_area_or_iscrowd_scores_the_same_and_prints_nothing(gt_json, tmp_path, capfd):
    """Many COCO-style files omit 'area' and 'iscrowd': they are filled in (mask area, 0), quietly."""
    pseudo = {name: [(m, 0.9 - 0.1 * k) for k, (m, _) in enumerate(GT_MASKS[name]) if k != 1] for name in STORE_IMAGES}
    store = make_store(tmp_path / "s.zarr", pseudo)
    full = evaluate_pseudo_masks(store, gt_json)
    bare = json.loads(gt_json.read_text())
    bare["annotations"] = [{k: v for k, v in a.items() if k not in ("area", "iscrowd")} for a in bare["annotations"]]
    bare_json = tmp_path / "bare.json"
    bare_json.write_text(json.dumps(bare))
    capfd.readouterr()
    result = evaluate_pseudo_masks(store, bare_json)
    assert capfd.readouterr().out == ""
    assert 0 < result["segm"]["AP"] < 100
    for iou_type in ("bbox", "segm"):
        assert result[iou_type] == pytest.approx(full[iou_type], nan_ok=True)
