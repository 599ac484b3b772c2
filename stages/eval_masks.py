"""`sp eval-masks`: class-agnostic COCO box and mask AP of the pseudo masks against ground truth.

This is the paper's Table 6 (quality of the pseudo masks themselves): every GT instance counts as one
foreground class, and the pseudo masks are ranked by their saliency score.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from store.export import FG_CATEGORY, gt_image_ids, to_coco_results
from store.pseudo_label_store import DONE, PseudoLabelStore

log = logging.getLogger(__name__)
# The order of COCOeval.stats.
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
MAX_DETS = [1, 10, 100]


@contextlib.contextmanager
def _quiet(title: str, level: int = logging.DEBUG):
    """Capture pycocotools' prints and log them as one block instead."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue().strip():
        log.log(level, "%s:\n%s", title, buf.getvalue().rstrip())


def class_agnostic_gt(gt_json: Path) -> COCO:
    """The GT with every annotation in one category 'fg' (the file itself is not changed).

    Annotations without 'iscrowd' count as 0 and those without 'area' get their mask area, as COCOeval
    needs both."""
    with open(gt_json) as f:
        dataset = json.load(f)
    dataset = {**dataset, "categories": [dict(FG_CATEGORY)],
               "annotations": [{**a, "category_id": FG_CATEGORY["id"], "iscrowd": a.get("iscrowd", 0)}
                               for a in dataset["annotations"]]}
    gt = COCO()
    gt.dataset = dataset
    with _quiet("GT index"):
        gt.createIndex()
    for ann in dataset["annotations"]:
        if "area" not in ann:
            ann["area"] = float(mask_utils.area(gt.annToRLE(ann)))
    return gt


def _load_results(gt: COCO, results: list[dict]) -> COCO:
    """gt.loadRes, also for an empty list (which loadRes cannot take): no detections, AP 0."""
    with _quiet("results index"):
        if results:
            return gt.loadRes(results)
        dt = COCO()
        dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
        dt.createIndex()
        return dt


def _coco_stats(gt: COCO, dt: COCO, iou_type: str, image_ids: list[int]) -> dict[str, float]:
    ev = COCOeval(gt, dt, iou_type)
    ev.params.imgIds = image_ids
    ev.params.maxDets = MAX_DETS
    with _quiet(f"COCOeval {iou_type}"):
        ev.evaluate()
        ev.accumulate()
    with _quiet(f"class-agnostic {iou_type} AP of the pseudo masks", logging.INFO):
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


def evaluate_pseudo_masks(store: PseudoLabelStore, gt_json: Path) -> dict:
    """Class-agnostic box and mask AP of the store's masks on the images present in both store and GT.

    Returns {'bbox': {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}, 'segm': {same},
    'images': images evaluated, 'images_without_gt': done store images absent from the GT, 'masks': masks
    evaluated}. Values are COCOeval's, in [0, 1]; -1 where a size range has no GT.
    """
    gt = class_agnostic_gt(gt_json)
    ids = gt_image_ids(store, gt.dataset)
    n_done = int((store.image_array("status") == DONE).sum())
    if not ids:
        raise ValueError(f"none of the {n_done} done images of {store.path} is in {gt_json} (file names differ?)")
    if len(ids) < n_done:
        log.warning("%d of %d done store images have no GT in %s and are not evaluated",
                    n_done - len(ids), n_done, gt_json)
    image_ids = sorted(set(ids.values()))
    results = to_coco_results(store, gt.dataset)
    # Box AP matches results by their boxes. Mask AP must not see the boxes: loadRes would then take the box
    # area as the instance area and sort masks into the wrong small/medium/large range.
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    result = {"bbox": _coco_stats(gt, _load_results(gt, results), "bbox", image_ids),
              "segm": _coco_stats(gt, _load_results(gt, masks_only), "segm", image_ids),
              "images": len(image_ids), "images_without_gt": n_done - len(ids), "masks": len(results)}
    return result


def format_table(result: dict) -> str:
    """Box and mask AP rows in percent, as in the paper's Table 6."""
    names = STAT_NAMES[:6]
    lines = [f"{'':6}" + "".join(f"{n:>7}" for n in names)]
    for label, key in (("box", "bbox"), ("mask", "segm")):
        cells = [f"{100 * result[key][n]:7.1f}" if result[key][n] >= 0 else f"{'-':>7}" for n in names]
        lines.append(f"{label:6}" + "".join(cells))
    footer = f"{result['images']} images, {result['masks']} pseudo masks"
    if result["images_without_gt"]:
        footer += f"; {result['images_without_gt']} store images without GT"
    lines.append(footer)
    return "\n".join(lines)
