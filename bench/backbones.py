"""Stage 1 per backbone: CPU images/s and the class-agnostic quality of its pseudo masks on real photos.

    python bench/backbones.py --images ../shared/datasets/coco_subset/val/images \
        --gt ../shared/datasets/coco_subset/val/annotations.json --image-size 512 --max-size 853

For each backbone (ImageNet weights from its package, plus random weights as the control) it runs
`sp gen-masks`'s `generate` on the folder and scores the store with `sp eval-masks`'s `evaluate_pseudo_masks`
(every GT instance one class 'fg', pseudo masks ranked by their saliency score). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.backbone import build_backbone, resolve_backbone_weights  # noqa: E402
from models.saliency import SaliencyConfig  # noqa: E402
from stages.eval_masks import evaluate_pseudo_masks  # noqa: E402
from stages.gen_masks import GenerationSettings, RunOptions, generate  # noqa: E402

warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
RUNS = [("efficientnet_lite0", "imagenet"), ("efficientnet_lite1", "imagenet"), ("efficientnet_lite2", "imagenet"),
        ("mobilenet_v2", "imagenet"), ("efficientnet_lite0", "none"), ("resnet50", "none")]


def run(images: Path, gt: Path, work: Path, name: str, weights: str, args) -> dict:
    path = resolve_backbone_weights(name, weights)
    settings = GenerationSettings(backbone=name, image_size=args.image_size, max_size=args.max_size,
                                  saliency=SaliencyConfig(min_score=args.min_score))
    store_path = work / f"{name}-{weights}.zarr"
    shutil.rmtree(store_path, ignore_errors=True)
    torch.manual_seed(settings.init_seed)
    backbone = build_backbone(name, path, out_levels=("c5",))
    start = time.perf_counter()
    store = generate(images, store_path, settings, RunOptions(batch_size=args.batch_size, workers=0),
                     backbone_weights=path, backbone=backbone)
    seconds = time.perf_counter() - start
    quality = evaluate_pseudo_masks(store, gt)
    return {"backbone": name, "weights": weights, "img_s": store.num_images / seconds, "masks": quality["masks"],
            "images": store.num_images, **{f"mask_{k}": quality["segm"][k] for k in ("AP", "AP50", "AR100")},
            **{f"box_{k}": quality["bbox"][k] for k in ("AP", "AP50", "AR100")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--gt", type=Path, required=True, help="COCO instances JSON of those images")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--max-size", type=int, default=853)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--min-score", type=float, default=0.7)
    parser.add_argument("--only", nargs="*", help="backbone names to run (default: all)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sp-bench/backbones"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run(args.images, args.gt, args.work, name, weights, args) for name, weights in RUNS
            if not args.only or name in args.only]
    print(f"\n{rows[0]['images']} images, short side {args.image_size} (long side <= {args.max_size}), batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads\n")
    print("| backbone | weights | img/s | masks/img | mask AP | AP50 | AR100 | box AP | AP50 | AR100 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['weights']} | {r['img_s']:.2f} | {r['masks'] / r['images']:.1f} | "
              f"{r['mask_AP']:.2f} | {r['mask_AP50']:.2f} | {r['mask_AR100']:.2f} | "
              f"{r['box_AP']:.2f} | {r['box_AP50']:.2f} | {r['box_AR100']:.2f} |")


if __name__ == "__main__":
    main()
