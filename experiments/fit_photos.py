"""Fit a query model class-agnostically on the first 24 coco_subset train photos and evaluate it on them (the
learning test of issue 18, tests/stages/test_finetune.py, runs this with K-Net): 180 steps of 4 photos at 256 px
(long side 384), AdamW 3e-4 x0.1 after epoch 25 of 30, ImageNet EfficientNet-Lite0, one thread.

    python experiments/fit_photos.py OUT [--model knet|mask2former|queryinst]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models.packaged_backbones import packaged_weights_path
from stages.finetune import FinetuneConfig, finetune
from stages.training import Schedule

COCO_SUBSET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "coco_subset"


def fit_photos(coco_subset: Path, out: Path, model: str = "knet", count: int = 24) -> dict:
    """Train on the first `count` photos (by image id) with a non-crowd object, evaluate on them; the metrics
    (`sp evaluate`'s form)."""
    data = json.loads((coco_subset / "train" / "annotations.json").read_text())
    ids = sorted({a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)})[:count]
    subset = {**data, "images": [img for img in data["images"] if img["id"] in ids],
              "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "photos.json").write_text(json.dumps(subset))
    images = coco_subset / "train" / "images"
    cfg = FinetuneConfig(out=out / "run", train_ann=out / "photos.json", train_images=images,
                         val_ann=out / "photos.json", val_images=images, model=model, small=True,
                         backbone="efficientnet_lite0", backbone_weights=packaged_weights_path("efficientnet_lite0"),
                         class_agnostic=True, epochs=30, batch_size=4, lr=3e-4,
                         schedule=Schedule(warmup_steps=20, lr_steps=(25,)), image_size=256, max_size=384,
                         eval_every=1000, workers=0, device="cpu", seed=0)
    finetune(cfg)
    return json.loads((out / "run" / "eval.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="knet", choices=["knet", "mask2former", "queryinst"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    metrics = fit_photos(COCO_SUBSET, args.out, args.model)
    print(f"{args.model} on its 24 training photos: mask AP {metrics['segm']['AP']:.2f}, "
          f"AP50 {metrics['segm']['AP50']:.2f}, box AP {metrics['bbox']['AP']:.2f}")


if __name__ == "__main__":
    main()
