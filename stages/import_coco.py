"""`sp store import-coco`: external pseudo labels (FreeSOLO, CutLER, ground truth, ...) as a store.

The masks come from the JSON; the backbone only supplies each mask's seed feature (the unit C5 feature
averaged inside the mask), so kernel supervision works on imported labels too. It reuses the stage-1 loop.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from models.backbone_weights import file_sha256
from models.saliency import mask_boxes
from stages.coco_check import PSEUDO_LABELS, load_checked_coco
from stages.gen_masks import GenerationSettings, RunOptions, generate, pooled_features
from stages.image_data import Batch


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of a COCO annotation given as polygons, RLE or uncompressed RLE."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle)


def import_coco(ann_path: Path, images_dir: Path, store_path: Path, backbone: str = "resnet50",
                backbone_weights: Path | None = None, image_size: int = 800, max_size: int = 1333,
                options: RunOptions | None = None, skip_bad: bool = False, decode: bool = False):
    """Write the masks of `ann_path` into a new (or resumed) store; returns the store.

    The file and its images are checked first (`stages.coco_check`); with skip_bad, what is left out is
    recorded in the store's attrs as `input_skipped`."""
    checked = load_checked_coco(ann_path, images_dir, PSEUDO_LABELS, skip_bad, decode)
    per_image = defaultdict(list)
    for ann in checked.data["annotations"]:
        if not ann.get("iscrowd", 0):
            per_image[ann["image_id"]].append(ann)
    records = {img["file_name"]: img for img in checked.data["images"]}

    def propose(c5: torch.Tensor, batch: Batch, settings: GenerationSettings):
        def masks_and_features():  # per-image work at the original size: run in the writer thread
            out = []
            for b, name in enumerate(batch.file_name):
                img = records[name]
                height, width = batch.image_hw[b]
                if (img["height"], img["width"]) != (height, width):
                    raise ValueError(f"{name}: the JSON says {img['height']}x{img['width']}, the file is "
                                     f"{height}x{width}")
                anns = per_image.get(img["id"], [])
                masks = torch.from_numpy(np.stack([annotation_mask(a, height, width) for a in anns])
                                         if anns else np.zeros((0, height, width), np.uint8)).bool().to(c5.device)
                score = torch.tensor([float(a.get("score", 1.0)) for a in anns], device=c5.device)
                seed = torch.tensor([[-1, -1, 0]] * len(anns), device=c5.device).view(-1, 3)
                out.append((masks, mask_boxes(masks), score, seed, pooled_features(c5, b, masks, batch)))
            return out

        return masks_and_features

    settings = GenerationSettings(method="import", backbone=backbone, image_size=image_size, max_size=max_size,
                                  source_sha256=file_sha256(ann_path))
    return generate(images_dir, store_path, settings, options or RunOptions(), backbone_weights=backbone_weights,
                    file_names=list(records), proposer=propose,
                    extra_attrs={"source": str(ann_path), "input_skipped": checked.skipped})
