"""COCO evaluation time: faster-coco-eval against pycocotools through `coco_evaluate` (same numbers).

    python bench/evaluate.py --images 200
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.evaluate import coco_evaluate  # noqa: E402
from store import rle  # noqa: E402


def boxes_to_masks(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    masks = np.zeros((len(boxes), h, w), bool)
    for m, (x, y, bw, bh) in zip(masks, boxes.astype(int)):
        m[y:y + bh, x:x + bw] = True
    return masks


def synthetic(images: int, objects: int, detections: int, h: int = 480, w: int = 640, seed: int = 0):
    """GT boxes-as-masks and detections: jittered copies of the GT plus random false positives."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    results = []
    for i in range(1, images + 1):
        gt["images"].append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
        size = rng.uniform(10, 200, (objects, 2))
        boxes = np.concatenate([rng.uniform(0, 1, (objects, 2)) * ([w, h] - size), size], 1)
        for counts, box, cat in zip(rle.encode_batch(boxes_to_masks(boxes, h, w)), boxes, rng.integers(1, 3, objects)):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": int(cat),
                                      "segmentation": rle.to_coco(counts, h, w), "area": float(box[2] * box[3]),
                                      "bbox": box.tolist(), "iscrowd": 0})
        jitter = boxes[rng.integers(0, objects, detections)] + rng.normal(0, 8, (detections, 4))
        jitter[:, 2:] = np.clip(jitter[:, 2:], 4, None)
        jitter[:, :2] = np.clip(jitter[:, :2], 0, [w - 5, h - 5])
        for counts, box in zip(rle.encode_batch(boxes_to_masks(jitter, h, w)), jitter):
            results.append({"image_id": i, "category_id": int(rng.integers(1, 3)), "score": float(rng.random()),
                            "bbox": box.tolist(), "segmentation": rle.to_coco(counts, h, w)})
    return gt, results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--objects", type=int, default=7)
    parser.add_argument("--detections", type=int, default=100)
    args = parser.parse_args()
    gt, results = synthetic(args.images, args.objects, args.detections)
    out = {"images": args.images, "gt_per_image": args.objects, "detections_per_image": args.detections}
    for backend in ("pycocotools", "faster"):
        start = time.perf_counter()
        metrics = coco_evaluate(gt, results, backend=backend)
        out[backend] = {"seconds": time.perf_counter() - start, "segm_AP": metrics["segm"]["AP"],
                        "bbox_AP": metrics["bbox"]["AP"]}
    out["speedup"] = out["pycocotools"]["seconds"] / out["faster"]["seconds"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
