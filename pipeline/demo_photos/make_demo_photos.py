"""Rebuild the demo photographs shipped in this folder from a COCO subset (run by maintainers, not users).

    python -m pipeline.demo_photos.make_demo_photos ../shared/datasets/coco_subset

Keeps the photos whose Flickr licence allows redistribution with attribution (COCO licence ids 4 CC BY,
5 CC BY-SA, 7 no known copyright restrictions, 8 US government work), resizes them so the long side is
--long-side pixels, scales their annotations to match (polygons and boxes by the same factors, crowd RLE
decoded, resized nearest-neighbour and re-encoded, areas recomputed), and writes ATTRIBUTION.md with each
photo's Flickr URL and licence.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAREABLE_LICENCES = (4, 5, 7, 8)
HERE = Path(__file__).resolve().parent


def scale_annotation(ann: dict, height: int, width: int, new_h: int, new_w: int) -> dict:
    sx, sy = new_w / width, new_h / height
    seg = ann["segmentation"]
    if isinstance(seg, list):
        seg = [[round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(poly)] for poly in seg]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, new_h, new_w))
    else:
        rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
        full = mask_utils.decode(rle)
        small = np.asarray(Image.fromarray(full * 255).resize((new_w, new_h), Image.NEAREST)) > 127
        rle = mask_utils.encode(np.asfortranarray(small.astype(np.uint8)))
        seg = {"size": [new_h, new_w], "counts": rle["counts"].decode("ascii")}
    x, y, w, h = ann["bbox"]
    return {"id": ann["id"], "image_id": ann["image_id"], "category_id": ann["category_id"],
            "iscrowd": ann.get("iscrowd", 0), "segmentation": seg, "area": float(mask_utils.area(rle)),
            "bbox": [round(x * sx, 2), round(y * sy, 2), round(w * sx, 2), round(h * sy, 2)]}


def build_split(source: Path, split: str, long_side: int, quality: int) -> list[dict]:
    data = json.loads((source / split / "annotations.json").read_text())
    images = sorted((img for img in data["images"] if img["license"] in SHAREABLE_LICENCES), key=lambda i: i["id"])
    out = HERE / split
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    per_image = {img["id"]: [] for img in images}
    for ann in data["annotations"]:
        if ann["image_id"] in per_image:
            per_image[ann["image_id"]].append(ann)
    new_images, new_anns = [], []
    for img in images:
        scale = long_side / max(img["height"], img["width"])
        new_h, new_w = round(img["height"] * scale), round(img["width"] * scale)
        with Image.open(source / split / "images" / img["file_name"]) as im:
            im.convert("RGB").resize((new_w, new_h), Image.LANCZOS).save(out / img["file_name"], quality=quality)
        new_images.append({k: img[k] for k in ("id", "file_name", "license", "flickr_url", "coco_url")}
                          | {"height": new_h, "width": new_w})
        new_anns += [scale_annotation(a, img["height"], img["width"], new_h, new_w) for a in per_image[img["id"]]]
    (HERE / "annotations").mkdir(exist_ok=True)
    coco = {"info": {"description": f"COCO 2017 {split} photos under licences {SHAREABLE_LICENCES}, resized to a "
                                    f"long side of {long_side} px, annotations scaled to match (sp demo)"},
            "licenses": data["licenses"], "images": new_images, "annotations": new_anns,
            "categories": data["categories"]}
    (HERE / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    return [(split, img, {lic["id"]: lic for lic in data["licenses"]}[img["license"]]) for img in new_images]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="coco_subset folder: train/ and val/ with annotations.json, images/")
    parser.add_argument("--long-side", type=int, default=480)
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args()
    rows = [row for split in ("train", "val") for row in build_split(args.source, split, args.long_side, args.quality)]
    lines = ["# Attribution of the demo photographs", "",
             "Photographs from the COCO 2017 dataset (cocodataset.org), each published on Flickr by its author under "
             "the licence named below; resized here (long side "
             f"{args.long_side} px). Annotations: COCO Consortium, CC BY 4.0, scaled to the resized photos. "
             "Photos under CC BY-SA 2.0 keep that licence in this adapted form.", "",
             "| file | split | Flickr URL | licence |", "|---|---|---|---|"]
    lines += [f"| {split}/{img['file_name']} | {split} | {img['flickr_url']} | [{lic['name']}]({lic['url']}) |"
              for split, img, lic in rows]
    (HERE / "ATTRIBUTION.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(rows)} photos to {HERE}")


if __name__ == "__main__":
    main()
