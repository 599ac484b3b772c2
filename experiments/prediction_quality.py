"""Whether a fine-tuned model's masks find the objects, apart from how its scores rank them: for every
ground-truth object of a COCO file, the best IoU any of the model's predictions on its image reaches (so AP's
ranking plays no part), and the mean score of the predictions that find an object (IoU >= 0.5) against the
others'. A model whose masks cover the objects but whose scores do not tell them from the rest loses AP to
the ranking alone (experiments/README.md, issue 18).

    python experiments/prediction_quality.py RUN/final.pth --ann instances.json --images DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from stages.coco_data import one_class
from stages.evaluate import _numpy
from stages.import_coco import annotation_mask
from stages.inference import load_checkpoint_model, predict_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--ann", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    args = parser.parse_args()
    model, state = load_checkpoint_model(args.checkpoint, "cpu")
    data = one_class(json.loads(args.ann.read_text()))
    images = sorted(data["images"], key=lambda img: img["id"])
    objects: dict[int, list] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            objects.setdefault(a["image_id"], []).append(a)
    best, hit_scores, miss_scores = [], [], []
    for index, pred in predict_images(model, state["model_kind"], args.images, [img["file_name"] for img in images],
                                      state["args"]["image_size"], state["args"]["max_size"], "cpu", 1, 0):
        img = images[index]
        if img["id"] not in objects:
            continue
        gt = np.stack([annotation_mask(a, img["height"], img["width"]) for a in objects[img["id"]]]).astype(bool)
        masks, scores = _numpy(pred["masks"]).astype(bool), _numpy(pred["scores"])
        inter = np.einsum("phw,ghw->pg", masks.astype(np.float32), gt.astype(np.float32))
        union = masks.reshape(len(masks), -1).sum(1)[:, None] + gt.reshape(len(gt), -1).sum(1)[None] - inter
        iou = inter / np.maximum(union, 1)
        best += list(iou.max(0)) if len(masks) else [0.0] * len(gt)
        found = iou.max(1) >= 0.5 if len(masks) else np.zeros(0, bool)
        hit_scores += list(scores[found])
        miss_scores += list(scores[~found])
    best = np.array(best)
    print(f"{len(best)} objects: best IoU of any prediction, mean {best.mean():.3f}; IoU >= 0.5 for "
          f"{(best >= 0.5).mean():.1%}, >= 0.75 for {(best >= 0.75).mean():.1%}")
    print(f"mean score of the {len(hit_scores)} predictions that find an object {np.mean(hit_scores):.3f}, "
          f"of the other {len(miss_scores)} {np.mean(miss_scores):.3f}")


if __name__ == "__main__":
    main()
