"""COCO mask and box AP of a fine-tuned model's predictions (the paper's main tables).

Predictions are per-image dicts as `KNet.predict` returns them; `predictions_to_results` turns them into a COCO
results list and `coco_evaluate` scores that list against a COCO ground-truth file, with faster-coco-eval (same
numbers, C++ matching) when it is installed and pycocotools otherwise.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from store import rle

log = logging.getLogger(__name__)
# The order of COCOeval.stats: six AP figures, then six recalls.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
AP_NAMES = STAT_NAMES[:6]
BACKENDS = ("auto", "pycocotools", "faster")


@contextlib.contextmanager
def _quiet(title: str):
    """Capture the COCO tools' prints and log them as one debug block instead."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue().strip():
        log.debug("%s:\n%s", title, buf.getvalue().rstrip())


def _load_results(gt, results: list[dict]):
    """pycocotools' gt.loadRes, also for an empty list (which it cannot take): no detections, AP 0."""
    with _quiet("results index"):
        if results:
            return gt.loadRes(results)
        dt = type(gt)()
        dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
        dt.createIndex()
        return dt


def label_maps(categories: list[dict]) -> tuple[dict[int, int], list[int]]:
    """COCO category id → contiguous label 0..C-1 (in id order), and label → category id.

    The model's classifier has one output per label, so the labels must be dense; sorting by id keeps the
    mapping the same whatever order the categories are listed in."""
    ids = sorted(int(c["id"]) for c in categories)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate category ids in {ids}")
    return {cid: label for label, cid in enumerate(ids)}, ids


def _numpy(x) -> np.ndarray:
    """A tensor (on any device) or array-like as a NumPy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def predictions_to_results(predictions: list[dict], image_ids: list[int],
                           label_to_category: list[int]) -> list[dict]:
    """COCO results list of per-image predictions.

    predictions[i] belongs to COCO image image_ids[i] and holds scores (K,), labels (K,) in 0..C-1, masks
    (K, H, W) bool at the image's size and boxes (K, 4) xyxy with x2/y2 exclusive (tensors or arrays).
    Returns one dict per instance: image_id, category_id (label_to_category[label]), score, bbox [x, y, w, h]
    and segmentation {'size': [H, W], 'counts': str} (compressed COCO RLE).
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions for {len(image_ids)} image ids")
    results = []
    for pred, image_id in zip(predictions, image_ids):
        masks = _numpy(pred["masks"])
        if len(masks) == 0:
            continue
        h, w = masks.shape[1:]
        scores, labels, boxes = (_numpy(pred[k]) for k in ("scores", "labels", "boxes"))
        # One numba call per image: encoding mask by mask costs a Python round trip each.
        for counts, score, label, (x1, y1, x2, y2) in zip(rle.encode_batch(masks), scores, labels, boxes):
            results.append({"image_id": int(image_id), "category_id": int(label_to_category[int(label)]),
                            "score": float(score),
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                            "segmentation": rle.to_coco(counts, h, w)})
    return results


def _backend(name: str) -> tuple[str, type, type]:
    """(name, COCO class, COCOeval class) of the backend asked for; 'auto' prefers faster-coco-eval."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "pycocotools":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
            return "faster", COCO, COCOeval_faster
        except ImportError as e:
            if name == "faster":
                raise ImportError("backend 'faster' needs faster-coco-eval (pip install faster-coco-eval)") from e
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    return "pycocotools", COCO, COCOeval


def _load_gt(gt: dict | Path, coco_class: type):
    """The GT as the backend's COCO object. Annotations are copied because COCOeval replaces their polygons
    by RLE in place, which must not leak into the caller's dict."""
    if not isinstance(gt, dict):
        with open(gt) as f:
            gt = json.load(f)
    coco = coco_class()
    coco.dataset = {**gt, "annotations": [dict(a) for a in gt.get("annotations", [])]}
    with _quiet("GT index"):
        coco.createIndex()
    return coco


def _percent(value: float) -> float:
    """COCOeval value in [0, 1] → percent; its -1 (no GT in that size range) → NaN, so it cannot pass for
    a score."""
    return 100.0 * float(value) if value >= 0 else math.nan


def coco_evaluate(gt: dict | Path, results: list[dict], iou_types=("segm", "bbox"), backend: str = "auto",
                  image_ids: list[int] | None = None, stats: tuple[str, ...] = AP_NAMES) -> dict:
    """COCO AP of results (a COCO results list) on the images of gt (a COCO dict or json path): all of them,
    or the image_ids given.

    backend: 'auto' (faster-coco-eval if importable, else pycocotools), 'pycocotools' or 'faster'.
    Returns {iou_type: {name: value for the names in stats (any of STAT_NAMES)}, ..., 'images': images
    evaluated}, values in percent, unrounded, NaN where no GT falls into a size range. An empty results list
    scores 0.
    """
    name, coco_class, eval_class = _backend(backend)
    coco_gt = _load_gt(gt, coco_class)
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(image_ids)
    metrics: dict = {"images": len(image_ids)}
    for iou_type in iou_types:
        # Fresh dicts each time, since loadRes writes area, id and iscrowd into them. Mask AP must not see the
        # boxes: loadRes would then take the box area as the instance area and put masks into the wrong
        # small/medium/large range (detectron2 drops them for the same reason).
        dets = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")} for r in results]
        # faster-coco-eval's loadRes takes an empty list; pycocotools' cannot, which _load_results handles.
        coco_dt = coco_gt.loadRes(dets) if name == "faster" else _load_results(coco_gt, dets)
        ev = eval_class(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = image_ids
        with _quiet(f"COCOeval {iou_type} ({name})"):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[iou_type] = {k: _percent(v) for k, v in zip(STAT_NAMES, ev.stats) if k in stats}
    return metrics


def format_ap_table(metrics: dict) -> str:
    """coco_evaluate's metrics as a plain text table: one row per IoU type, AP columns in percent to 0.1,
    '-' where undefined."""
    lines = [f"{'':6}" + "".join(f"{n:>7}" for n in AP_NAMES)]
    for iou_type in ("segm", "bbox"):
        if iou_type in metrics:
            row = metrics[iou_type]
            lines.append(f"{iou_type:6}" + "".join(f"{row[n]:7.1f}" if not math.isnan(row[n]) else f"{'-':>7}"
                                                   for n in AP_NAMES))
    lines.append(f"{metrics['images']} images")
    return "\n".join(lines)
