"""stages.evaluate: COCO AP of model predictions, checked on cases with known AP and against pycocotools."""
import contextlib
import copy
import io
import json
import math
import sys

import numpy as np
import pycocotools.mask as coco_mask
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from stages.evaluate import AP_NAMES, coco_evaluate, format_ap_table, label_maps, predictions_to_results

H, W = 120, 160
IMAGE_IDS = [1, 2, 3, 4]
CATEGORIES = [{"id": 90, "name": "c"}, {"id": 1, "name": "a"}, {"id": 3, "name": "b"}]  # unsorted on purpose
TO_LABEL, TO_CATEGORY = label_maps(CATEGORIES)
FASTER_MISSING = "faster-coco-eval is not installed (pip install faster-coco-eval)"


def rect(y1, x1, y2, x2):
    m = np.zeros((H, W), bool)
    m[y1:y2, x1:x2] = True
    return m


def encode(mask):
    r = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": r["counts"].decode()}


# COCO size ranges: small < 32² px, medium < 96² px, large above. Each category has two ordinary objects;
# image 3 has none, and image 2 holds a crowd region. One object is a polygon, as in COCO's own GT.
TRIANGLE = [[60.0, 60.0, 140.0, 60.0, 60.0, 110.0]]  # medium
GT_OBJECTS = [  # (image id, category id, mask or polygon, iscrowd)
    (1, 1, rect(5, 5, 110, 105), 0),  # large
    (1, 3, rect(10, 120, 30, 140), 0),  # small
    (2, 3, rect(10, 10, 50, 50), 0),  # medium
    (2, 90, TRIANGLE, 0),
    (2, 1, rect(10, 100, 60, 150), 1),  # crowd
    (4, 90, rect(100, 10, 115, 30), 0),  # small
    (4, 1, rect(20, 40, 80, 100), 0),  # medium
]
CROWD_PART = rect(10, 100, 35, 125)  # a quarter of the crowd region: IoU 1 with it as a crowd, 0.25 as an object
FRAME = rect(10, 30, 110, 130) & ~rect(13, 33, 107, 127)  # mask area 1164 (medium), box area 10000 (large)


def ann_rle(seg):
    return coco_mask.merge(coco_mask.frPyObjects(seg, H, W)) if isinstance(seg, list) else seg


@pytest.fixture
def gt():
    anns = []
    for image_id, category, shape, crowd in GT_OBJECTS:
        seg = shape if isinstance(shape, list) else encode(shape)
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category, "segmentation": seg,
                     "area": float(coco_mask.area(ann_rle(seg))), "bbox": coco_mask.toBbox(ann_rle(seg)).tolist(),
                     "iscrowd": crowd})
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in IMAGE_IDS]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


@pytest.fixture(params=["pycocotools", "faster"])
def backend(request):
    """Each backend: the known answers hold for both."""
    if request.param == "faster":
        pytest.importorskip("faster_coco_eval", reason=FASTER_MISSING)
    return request.param


def gt_objects(gt):
    """(image id, category id, mask) of the non-crowd GT objects."""
    return [(a["image_id"], a["category_id"], coco_mask.decode(ann_rle(a["segmentation"])).astype(bool))
            for a in gt["annotations"] if not a["iscrowd"]]


def mask_box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def to_results(dets, image_ids=IMAGE_IDS):
    """COCO results of (image id, category id, mask, score) detections, made the way the model's are."""
    preds = []
    for image_id in image_ids:
        mine = [d for d in dets if d[0] == image_id]
        preds.append(dict(scores=torch.tensor([s for *_, s in mine], dtype=torch.float32),
                          labels=torch.tensor([TO_LABEL[c] for _, c, _, _ in mine], dtype=torch.long),
                          masks=torch.from_numpy(np.array([m for _, _, m, _ in mine], bool).reshape(-1, H, W)),
                          boxes=torch.tensor([mask_box(m) for _, _, m, _ in mine], dtype=torch.float32).reshape(-1, 4)))
    return predictions_to_results(preds, image_ids, TO_CATEGORY)


def direct_pycocotools(gt, results, iou_type):
    """Plain pycocotools COCOeval (boxes dropped for masks, as detectron2 does), in percent, NaN for -1."""
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    dets = copy.deepcopy(results)
    if iou_type == "segm":
        for d in dets:
            d.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {n: 100 * v if v >= 0 else math.nan for n, v in zip(AP_NAMES, ev.stats)}


def assert_same(a, b, atol=1e-9):
    assert list(a) == list(b)
    np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=0, atol=atol, equal_nan=True)


def assert_matches_direct(gt, results, metrics):
    for iou_type in ("segm", "bbox"):
        assert_same(metrics[iou_type], direct_pycocotools(gt, results, iou_type))


def test_perfect_predictions_score_100(gt, backend):
    # The crowd region's quarter has the top score: only matching it to the crowd (ignored) keeps AP at 100.
    # A false positive on the image without objects scores below every hit, so it cannot lower AP either.
    dets = [(i, c, m, 0.9) for i, c, m in gt_objects(gt)]
    dets += [(2, 1, CROWD_PART, 1.0), (3, 3, rect(0, 0, 10, 10), 0.01)]
    results = to_results(dets)
    metrics = coco_evaluate(gt, results, backend=backend)
    assert metrics["images"] == 4
    for iou_type in ("segm", "bbox"):
        assert_same(metrics[iou_type], {n: 100.0 for n in AP_NAMES})  # means of 100s round a little
    assert_matches_direct(gt, results, metrics)


def test_wrong_categories_score_0(gt, backend):
    ids = sorted(TO_LABEL)
    dets = [(i, ids[(ids.index(c) + 1) % len(ids)], m, 0.9) for i, c, m in gt_objects(gt)]
    results = to_results(dets)
    metrics = coco_evaluate(gt, results, backend=backend)
    for iou_type in ("segm", "bbox"):
        assert_same(metrics[iou_type], {n: 0.0 for n in AP_NAMES}, atol=0)
    assert_matches_direct(gt, results, metrics)


def test_half_found(gt, backend, tmp_path):
    # One object of each category found exactly, nothing else: precision 1 up to recall 1/2, so COCO's 101
    # recall points give 51/101 per category. Per size range a category scores 100 if its object of that
    # size was found, 0 if not, and does not count without one.
    objects = gt_objects(gt)
    found = [objects[k] for k in (0, 1, 3)]  # large of category 1, small of 3, medium (polygon) of 90
    results = to_results([(i, c, m, 0.5 + 0.1 * k) for k, (i, c, m) in enumerate(found)])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    original = copy.deepcopy(gt)
    metrics = coco_evaluate(path, results, backend=backend)
    expected = {"AP": 100 * 51 / 101, "AP50": 100 * 51 / 101, "AP75": 100 * 51 / 101,
                "APs": 50.0, "APm": 100 / 3, "APl": 100.0}
    for iou_type in ("segm", "bbox"):
        assert_same(metrics[iou_type], expected)
    assert_matches_direct(gt, results, metrics)
    assert coco_evaluate(gt, results, backend=backend) == metrics  # dict in, same numbers
    assert gt == original  # COCOeval rewrites GT polygons in place; the caller's dict must not change


def test_mask_area_decides_size_range_of_masks(gt, backend):
    # A thin frame of medium mask area but large box tops category 3's list on the empty image. As a mask it
    # is a medium false positive (category 3 medium AP 1/2); as a box it is large and outside the medium range.
    dets = [(i, c, m, 0.9) for i, c, m in gt_objects(gt)] + [(3, 3, FRAME, 1.0)]
    results = to_results(dets)
    metrics = coco_evaluate(gt, results, backend=backend)
    assert metrics["segm"]["AP"] == pytest.approx((100 + 200 / 3 + 100) / 3)  # category 3: precision 2/3
    assert metrics["segm"]["APm"] == pytest.approx((100 + 50 + 100) / 3)
    assert metrics["bbox"]["APm"] == pytest.approx(100.0)
    assert_matches_direct(gt, results, metrics)


def test_empty_results_score_0(gt, backend):
    metrics = coco_evaluate(gt, [], iou_types=("segm", "bbox"), backend=backend)
    assert metrics == {"images": 4, "segm": {n: 0.0 for n in AP_NAMES}, "bbox": {n: 0.0 for n in AP_NAMES}}
    # Without large GT, APl is undefined (COCOeval's -1): NaN, not a score.
    no_large = {**gt, "annotations": [a for a in gt["annotations"] if a["area"] < 96 ** 2]}
    metrics = coco_evaluate(no_large, [], iou_types=["segm"], backend=backend)
    assert metrics["segm"]["AP"] == 0.0 and math.isnan(metrics["segm"]["APl"])


def random_case(rng, n_images=12):
    """GT of random rectangles and ellipses of all sizes (some crowd, some images empty) and predictions
    that shift, resize, mislabel or miss them, plus false positives; scores random."""
    yy, xx = np.mgrid[:H, :W]

    def shape(cy, cx, ry, rx):
        if rng.random() < 0.5:
            return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        return (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)

    def random_shape():
        return shape(rng.integers(0, H), rng.integers(0, W), rng.integers(2, 60), rng.integers(2, 70))

    anns, dets = [], []
    for image_id in range(1, n_images + 1):
        for _ in range(rng.integers(0, 6)):
            mask = random_shape()
            if not mask.any():
                continue
            category = int(rng.choice(list(TO_LABEL)))
            seg = encode(mask)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category, "segmentation": seg,
                         "area": float(mask.sum()), "bbox": coco_mask.toBbox(seg).tolist(),
                         "iscrowd": int(rng.random() < 0.1)})
            if rng.random() < 0.75:
                moved = np.roll(mask, tuple(rng.integers(-6, 7, 2)), axis=(0, 1))
                if rng.random() < 0.2:
                    category = int(rng.choice(list(TO_LABEL)))
                if moved.any():
                    dets.append((image_id, category, moved, float(rng.random())))
        for _ in range(rng.integers(0, 3)):
            mask = random_shape()
            if mask.any():
                dets.append((image_id, int(rng.choice(list(TO_LABEL))), mask, float(rng.random())))
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in range(1, n_images + 1)]
    gt = {"images": images, "annotations": anns, "categories": CATEGORIES}
    return gt, to_results(dets, list(range(1, n_images + 1)))


def test_faster_coco_eval_matches_pycocotools():
    pytest.importorskip("faster_coco_eval", reason=FASTER_MISSING)
    gt, results = random_case(np.random.default_rng(0))
    faster = coco_evaluate(gt, results, backend="faster")
    pycoco = coco_evaluate(gt, results, backend="pycocotools")
    assert faster["images"] == pycoco["images"] == 12
    for iou_type in ("segm", "bbox"):
        assert 5 < pycoco[iou_type]["AP"] < 95  # a case where mistakes of either backend would show
        assert_same(faster[iou_type], pycoco[iou_type])
    assert_matches_direct(gt, results, pycoco)


def test_backend_choice(gt, monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        coco_evaluate(gt, [], backend="detectron2")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes the import fail
    with pytest.raises(ImportError, match="faster-coco-eval"):
        coco_evaluate(gt, [], backend="faster")
    results = to_results([(i, c, m, 0.9) for i, c, m in gt_objects(gt)])
    assert coco_evaluate(gt, results, ["bbox"])["bbox"]["AP"] == pytest.approx(100.0)  # auto falls back to pycocotools


def test_predictions_to_results_round_trip():
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(rng.random((3, 30, 40)) < 0.3)
    boxes = torch.tensor([[0, 0, 40, 30], [2.5, 3, 10, 20], [5, 6, 7, 8]])
    scores = torch.tensor([0.9, 0.5, 0.25])
    preds = [dict(scores=scores, labels=torch.tensor([2, 0, 1]), masks=masks, boxes=boxes),
             dict(scores=np.zeros(0), labels=np.zeros(0, int), masks=np.zeros((0, 30, 40), bool),
                  boxes=np.zeros((0, 4)))]
    results = predictions_to_results(preds, [7, 8], [1, 3, 90])
    json.dumps(results)  # plain Python types only
    assert [r["image_id"] for r in results] == [7, 7, 7]
    assert [r["category_id"] for r in results] == [90, 1, 3]
    assert [r["score"] for r in results] == scores.tolist()
    assert [r["bbox"] for r in results] == [[0, 0, 40, 30], [2.5, 3, 7.5, 17], [5, 6, 2, 2]]
    for r, mask in zip(results, masks.numpy()):
        assert r["segmentation"]["size"] == [30, 40]
        np.testing.assert_array_equal(coco_mask.decode(r["segmentation"]), mask)
    with pytest.raises(ValueError, match="image ids"):
        predictions_to_results(preds, [7], [1, 3, 90])


def test_label_maps_round_trip():
    to_label, to_category = label_maps([{"id": 90}, {"id": 1}, {"id": 3}])
    assert to_label == {1: 0, 3: 1, 90: 2}
    assert to_category == [1, 3, 90]
    assert all(to_category[to_label[c]] == c for c in (1, 3, 90))
    with pytest.raises(ValueError, match="duplicate"):
        label_maps([{"id": 1}, {"id": 1}])


def test_format_ap_table():
    row = {"AP": 41.26, "AP50": 60.0, "AP75": 44.44, "APs": math.nan, "APm": 38.05, "APl": 100.0}
    table = format_ap_table({"images": 5, "segm": row, "bbox": {**row, "AP": 0.04}})
    assert table.splitlines() == [
        "           AP   AP50   AP75    APs    APm    APl",
        "segm     41.3   60.0   44.4      -   38.0  100.0",
        "bbox      0.0   60.0   44.4      -   38.0  100.0",
        "5 images",
    ]


@pytest.mark.parametrize("model_kind", ["knet", "maskrcnn"])
def test_a_mask_threshold_given_at_test_time_replaces_the_trained_one(tmp_path, model_kind):
    """`sp evaluate --mask-threshold`: the same checkpoint, its masks thresholded lower, are supersets."""
    from PIL import Image

    from stages.inference import load_checkpoint_model, predict_images
    from tiny_checkpoints import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "ck.pth", model_kind=model_kind)
    Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    masks = {}
    for threshold in (None, 0.3, 0.7):
        model, state = load_checkpoint_model(path, "cpu", mask_threshold=threshold)
        (_, pred), = predict_images(model, model_kind, tmp_path, ["a.png"], 64, 96, "cpu", 1, 0)
        masks[threshold] = pred["masks"]
    trained = state["model_config"].get("mask_threshold_test", state["model_config"].get("mask_threshold"))
    assert trained == (0.3 if model_kind == "knet" else 0.5)  # K-Net's default is its authors' COCO value
    low, default, high = masks[0.3], masks[None], masks[0.7]
    assert (low | default).equal(low) and (default | high).equal(default)  # 0.3 ⊇ 0.5 ⊇ 0.7
    assert low.sum() > high.sum()
