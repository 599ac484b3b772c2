"""How much of an object's shape survives a mask predicted at stride s: each ground-truth mask of a COCO file,
at a training resolution, averaged over s x s cells, resized back (bilinear) and thresholded at 0.5, against
itself. Its IoU is the best any model predicting at that stride can reach for that object (K-Net predicts at
stride 8, Mask2Former at stride 4), so the share of objects under an IoU threshold bounds mask AP there. Also
counted: objects with no pixel left at the training resolution (left out of the targets), and those a majority
vote over 4x4 cells (K-Net's stride-4 targets before issue 18) would have turned into empty targets.

    python experiments/mask_resolution.py ../shared/datasets/coco_subset/val/annotations.json --short 256 --long 384
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages.image_data import resized_size
from stages.import_coco import annotation_mask

SIZES = {"small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, float("inf"))}


def round_trip_iou(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """masks: (L, h, w) bool, h and w multiples of `stride` -> (L,) IoU of each mask with itself predicted at
    that stride (cell averages, bilinear back to (h, w), > 0.5)."""
    cells = F.avg_pool2d(masks[None].float(), stride)
    back = F.interpolate(cells, size=masks.shape[-2:], mode="bilinear", align_corners=False)[0] > 0.5
    inter = (back & masks).flatten(1).sum(1)
    union = (back | masks).flatten(1).sum(1)
    return inter / union.clamp(min=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ann", type=Path, help="COCO instances JSON")
    parser.add_argument("--short", type=int, default=256, help="training short side")
    parser.add_argument("--long", type=int, default=384, help="training long-side cap")
    parser.add_argument("--strides", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    data = json.loads(args.ann.read_text())
    images = {img["id"]: img for img in data["images"]}
    per_image: dict[int, list] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            per_image.setdefault(a["image_id"], []).append(a)
    ious = {s: [] for s in args.strides}
    areas, vanished, majority_empty = [], 0, 0
    for image_id, anns in per_image.items():
        img = images[image_id]
        h, w = resized_size(img["height"], img["width"], args.short, args.long)
        hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
        full = np.stack([annotation_mask(a, img["height"], img["width"]) for a in anns])
        masks = F.interpolate(torch.from_numpy(full)[None].float(), size=(h, w), mode="nearest")[0] > 0.5
        masks = F.pad(masks, (0, wp - w, 0, hp - h))
        keep = masks.flatten(1).any(1)
        vanished += int((~keep).sum())
        majority_empty += int(((F.avg_pool2d(masks[keep][None].float(), 4)[0] > 0.5).flatten(1).sum(1) == 0).sum())
        areas += masks[keep].flatten(1).sum(1).tolist()
        for s in args.strides:
            ious[s] += round_trip_iou(masks[keep], s).tolist()
    areas = np.array(areas)
    print(f"{len(areas) + vanished} objects of {args.ann} at short side {args.short} (long <= {args.long}): "
          f"{vanished} with no pixel left, {majority_empty} more with an empty 4x4-majority target; "
          "areas (size columns) at that resolution")
    print("| stride | objects | mean IoU | IoU >= 0.5 | IoU >= 0.75 | IoU >= 0.9 | " +
          " | ".join(f"mean IoU {k} ({int(((areas >= lo) & (areas < hi)).sum())})" for k, (lo, hi) in SIZES.items())
          + " |")
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(SIZES))
    for s in args.strides:
        v = np.array(ious[s])
        by_size = [v[(areas >= lo) & (areas < hi)].mean() for lo, hi in SIZES.values()]
        print(f"| {s} | {len(v)} | {v.mean():.3f} | {(v >= 0.5).mean():.3f} | {(v >= 0.75).mean():.3f} | "
              f"{(v >= 0.9).mean():.3f} | " + " | ".join(f"{x:.3f}" for x in by_size) + " |")


if __name__ == "__main__":
    main()
