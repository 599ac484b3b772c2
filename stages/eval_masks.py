"""`sp eval-masks`: class-agnostic COCO box and mask AP of the pseudo masks against ground truth.

This is the paper's Table 6 (quality of the pseudo masks themselves): every GT instance counts as one
foreground class, and the pseudo masks are ranked by their saliency score.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from stages.coco_check import MASK_GT, checked_data
from stages.evaluate import STAT_NAMES, _quiet, coco_evaluate, format_ap_table
from stages.coco_data import one_class
from store.export import gt_image_ids, to_coco_results
from store.pseudo_label_store import DONE, PseudoLabelStore

log = logging.getLogger(__name__)


def class_agnostic_gt(gt: dict | Path) -> dict:
    """The GT (a COCO file, checked here, or a dict already checked) with every annotation in one category 'fg';
    the file itself is not changed.

    Annotations without 'iscrowd' count as 0 and those without 'area' get their mask area, as COCOeval
    needs both."""
    dataset = one_class(checked_data(gt, needs=MASK_GT))
    dataset["annotations"] = [{**a, "iscrowd": a.get("iscrowd", 0)} for a in dataset["annotations"]]
    if any("area" not in a for a in dataset["annotations"]):
        gt = COCO()
        gt.dataset = dataset
        with _quiet("GT index"):  # pycocotools prints its progress
            gt.createIndex()
        for ann in dataset["annotations"]:
            if "area" not in ann:
                ann["area"] = float(mask_utils.area(gt.annToRLE(ann)))
    return dataset


def evaluate_pseudo_masks(store: PseudoLabelStore, gt: Path | dict) -> dict:
    """Class-agnostic box and mask AP of the store's masks on the images present in both store and GT (a COCO
    file, or a dataset dict already checked with `MASK_GT`).

    Returns {'bbox': {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}, 'segm': {same},
    'images': images evaluated, 'images_without_gt': done store images absent from the GT, 'masks': masks
    evaluated}, in percent as `coco_evaluate` gives them (NaN where a size range has no GT).
    """
    source = "the GT" if isinstance(gt, dict) else gt
    gt = class_agnostic_gt(gt)
    ids = gt_image_ids(store, gt)
    n_done = int((store.image_array("status") == DONE).sum())
    if not ids:
        raise ValueError(f"none of the {n_done} done images of {store.path} is in {source} (file names differ?)")
    if len(ids) < n_done:
        log.warning("%d of %d done store images have no GT in %s and are not evaluated",
                    n_done - len(ids), n_done, source)
    sizes = {img["id"]: [img["height"], img["width"]] for img in gt["images"]}
    heights, widths, names = store.image_array("height"), store.image_array("width"), store.file_names
    other = [f"{names[i]} ({heights[i]}x{widths[i]}, GT {sizes[j][0]}x{sizes[j][1]})" for i, j in ids.items()
             if [heights[i], widths[i]] != sizes[j]]
    if other:
        raise ValueError(f"{len(other)} image(s) of {store.path} have another size in {source}: "
                         + ", ".join(other[:3]) + (", ..." if len(other) > 3 else ""))
    results = to_coco_results(store, gt)
    metrics = coco_evaluate(gt, results, image_ids=sorted(set(ids.values())), stats=STAT_NAMES)
    return {**metrics, "images_without_gt": n_done - len(ids), "masks": len(results)}


def format_table(result: dict) -> str:
    """Mask and box AP rows in percent, as in the paper's Table 6, and what was evaluated."""
    footer = f", {result['masks']} pseudo masks"
    if result["images_without_gt"]:
        footer += f"; {result['images_without_gt']} store images without GT"
    return format_ap_table(result) + footer
