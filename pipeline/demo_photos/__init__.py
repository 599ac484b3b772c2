"""The built-in demo on real photographs: 139 COCO 2017 photos (82 train2017, 57 val2017) whose Flickr
licence allows redistribution (ATTRIBUTION.md), resized to a long side of 480 px, with their COCO instance
annotations scaled to match (80 categories). `sp demo-data OUT` copies them out; `make_demo_photos.py`
rebuilt them from `../shared/datasets/coco_subset`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.demo_data import check_out_dir

HERE = Path(__file__).resolve().parent
README_MARKER = "Demo photographs copied by `sp demo-data` (pipeline/demo_photos)."


def write_demo_photos(out_dir: Path, num_train: int | None = None, num_val: int | None = None) -> dict:
    """Copy the first ``num_train`` / ``num_val`` photos of each split (by image id; None: all) with their
    annotations into ``out_dir``: ``train/``, ``val/``, ``annotations/train.json``, ``val.json``,
    ``ATTRIBUTION.md``. The train photos double as the unlabeled pre-training set (their labels are not
    read there), so ``unlabeled`` is ``train/`` and its ground truth ``train.json``. Returns the paths."""
    out_dir = Path(out_dir)
    counts = {"train": num_train, "val": num_val}
    for split, count in counts.items():
        if count is not None and (int(count) != count or count < 1):
            raise ValueError(f"num_{split} must be a positive integer, got {count!r}")
    settings_line = "settings: " + json.dumps(counts, sort_keys=True)
    check_out_dir(out_dir, README_MARKER, settings_line)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "README.txt").write_text(f"{README_MARKER}\n{settings_line}\n"
                                        "Credits and licences of the photographs: ATTRIBUTION.md.\n")
    shutil.copyfile(HERE / "ATTRIBUTION.md", out_dir / "ATTRIBUTION.md")
    (out_dir / "annotations").mkdir(exist_ok=True)
    paths = {}
    for split, count in counts.items():
        coco = json.loads((HERE / "annotations" / f"{split}.json").read_text())
        images = sorted(coco["images"], key=lambda img: img["id"])[:count]
        keep = {img["id"] for img in images}
        (out_dir / split).mkdir(exist_ok=True)
        for img in images:
            shutil.copyfile(HERE / split / img["file_name"], out_dir / split / img["file_name"])
        coco.update(images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in keep])
        paths[split], paths[f"{split}_ann"] = out_dir / split, out_dir / "annotations" / f"{split}.json"
        paths[f"{split}_ann"].write_text(json.dumps(coco))
    paths["unlabeled"], paths["unlabeled_ann"] = paths["train"], paths["train_ann"]
    return paths
