"""How large the objects of pseudo-label stores and COCO files are, relative to their photos: the box area over the
photo area, per object (experiments/README.md, "Pre-training scale": which labels give K-Net a start for
Penn-Fudan's pedestrians).

    python experiments/label_sizes.py results/cache/stores/923865665858.zarr results/cache/stores/60fd94ce7b21.zarr \
        ../shared/datasets/pennfudan/train/annotations.json
    python experiments/label_sizes.py results/cache/stores/60fd94ce7b21.zarr --min-mask-area 0.01

Prints one markdown row per source: objects, objects per photo, median and mean box-area fraction, the share of
objects above 10 % and below 1 % of their photo.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from stages.pseudo_label_data import large_masks
from store.pseudo_label_store import PseudoLabelStore


def store_fractions(path: Path, min_mask_area: float = 0.0) -> tuple[np.ndarray, int]:
    """(box area / photo area of every mask, number of photos) of a pseudo-label store (boxes x1, y1, x2, y2);
    with min_mask_area, of the masks that `sp pretrain --min-mask-area` keeps."""
    store = PseudoLabelStore.open(path)
    height, width = store.image_array("height").astype(float), store.image_array("width").astype(float)
    photo = np.repeat(np.arange(len(height)), np.diff(store.mask_offset))
    box = store.mask_array("box").astype(float)
    keep = np.ones(len(box), bool)
    if min_mask_area:
        keep = np.concatenate([large_masks(store.rle(i), int(height[i]), int(width[i]), min_mask_area)
                               for i in range(len(height))])
    fractions = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]) / (height[photo] * width[photo])
    return fractions[keep], len(height)


def coco_fractions(path: Path) -> tuple[np.ndarray, int]:
    """(box area / photo area of every non-crowd annotation, number of photos) of a COCO instances file."""
    data = json.loads(path.read_text())
    area = {image["id"]: image["height"] * image["width"] for image in data["images"]}
    return np.array([a["bbox"][2] * a["bbox"][3] / area[a["image_id"]] for a in data["annotations"]
                     if not a.get("iscrowd", 0)]), len(data["images"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path, help="Stores (*.zarr) or COCO instances JSON files.")
    parser.add_argument("--min-mask-area", type=float, default=0.0, help="Stores: only the masks covering at least "
                        "this fraction of their photo, as `sp pretrain --min-mask-area` keeps them.")
    args = parser.parse_args()
    print("| source | objects | per photo | median box area | mean | > 10 % | < 1 % |\n|---|---:|---:|---:|---:|---:|---:|")
    for source in args.sources:
        fractions, photos = (store_fractions(source, args.min_mask_area) if source.suffix == ".zarr"
                             else coco_fractions(source))
        print(f"| {source} | {len(fractions)} | {len(fractions) / photos:.1f} | {np.median(fractions):.3f} | "
              f"{fractions.mean():.3f} | {(fractions > 0.1).mean():.2f} | {(fractions < 0.01).mean():.2f} |")


if __name__ == "__main__":
    main()
