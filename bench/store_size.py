"""Store size per image and per mask for a ResNet-50 store at the paper's settings (800 px, 20 masks per
image), extrapolated to COCO unlabeled2017 (123,403 images).

    python bench/store_size.py --images 16
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gen_masks import demo_images  # noqa: E402
from models.saliency import SaliencyConfig  # noqa: E402
from stages.gen_masks import GenerationSettings, RunOptions, generate  # noqa: E402
from store.export import store_summary  # noqa: E402

warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
COCO_UNLABELED = 123_403


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sp-bench"))
    args = parser.parse_args()
    images = demo_images(args.work, args.images)
    store = args.work / "size.zarr"
    shutil.rmtree(store, ignore_errors=True)
    # No score, width or position filter: the top 20 of every image are kept, the ~20 masks/image of the
    # design notes, whatever the (here random) backbone's scores.
    settings = GenerationSettings(backbone="resnet50", saliency=SaliencyConfig(
        min_score=0.0, max_width_frac=1.01, min_center_y_frac=0.0))
    s = store_summary(generate(images, store, settings, RunOptions(batch_size=4, workers=0)))
    print(json.dumps({"images": s["images_done"], "masks": s["masks"], "masks_per_image": s["masks_per_image_mean"],
                      "bytes_per_image": s["bytes_per_image"], "bytes_per_mask": s["bytes_per_mask"],
                      "coco_unlabeled_gib": s["bytes_per_image"] * COCO_UNLABELED / 2**30}, indent=2))


if __name__ == "__main__":
    main()
